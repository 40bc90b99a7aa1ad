"""Trains the subword stand-in's tokenizer offline: byte-level BPE (the `tokenizers` library)
on the train split of the embedded corpus and of the stdlib's English prose.

  python -m data.build_tokenizer --out=runs/standin/tokenizer [--vocab_size=8192]

Writes OUT/tokenizer.json and OUT/tokenizer_config.json, read by data/hf_tokenizer.py
(`data.tokenizer=hf:OUT`) and by transformers' AutoTokenizer: <unk>, <s> (BOS), </s> (EOS)
are ids 0, 1, 2. configs/standin.py trains the model that goes with it.
"""
import argparse
import json
import os

from data import sources

SPECIAL = ['<unk>', '<s>', '</s>']


def texts(split='train', sources_=('stdlib', 'pydoc')):
  """The documents of `split` of each source, one string at a time."""
  for source in sources_:
    docs = sources.get_documents(source, split)
    for i in range(len(docs)):
      yield docs[i]


def build(out, vocab_size=8192, split='train', sources_=('stdlib', 'pydoc')):
  """Trains the tokenizer on `texts(split, sources_)`, writes it to directory `out`; returns
  out."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts(split, sources_), trainer)
  # transformers adds BOS as Llama's tokenizers do (mnemax adds it itself: add_special_tokens
  # is off in data/hf_tokenizer.py)
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                     special_tokens=[('<s>', 1)])
  os.makedirs(out, exist_ok=True)
  tok.save(os.path.join(out, 'tokenizer.json'))
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(dict(tokenizer_class='PreTrainedTokenizerFast', unk_token='<unk>',
                   bos_token='<s>', eos_token='</s>', add_bos_token=True,
                   model_max_length=1_000_000), f, indent=1)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--out', required=True, help='output directory')
  ap.add_argument('--vocab_size', type=int, default=8192)
  args = ap.parse_args(argv)
  build(args.out, args.vocab_size)
  print(f'wrote {args.out}/tokenizer.json ({args.vocab_size} ids)')


if __name__ == '__main__':
  main()
