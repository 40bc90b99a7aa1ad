"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then PAD, BOS, EOS and the <AC> anchor."""

import numpy as np

AC_TEXT = "<AC>"


class ByteTokenizer:
  """UTF-8 bytes plus four special ids. `decode(encode(s)) == s` for every str `s`."""

  PAD = 256
  BOS = 257
  EOS = 258
  AC = 259
  vocab_size = 260

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Returns int32 ids; the literal text "<AC>" becomes the AC id."""
    pieces = [_utf8_ids(part) for part in text.split(AC_TEXT)]
    ids = pieces[0]
    if len(pieces) > 1:
      ac = np.array([self.AC], np.int32)
      ids = np.concatenate([pieces[0]] + [x for p in pieces[1:] for x in (ac, p)])
    if bos or eos:
      ids = np.concatenate([[self.BOS]] * bos + [ids] + [[self.EOS]] * eos)
    return ids.astype(np.int32, copy=False)

  def decode(self, ids) -> str:
    """Drops PAD/BOS/EOS (and any id >= vocab_size), renders AC as "<AC>".

    Invalid byte sequences decode with errors='replace'.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids < 256) | (ids == self.AC)]
    chunks = np.split(ids, np.flatnonzero(ids == self.AC))
    # After the first chunk, each chunk starts with the AC id itself: drop it.
    parts = [_utf8_text(c if i == 0 else c[1:]) for i, c in enumerate(chunks)]
    return AC_TEXT.join(parts)


def _utf8_ids(text: str) -> np.ndarray:
  # surrogatepass: lone surrogates (legal in a Python str) survive the round trip.
  return np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int32)


def _utf8_text(byte_ids: np.ndarray) -> str:
  raw = byte_ids.astype(np.uint8).tobytes()
  try:
    return raw.decode("utf-8", "surrogatepass")
  except UnicodeDecodeError:
    return raw.decode("utf-8", "replace")
