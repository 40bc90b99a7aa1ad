"""grain input pipeline: token windows -> shuffle -> repeat -> shard by process -> batch.

Text sources are tokenized once per process into one flat token stream (each document as
BOS ... EOS, concatenated in source order; cached in-process) and cut into consecutive windows of
seq_len + 1 tokens (packing across documents, no PAD; the tail shorter than a window is dropped).
Window i is a random-access `grain.MapDataset` element, so the iterator state is just a position:
small, exact, checkpointable. The whole split is held in memory as uint16 (2 bytes per token; int32
for vocabularies over 65536 ids), so
tfds sources are limited to datasets that fit in host memory (a few GB of text).
'synthetic:TASK' sources yield one example (prompt + answer, random depth) per window;
'ruler:TASK,TASK,..' one RULER example in the run's tokenizer (training seeds; the answer
last), 'zoology:mqar' one Zoology MQAR example (data/zoology.py).
'mix:A+B+...' interleaves the windows of its parts round robin (e.g. the corpus with synthetic
long-context tasks: 'mix:stdlib+synthetic:passkey+synthetic:mqar').
"""

import functools
import logging

import grain
import numpy as np

from data import sources
from data import synthetic
from data import zoology
from data.hf_tokenizer import get_tokenizer
from data.sources import SourceError


@functools.lru_cache(maxsize=4)
def token_stream(source: str, split: str, tfds_data_dir: str | None = None,
                 tokenizer: str = "byte") -> np.ndarray:
  """All documents of `split` as one read-only stream: BOS doc EOS BOS doc EOS ...

  uint16, or int32 for vocabularies over 65536 ids (Llama 3); `tokenizer`: a resolved
  data.tokenizer value (data/hf_tokenizer.py).
  """
  tok = get_tokenizer(tokenizer)
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
  docs = sources.get_documents(source, split, tfds_data_dir)
  stream = np.concatenate(
      [tok.encode(docs[i], bos=True, eos=True).astype(dtype) for i in range(len(docs))])
  stream.flags.writeable = False
  return stream


class _Windows:
  """Random access to windows of `width` tokens: item i = {'tokens': int32[width],
  'weights': float32[width - 1]} (every target weighted 1)."""

  def __init__(self, stream: np.ndarray, width: int):
    self.stream, self.width = stream, width

  def __len__(self) -> int:
    return len(self.stream) // self.width

  def __getitem__(self, index: int) -> dict:
    start = int(index) * self.width
    return {"tokens": self.stream[start:start + self.width].astype(np.int32),
            "weights": np.ones(self.width - 1, np.float32)}


class _SyntheticWindows:
  """Item i = {'tokens': int32[width], 'weights': float32[width - 1]}, one synthetic example;
  with answer_loss only its answer targets weigh (1), else every target."""

  def __init__(self, documents: synthetic.SyntheticDocuments, answer_loss: bool = False):
    self.documents, self.answer_loss = documents, answer_loss

  def __len__(self) -> int:
    return len(self.documents)

  def __getitem__(self, index: int) -> dict:
    e = self.documents.example(index)
    tokens = np.concatenate([e["prompt"], e["answer"]])
    weights = np.ones(len(tokens) - 1, np.float32)
    if self.answer_loss:
      weights[:len(e["prompt"]) - 1] = 0.
    return {"tokens": tokens, "weights": weights}


class _RulerWindows:
  """Item i = {'tokens': int32[width], 'weights': float32[width - 1]}: a RULER example (data/
  ruler.py) of task tasks[i % n] in the run's tokenizer, as a training document: BOS, newline
  filler, the prompt, then its answer (' ' + the references joined by ', ', EOS) in the last
  tokens. Weights: the answer's targets, and with answer_loss=False the prompt's too (never
  the filler's). Seeds: train i, eval 3 x ruler.HELD_OUT + i (evaluate.py scores seeds
  from HELD_OUT, evolve.py's held-out sets from 2 x HELD_OUT): disjoint."""

  ANSWER_TOKENS = 48

  def __init__(self, tasks, width: int, split: str, tokenizer: str, answer_loss: bool = False):
    from data import ruler
    from data.ruler import HELD_OUT, filler_id
    self.ruler, self.tok = ruler, get_tokenizer(tokenizer)
    self.tasks, self.width, self.answer_loss = tasks, width, answer_loss
    self.first = 3 * HELD_OUT if split == "eval" else 0
    self.filler = filler_id(self.tok)
    if self.filler is None:
      raise SourceError(f"data.source: ruler: needs a one-token newline to pad with; "
                        f"{tokenizer} has none")
    self.example(0)                                     # a length too short fails here

  def __len__(self) -> int:
    return 1 << 30

  def example(self, index: int) -> dict:
    task = self.tasks[int(index) % len(self.tasks)]
    try:
      e = self.ruler.example(task, self.width, self.tok, self.first + int(index),
                             max_new_tokens=self.ANSWER_TOKENS)
    except ValueError as err:
      raise SourceError(f"data.source: ruler:{task}: {err}") from None
    eos = [self.tok.EOS] if self.tok.EOS >= 0 else []
    answer = np.concatenate([self.tok.encode(" " + ", ".join(e.references)), eos])
    answer = answer[:self.ANSWER_TOKENS].astype(np.int32)
    pad = self.width - len(e.prompt_ids) - len(answer)
    tokens = np.concatenate([e.prompt_ids[:1], np.full(pad, self.filler, np.int32),
                             e.prompt_ids[1:], answer])
    weights = np.zeros(self.width - 1, np.float32)
    weights[self.width - 1 - len(answer):] = 1.          # the targets that are the answer
    if not self.answer_loss:
      weights[pad:] = 1.                                 # and the prompt's (not the filler)
    return {"tokens": tokens, "weights": weights}

  __getitem__ = example


