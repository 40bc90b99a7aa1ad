"""The RULER-style task suite (data/ruler.py): every task's generator under the byte
tokenizer and a subword (BPE) one, and RULER's metric."""
import collections
import re

import numpy as np
import pytest

from data import ruler
from data.hf_tokenizer import HFTokenizer, get_tokenizer


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  """A 1000-id byte-level BPE tokenizer trained on the prose the tasks use (seconds)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=['<unk>', '<s>', '</s>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  words = ruler.prose_words()
  tok.train_from_iterator([' '.join(words[i:i + 200]) for i in range(0, len(words), 200)],
                          trainer)
  path = tmp_path_factory.mktemp('bpe')
  tok.save(str(path / 'tokenizer.json'))
  (path / 'tokenizer_config.json').write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
  return HFTokenizer(str(path))


def _context(ex):
  """The task text without its template's question (where the answers must be)."""
  return ex.text[:ex.text.rfind('\n')]


LENGTH = 8192        # cwe needs ~5K bytes, or ~4K tokens of this small BPE (its solved
                     # example comes first)


@pytest.mark.parametrize('kind', ['byte', 'bpe'])
@pytest.mark.parametrize('task', sorted(ruler.TASKS))
def test_each_task_fits_its_length_is_deterministic_and_holds_its_answers(task, kind, bpe):
  tok = get_tokenizer('byte') if kind == 'byte' else bpe
  length = LENGTH
  ex = ruler.example(task, length, tok, seed=5)
  again = ruler.example(task, length, tok, seed=5)
  other = ruler.example(task, length, tok, seed=6)
  np.testing.assert_array_equal(ex.prompt_ids, again.prompt_ids)
  assert ex.references == again.references and ex.references != other.references
  n = len(ex.prompt_ids) + ex.max_new_tokens
  assert 0.9 * length <= n <= length, (n, length)                    # the largest that fits
  assert ex.prompt_ids[0] == tok.BOS
  np.testing.assert_array_equal(ex.prompt_ids[1:], tok.encode(ex.text + ex.answer_prefix))
  assert ex.max_new_tokens == ruler.TEMPLATES[
      'niah' if task.startswith('niah') else task][2]
  context, p = _context(ex), ruler.TASKS[task]
  if task.startswith('niah'):
    want = p['num_needle_v'] * p['num_needle_q']
    assert len(ex.references) == want
    for value in ex.references:          # each answer sits in a needle with its queried key
      key = re.search(rf'for (\S+) is: {re.escape(value)}\.', context).group(1)
      assert key in ex.answer_prefix
  elif task == 'vt':
    first = re.search(rf'VAR {ex.references[0]} = (\d+)', context).group(1)
    assert f'value {first}' in ex.answer_prefix
    for a, b in zip(ex.references, ex.references[1:]):
      assert f'VAR {b} = VAR {a}' in context
  elif task == 'cwe':
    listed = collections.Counter(re.findall(r'\d+\. (\w+)', context.split('\n')[-1]))
    assert sorted(ex.references) == sorted(w for w, _ in listed.most_common(10))
    assert min(listed[w] for w in ex.references) > max(
        c for w, c in listed.items() if w not in ex.references)
  else:                                    # fwe: the three most frequent coded words
    words = collections.Counter(w for w in context.split() if re.fullmatch(r'[a-z]{6}', w))
    assert ex.references == [w for w, _ in words.most_common(3)]


def test_depth_places_the_needle_at_that_fraction_of_the_haystack():
  tok = get_tokenizer('byte')
  for task in ('niah_single_1', 'niah_single_2'):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
      ex = ruler.example(task, 16384, tok, seed=1, depth=depth)
      start, end = ex.text.find('\n') + 1, ex.text.rfind('\nWhat')
      at = (ex.text.find('One of the special magic') - start) / (end - start)
      assert abs(at - depth) < 0.03, (task, depth, at)


def test_singular_wording_when_one_value_is_asked():
  tok = get_tokenizer('byte')
  one = ruler.example('niah_single_1', 2048, tok, seed=0)
  assert one.text.startswith('A special magic number is hidden') and one.answer_prefix.startswith(
      ' The special magic number for') and one.answer_prefix.endswith('text is')
  many = ruler.example('niah_multivalue', 2048, tok, seed=0)
  assert many.text.startswith('Some special magic numbers are hidden')
  assert many.answer_prefix.endswith('text are')


def test_metric_is_rulers_string_match_all():
  assert ruler.score('The numbers are 123 and 456.', ['123', '456']) == 1.0
  assert ruler.score('the answer: ABC', ['abc', 'def']) == 0.5      # case-insensitive
  assert ruler.score('', ['1']) == 0.0


def test_a_length_too_short_and_an_unknown_task_are_clear_errors():
  tok = get_tokenizer('byte')
  with pytest.raises(ValueError, match=r'ruler cwe: length 1024 is too short'):
    ruler.example('cwe', 1024, tok, seed=0)
  with pytest.raises(ValueError, match=r"ruler: unknown task 'niah'; one of"):
    ruler.example('niah', 1024, tok, seed=0)


def test_ruler_training_source(bpe):
  """data.source ruler:TASK,..: one example per window in the run's tokenizer, the answer
  (references joined by ', ', then EOS) in the last tokens; weights on the answer only with
  data.loss=answer, else on the prompt too but never on the filler; train and eval seeds
  disjoint; a mix keeps its text parts' weights."""
  from data import pipeline
  spec = f'hf:{bpe.dir}'
  source = pipeline._RulerWindows(['niah_single_1', 'vt'], 513, 'train', spec, answer_loss=True)
  for i in range(4):
    item, e = source[i], ruler.example(['niah_single_1', 'vt'][i % 2], 513, bpe, i,
                                       max_new_tokens=source.ANSWER_TOKENS)
    tokens, weights = item['tokens'], item['weights']
    assert tokens.shape == (513,) and tokens[0] == bpe.BOS
    answer = bpe.encode(' ' + ', '.join(e.references)).tolist() + [bpe.EOS]
    assert tokens[-len(answer):].tolist() == answer
    assert np.flatnonzero(weights).tolist() == list(range(512 - len(answer), 512))
    assert tokens[-len(answer) - len(e.prompt_ids) + 1:-len(answer)].tolist() == \
        e.prompt_ids[1:].tolist()
  full = pipeline._RulerWindows(['vt'], 513, 'train', spec)[1]
  pad = 513 - int(full['weights'].sum()) - 1
  assert (full['tokens'][1:pad + 1] == int(bpe.encode('\n')[0])).all()   # filler, weight 0
  assert full['weights'][:pad].sum() == 0 and full['weights'][pad:].all()
  held = pipeline._RulerWindows(['vt'], 513, 'eval', spec)[1]
  assert held['tokens'].tolist() != full['tokens'].tolist()
  batch = next(pipeline.make_train_iterator('mix:pydoc+ruler:vt', 'train', 512, 4, 0,
                                            tokenizer=spec, answer_loss=True))
  sums = sorted(batch['weights'].sum(1).tolist())
  assert sums[-2:] == [512, 512] and sums[0] < 64                # text rows: every token
