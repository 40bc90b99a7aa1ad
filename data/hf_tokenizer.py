"""Tokenizers of imported Hugging Face models, behind ByteTokenizer's interface.

`get_tokenizer(spec)` for the `data.tokenizer` config key (after training/config.py `resolve`
has turned 'auto' into one of these):
  'byte'      data/tokenizer.py ByteTokenizer (256 bytes + PAD/BOS/EOS/<AC>)
  'hf:DIR'    HFTokenizer(DIR): DIR/tokenizer.json through the `tokenizers` package, else
              DIR/tokenizer.model through sentencepiece
Both give encode(text, bos, eos) -> int32 ids, decode(ids) -> str, vocab_size and the
BOS / EOS / PAD ids (PAD is -1, matching no token, when the model has none: Llama has none),
and AC, the id of AnLLM's "<AC>" anchor token: the tokenizer's own "<AC>" where it has one (an
exported AnLLM-AC model's), else the first id past its vocabulary, a new token whose embedding
row the model adds (models/anchor.py). The literal text "<AC>" encodes as that id, as with the
byte tokenizer (data/ac.py inserts it at sentence ends).
"""
import functools
import json
import os

import numpy as np

from data.tokenizer import AC_TEXT, ByteTokenizer
from data.sources import SourceError


def _json(hf_dir, name):
  path = os.path.join(hf_dir, name)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _first(x):
  return x[0] if isinstance(x, list) else x


def _spm_lookup(spm, piece):
  """The id of `piece`, or None when sentencepiece does not know it."""
  i = spm.piece_to_id(piece)
  return None if i == spm.unk_id() and piece != spm.id_to_piece(i) else i


class HFTokenizer:
  """tokenizer.json (`tokenizers`) or tokenizer.model (sentencepiece) of a model directory.

  Special ids come from the model's config.json (bos/eos/pad_token_id), else from
  tokenizer_config.json's token strings, else from the sentencepiece model.
  """

  def __init__(self, hf_dir):
    self.dir = hf_dir
    model_cfg, tok_cfg = _json(hf_dir, 'config.json'), _json(hf_dir, 'tokenizer_config.json')
    if os.path.isfile(os.path.join(hf_dir, 'tokenizer.json')):
      import tokenizers
      self._tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, 'tokenizer.json'))
      self._spm = None
      self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
      lookup = self._tok.token_to_id
      own = {}
    elif os.path.isfile(os.path.join(hf_dir, 'tokenizer.model')):
      import sentencepiece
      self._tok = None
      self._spm = sentencepiece.SentencePieceProcessor(
          model_file=os.path.join(hf_dir, 'tokenizer.model'))
      self.vocab_size = self._spm.get_piece_size()
      lookup = functools.partial(_spm_lookup, self._spm)
      own = dict(bos=self._spm.bos_id(), eos=self._spm.eos_id(), pad=self._spm.pad_id())
    else:
      raise SourceError(f'data.tokenizer: {hf_dir!r} has neither tokenizer.json nor '
                       'tokenizer.model')

    def special(kind):
      if model_cfg.get(f'{kind}_token_id') is not None:
        return int(_first(model_cfg[f'{kind}_token_id']))
      token = tok_cfg.get(f'{kind}_token')
      token = token.get('content') if isinstance(token, dict) else token
      found = lookup(token) if token else None
      if found is not None:
        return int(found)
      return own.get(kind, -1)

    self.BOS, self.EOS, self.PAD = special('bos'), special('eos'), special('pad')
    self._special = {i for i in (self.BOS, self.EOS, self.PAD) if i >= 0}
    ac = lookup(AC_TEXT)
    self.AC = int(ac) if ac is not None else self.vocab_size

  def _encode(self, text):
    if self._tok is not None:
      return self._tok.encode(text, add_special_tokens=False).ids
    return self._spm.encode(text)

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
    """int32 ids of `text` (no special tokens added but the BOS / EOS asked for; "<AC>" is
    the AC id)."""
    ids = []
    for i, piece in enumerate(text.split(AC_TEXT)):
      ids += [self.AC] * (i > 0) + (list(self._encode(piece)) if piece else [])
    return np.asarray([self.BOS] * bos + ids + [self.EOS] * eos, np.int32)

  def decode(self, ids) -> str:
    """Text of `ids`, special tokens (BOS / EOS / PAD, and any id >= vocab_size) dropped,
    AC as "<AC>"."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    pieces, piece = [], []
    for i in ids + [self.AC]:
      if i == self.AC:
        pieces.append(piece)
        piece = []
      elif 0 <= i < self.vocab_size and i not in self._special:
        piece.append(i)
    return AC_TEXT.join(self._decode(p) for p in pieces)

  def _decode(self, ids):
    if not ids:
      return ''
    if self._tok is not None:
      return self._tok.decode(ids, skip_special_tokens=True)
    return self._spm.decode(ids)


@functools.lru_cache(maxsize=8)
def get_tokenizer(spec: str = 'byte'):
  """The tokenizer named by a resolved `data.tokenizer` value ('byte' or 'hf:DIR'; an
  unresolved 'auto' is 'byte': training/config.py resolve makes it hf:DIR when it should be)."""
  if spec in ('byte', 'auto'):
    return ByteTokenizer()
  if spec.startswith('hf:'):
    return HFTokenizer(spec[len('hf:'):])
  raise SourceError(f"data.tokenizer: {spec!r} is not 'byte' or 'hf:DIR'")


def tokenizer_spec(tokenizer: str, init_from: str) -> str:
  """'auto' -> the hf:DIR of train.init_from when it is one, else 'byte'."""
  if tokenizer != 'auto':
    return tokenizer
  return init_from if init_from.startswith('hf:') else 'byte'


def sentence_end_ids(tokenizer) -> tuple:
  """The ids whose text ends a sentence: '.' or a newline last (trailing spaces aside); the
  byte tokenizer's are 10 and 46. AnSAN's EP anchors (models/anchor.py)."""
  return tuple(i for i in range(tokenizer.vocab_size)
               if tokenizer.decode([i]).rstrip(' ').endswith(('.', '\n')))