def is_text(source: str) -> bool:
  """Whether `source` is text only (it has a unigram baseline; synthetic and mixes do not)."""
  return not source.startswith(("synthetic:", "mix:", "zoology:", "ruler:"))


def pad_id(source: str, tokenizer: str) -> int:
  """The target id that never counts: the tokenizer's PAD; none (-1) for zoology:, whose ids
  are the task's own (any id in [0, vocab) is a token)."""
  return -1 if source.startswith("zoology:") else get_tokenizer(tokenizer).PAD


def _mix_parts(source: str) -> list:
  """The parts of a 'mix:A+B+...' source ([source] for any other)."""
  if not source.startswith("mix:"):
    return [source]
  parts = source[len("mix:"):].split("+")
  if len(parts) < 2 or any(p.startswith("mix:") for p in parts):
    raise SourceError(f"data.source: {source!r}: a mix needs two or more '+'-separated parts "
                     "(no nested mix:)")
  return parts


def _windows(source: str, split: str, width: int, tfds_data_dir=None, seed: int = 0,
             tokenizer: str = "byte", answer_loss: bool = False) -> grain.MapDataset:
  """The source's windows; a mix's parts interleaved round robin (grain's MapDataset.mix with
  equal weights: item i is item i // n of part i % n, as long as the shortest part)."""
  if source.startswith("mix:"):
    return grain.MapDataset.mix([_windows(p, split, width, tfds_data_dir, seed, tokenizer,
                                          answer_loss) for p in _mix_parts(source)])
  if source.startswith("ruler:"):
    return grain.MapDataset.source(_RulerWindows(source[len("ruler:"):].split(","), width,
                                                 split, tokenizer, answer_loss))
  if source.startswith("zoology:"):
    return grain.MapDataset.source(zoology.MQAR(width - 1, split, seed, **zoology.parse(source)))
  if source.startswith("synthetic:"):
    return grain.MapDataset.source(_SyntheticWindows(
        synthetic.synthetic_documents(source[len("synthetic:"):], width, split, seed),
        answer_loss))
  windows = _Windows(token_stream(source, split, tfds_data_dir, tokenizer), width)
  if not len(windows):
    raise SourceError(f"data.source: {source!r} split {split!r} has fewer than {width} tokens")
  return grain.MapDataset.source(windows)


def _local_batch(batch: int, process_count: int) -> int:
  if batch % process_count:
    raise ValueError(f"batch {batch} is not divisible by process_count {process_count}")
  return batch // process_count


def make_train_iterator(source: str, split: str, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        tfds_data_dir: str | None = None, tokenizer: str = "byte",
                        answer_loss: bool = False, read_threads: int = 2,
                        prefetch: int = 2) -> grain.DatasetIterator:
  """An endless, deterministic, checkpointable iterator of this process's batches.

  Yields {'tokens': int32 [global_batch // process_count, seq_len + 1], 'weights': float32
  [.., seq_len]}; inputs = [:, :-1], targets = [:, 1:], weights per target (answer_loss:
  only synthetic examples' answers count). Windows are shuffled with `seed` (reshuffled every
  epoch), then element j of
  the endless stream goes to process j % process_count, so processes see disjoint windows and
  global step k covers global elements [k * global_batch, (k + 1) * global_batch).
  Save/restore with `it.get_state()` / `it.set_state(state)` or grain.checkpoint.CheckpointSave.
  `read_threads` threads read up to `prefetch` batches ahead (grain's defaults, 16 and 500,
  held gigabytes of batches and kept a failed process alive for a minute).
  """
  local_batch = _local_batch(global_batch, process_count)
  windows = _windows(source, split, seq_len + 1, tfds_data_dir, seed, tokenizer, answer_loss)
  ds = windows.shuffle(seed=seed % 2**32).repeat()
  ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def _held_out_rows(source: str, seq_len: int, batch: int, n_batches: int, split: str,
                   tfds_data_dir, tokenizer, answer_loss: bool) -> dict:
  """{'tokens': int32 [total, seq_len + 1], 'weights': float32 [total, seq_len]}: the rows
  make_eval_batches describes, both fields from one pass over the source (total: batch *
  n_batches; n_batches 0: every window of a text source, then rows of weight 0 up to a
  multiple of `batch`)."""
  total = batch * n_batches
  if source.startswith("synthetic:"):
    b = synthetic.make_task_batch(source[len("synthetic:"):], total, seq_len + 1, split=split)
    weights = b["answer_mask_BxL"][:, :-1] if answer_loss else np.ones((total, seq_len))
    return {"tokens": b["tokens_BxL"], "weights": weights.astype(np.float32)}
  windows = _windows(source, split, seq_len + 1, tfds_data_dir, tokenizer=tokenizer,
                     answer_loss=answer_loss)
  n = len(windows)
  if not n_batches:
    index = np.arange(-(-n // batch) * batch) % n
  elif total <= n:
    # evenly spaced rounds; a mix takes every part in each round (a plain stride over the
    # round robin could land on one part only)
    k = len(_mix_parts(source))
    i = np.arange(total)
    index = (i // k) * (n // k) // -(-total // k) * k + i % k
  else:
    logging.warning("data: %s %s has %d windows of %d tokens < %d requested; repeating.",
                    source, split, n, seq_len + 1, total)
    index = np.arange(total) % n
  rows = [windows[i] for i in index]
  out = {f: np.stack([r[f] for r in rows]) for f in ("tokens", "weights")}
  if not n_batches:
    out["weights"][n:] = 0.                        # the repeats that pad the last batch
  return out


def make_eval_pairs(source: str, seq_len: int, batch: int, n_batches: int,
                    split: str = "eval", process_index: int = 0, process_count: int = 1,
                    tfds_data_dir: str | None = None, tokenizer: str = "byte",
                    answer_loss: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
  """`n_batches` fixed (tokens, weights) pairs from the held-out split: int32 [batch //
  process_count, seq_len + 1] and their float32 target weights [.., seq_len] (see
  make_train_iterator).

  Text sources: batch * n_batches windows evenly spaced over the split (in order; if the split has
  fewer windows, they repeat cyclically, with a warning); n_batches 0: every window of the split
  once (the last batch padded with rows of weight 0); mixes: each part in turn. Synthetic
  sources: eval-seed examples 0, 1, ... (depth 0.5). Row r of global batch k goes to process
  r % process_count.
  """
  _local_batch(batch, process_count)  # validates divisibility
  rows = _held_out_rows(source, seq_len, batch, n_batches, split, tfds_data_dir, tokenizer,
                        answer_loss)
  local = lambda a: [b[process_index::process_count] for b in a.reshape(-1, batch, a.shape[1])]
  return list(zip(local(rows["tokens"]), local(rows["weights"])))


def make_eval_batches(source: str, seq_len: int, batch: int, n_batches: int,
                      **kwargs) -> list[np.ndarray]:
  """The token arrays of make_eval_pairs: `n_batches` int32 [batch // process_count,
  seq_len + 1]."""
  return [tokens for tokens, _ in make_eval_pairs(source, seq_len, batch, n_batches, **kwargs)]


def unigram_entropy(source: str, split: str = "eval", tfds_data_dir: str | None = None,
                    tokenizer: str = "byte") -> float:
  """Cross-entropy (nats/token) of `split` under add-one-smoothed train-split token frequencies.

  The baseline a trained model must beat (about 3.28 nats for 'stdlib' on Python 3.11.7).
  """
  if not is_text(source):
    raise ValueError("unigram_entropy: defined for text sources only")
  tok = get_tokenizer(tokenizer)
  vocab = max(tok.vocab_size, tok.AC + 1)         # <AC> (ac: sources) may be one past the ids
  counts = lambda split: _token_counts(token_stream(source, split, tfds_data_dir, tokenizer), vocab)
  train_counts = counts("train").astype(np.float64) + 1.0
  log_p = np.log(train_counts / train_counts.sum())
  eval_counts = counts(split)
  return float(-(eval_counts * log_p).sum() / eval_counts.sum())


def _token_counts(stream: np.ndarray, vocab: int, block: int = 1 << 20) -> np.ndarray:
  """np.bincount over `stream` block by block: one pass over the whole stream widens it to
  int64 in a fresh temporary (8 bytes a token), and touching that much new memory took
  1.7-2.1 s for the 31M-token stdlib stream, against 0.15 s in blocks of 1M tokens."""
  return sum((np.bincount(stream[i:i + block], minlength=vocab)
              for i in range(0, len(stream), block)), np.zeros(vocab, np.int64))
