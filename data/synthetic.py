"""Synthetic long-context tasks on the byte tokenizer: passkey, multi-needle S-NIAH, MQAR, and
the token-level key -> value set of the NAMM CPU reproduction (specs/namm.md section 7):
kv (one key -> value pair among random filler, plus lone distractor keys), kv4 (four pairs, one
queried: the key must be bound to its value) and kvlocal (the queried pair among the last
tokens: a control that needs only recent tokens). Filler, keys and values each have their own
sub-vocabulary.

Each task maps (seed, length, ...) to `{'prompt': int32[length] (starts with BOS), 'answer': int32[A]}`
deterministically; the prompt is exactly `length` tokens (filler sentences, then space padding).

Held-out seed split: example `index` of base `seed` uses the generator seed
`2 * (seed * 2**32 + index) + (split == 'eval')`, so train seeds are even and eval seeds odd:
eval prompts are never trained on.
"""

import numpy as np

from data.tokenizer import ByteTokenizer
from data.sources import SourceError

TASKS = ("passkey", "niah", "mqar", "kv", "kv4", "kvlocal")
_TOK = ByteTokenizer()
_FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
    "There and back again.", "The river runs slowly to the sea.", "A bird sings in the tall tree.",
    "The old clock on the wall ticks on.", "Clouds drift over the quiet hills.",
    "The road is long and the night is cold.", "Bread is baked fresh every morning.",
    "Leaves fall gently in the autumn wind.", "The library closes at nine.",
    "A small boat waits by the shore.", "Snow covers the mountain peaks.",
    "The cat sleeps in the warm sunlight.",
)
_WORDS = (
    "amber", "breeze", "cobalt", "dune", "ember", "fjord", "granite", "harbor", "ivory", "juniper",
    "kestrel", "lantern", "meadow", "nebula", "orchid", "pepper", "quartz", "raven", "saffron",
    "tundra", "umber", "violet", "willow", "xenon", "yarrow", "zephyr",
)


def example_seed(seed: int, index: int, split: str) -> int:
  """The generator seed of example `index`: even for 'train', odd for 'eval' (disjoint)."""
  if split not in ("train", "eval"):
    raise SourceError(f"synthetic: split must be 'train' or 'eval', got {split!r}")
  return 2 * (seed * 2**32 + index) + (split == "eval")


def _rng(rng_or_seed) -> np.random.Generator:
  return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(
      rng_or_seed)


def _filler_with_needles(rng, n_bytes: int, needles: list[tuple[float, str]]) -> str:
  """`n_bytes` of filler sentences with each (depth, text) needle at the sentence boundary
  nearest to relative depth `depth`; space-padded at the end to the exact size."""
  budget = n_bytes - sum(len(t) for _, t in needles)
  sentences, used = [], 0
  while True:
    s = _FILLER[rng.integers(len(_FILLER))] + " "
    if used + len(s) > budget:
      break
    sentences.append(s)
    used += len(s)
  starts = np.cumsum([0] + [len(s) for s in sentences])  # sentence boundaries, in bytes
  at = {}  # boundary index -> needles inserted there
  for depth, text in needles:
    at.setdefault(int(np.argmin(np.abs(starts - depth * used))), []).append(text)
  out = []
  for i in range(len(sentences) + 1):
    out += at.get(i, [])
    if i < len(sentences):
      out.append(sentences[i])
  return "".join(out) + " " * (budget - used)


def _assemble(length: int, rng, needles, question: str, answer: str, task: str) -> dict:
  n_filler = length - 1 - len(question.encode()) - sum(len(t) for _, t in needles)
  if n_filler < 0:
    raise SourceError(f"synthetic {task}: prompt length {length} is too short for the needles and "
                     f"question (needs at least {length - n_filler})")
  text = _filler_with_needles(rng, n_filler + sum(len(t) for _, t in needles), needles) + question
  prompt = _TOK.encode(text, bos=True)
  assert len(prompt) == length, (len(prompt), length)
  return {"prompt": prompt, "answer": _TOK.encode(answer), "question": len(question.encode())}


def _passkey_parts(rng, depth=None):
  key = int(rng.integers(10000, 100000))
  depth = rng.uniform() if depth is None else depth
  needles = [(depth, f"The pass key is {key}. Remember it. ")]
  return needles, "What is the pass key? The pass key is", f" {key}"


def _niah_parts(rng, depth=None, n_needles=4):
  keys = [f"{a}-{b}" for a, b in rng.choice(_WORDS, size=(n_needles, 2))]
  keys = [f"{k}-{i}" if keys.count(k) > 1 else k for i, k in enumerate(keys)]  # unique
  values = rng.integers(1_000_000, 10_000_000, size=n_needles)
  query = int(rng.integers(n_needles))
  depths = rng.uniform(size=n_needles)
  depths[query] = rng.uniform() if depth is None else depth
  needles = [(float(d), f"The special magic number for {k} is {v}. ")
             for d, k, v in zip(depths, keys, values)]
  question = (f"What is the special magic number for {keys[query]}? "
              f"The special magic number for {keys[query]} is")
  return needles, question, f" {values[query]}"


def _mqar_parts(rng, n_pairs=16, n_queries=4):
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  keys = []
  while len(keys) < n_pairs:
    key = "".join(rng.choice(letters, size=4))
    if key not in keys:
      keys.append(key)
  values = rng.integers(1000, 10000, size=n_pairs)
  queries = rng.choice(n_pairs, size=n_queries, replace=False)
  pairs = "Memorize: " + ", ".join(f"{k}={v}" for k, v in zip(keys, values)) + ". "
  question = "Recall " + ", ".join(keys[q] for q in queries) + ":"
  return [(0.0, pairs)], question, "".join(f" {values[q]}" for q in queries)


_PARTS = {"passkey": _passkey_parts, "niah": _niah_parts, "mqar": _mqar_parts}

# Token-level key -> value tasks: filler letters, key letters and one-symbol values. Keys and
# values come in 4 matching groups (a key's value is drawn from its group's symbols).
_KV_FILL = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8).astype(np.int32)
_KV_KEYS = np.array_split(
    np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8).astype(np.int32), 4)
_KV_VALUES = np.array_split(
    np.frombuffer(b"0123456789!#$%&*+-/:;<=>@[]^_{|}", np.uint8).astype(np.int32), 4)
_KV_QUERY = ord("?")
_KV_LOCAL = 24          # kvlocal: the queried pair ends at most this many tokens before "?"
_KV = {"kv": dict(n_pairs=1, n_lone=2), "kv4": dict(n_pairs=4, n_lone=0),
       "kvlocal": dict(n_pairs=1, n_lone=2, local=True)}


def _kv_example(rng, length: int, depth=None, n_pairs=1, n_lone=2, local=False) -> dict:
  """BOS, random filler letters holding `n_pairs` needles "K v" (key letter, value symbol of
  the key's group; every pair from another group) and `n_lone` distractor keys without a
  value, then "?K" for the first pair's key; the answer is its value. The queried pair sits at
  relative `depth` of the filler (None: random; local: ending within the last `_KV_LOCAL`
  tokens), the others at random depths. With 4 pairs, one per group, the right needle is the
  one of the query's group: retrieval among distractors that needs no key -> value binding."""
  groups = rng.permutation(len(_KV_KEYS))[:n_pairs + n_lone]      # at most 4 items
  keys = [rng.choice(_KV_KEYS[g]) for g in groups]
  values = [rng.choice(_KV_VALUES[g]) for g in groups[:n_pairs]]
  items = [[k, v] for k, v in zip(keys, values)] + [[k] for k in keys[n_pairs:]]
  n_fill = length - 1 - 2 - 1 - sum(map(len, items))       # BOS, "?K", the answer
  if n_fill < _KV_LOCAL:
    raise SourceError(f"synthetic kv: length {length} is too short (needs "
                     f"{length - n_fill + _KV_LOCAL})")
  at = rng.integers(0, n_fill + 1, len(items))            # insertion points in the filler
  if local:
    at[0] = n_fill - rng.integers(0, _KV_LOCAL - 1)
  elif depth is not None:
    at[0] = round(depth * n_fill)
  filler = rng.choice(_KV_FILL, n_fill)
  body = []
  for i in range(n_fill + 1):
    for j in np.flatnonzero(at == i):
      body += items[j]
    if i < n_fill:
      body.append(filler[i])
  prompt = np.array([ByteTokenizer.BOS, *body, _KV_QUERY, keys[0]], np.int32)
  return {"prompt": prompt, "answer": np.array([values[0]], np.int32), "question": 2}


def passkey(rng_or_seed, length: int, depth: float | None = None) -> dict:
  """Filler with "The pass key is NNNNN. Remember it." at relative `depth` (None: random).

  The prompt ends with "What is the pass key? The pass key is"; the answer is " NNNNN".
  """
  rng = _rng(rng_or_seed)
  return _assemble(length, rng, *_passkey_parts(rng, depth), "passkey")


def niah(rng_or_seed, length: int, depth: float | None = None, n_needles: int = 4) -> dict:
  """Multi-needle S-NIAH: "The special magic number for KEY is VALUE." x n_needles; one queried.

  The queried needle sits at `depth` (None: random), the others at random depths. The prompt ends
  with "What is the special magic number for KEY? The special magic number for KEY is"; the answer
  is " VALUE" (7 digits).
  """
  rng = _rng(rng_or_seed)
  return _assemble(length, rng, *_niah_parts(rng, depth, n_needles), "niah")


def mqar(rng_or_seed, length: int, n_pairs: int = 16, n_queries: int = 4) -> dict:
  """Multi-query associative recall: "Memorize: abcd=1234, ... ." then filler, then
  "Recall KEY1, KEY2, ...:"; the answer is " V1 V2 ..." (4-digit values, in query order)."""
  rng = _rng(rng_or_seed)
  return _assemble(length, rng, *_mqar_parts(rng, n_pairs, n_queries), "mqar")


def make_example(task: str, seed: int, length: int, depth: float | None = None, **kwargs) -> dict:
  """One example of `task` whose prompt + answer is exactly `length` tokens.

  Same prompt as e.g. `passkey(seed, length - len(answer), depth)`.
  """
  if task in _KV:
    return _kv_example(np.random.default_rng(seed), length, depth, **_KV[task], **kwargs)
  if task not in _PARTS:
    raise SourceError(f"data.source: unknown synthetic task {task!r}; expected one of {TASKS}")
  if task != "mqar":
    kwargs["depth"] = depth
  rng = np.random.default_rng(seed)
  needles, question, answer = _PARTS[task](rng, **kwargs)
  return _assemble(length - len(answer.encode()), rng, needles, question, answer, task)


def make_task_batch(task: str, n: int, length: int, depth: float | None = 0.5, seed: int = 0,
                    split: str = "eval", **kwargs) -> dict:
  """`n` examples of `task` as one left-aligned batch of total length `length`.

  Returns:
    tokens_BxL: int32 [n, length]: prompt (BOS ...) then answer, PAD after (only if shorter).
    answer_mask_BxL: bool [n, length]: True at position t iff tokens_BxL[:, t+1] is an answer
      token, i.e. aligned with inputs = tokens_BxL[:, :-1] / targets = tokens_BxL[:, 1:]:
      use answer_mask_BxL[:, :-1]; an example is solved iff argmax(logits) == targets at every
      masked position (teacher forcing). The last column is always False.
    prompt_len_B: int32 [n], the prompt lengths (prompt = tokens_BxL[b, :prompt_len_B[b]]).
    question_len_B: int32 [n], how many of the prompt's last tokens are its question.
    answer_BxA: int32 [n, A], the answers (PAD-padded).
  `depth=None` draws a random depth per example (ignored by mqar). Example i uses
  `example_seed(seed, i, split)`; kwargs go to the task (n_needles; n_pairs, n_queries).
  """
  examples = [make_example(task, example_seed(seed, i, split), length, depth, **kwargs)
              for i in range(n)]
  n_answer = max(len(e["answer"]) for e in examples)
  tokens_BxL = np.full((n, length), ByteTokenizer.PAD, np.int32)
  answer_mask_BxL = np.zeros((n, length), bool)
  answer_BxA = np.full((n, n_answer), ByteTokenizer.PAD, np.int32)
  prompt_len_B = np.zeros(n, np.int32)
  question_len_B = np.array([e["question"] for e in examples], np.int32)
  for b, e in enumerate(examples):
    p, a = len(e["prompt"]), len(e["answer"])
    tokens_BxL[b, :p + a] = np.concatenate([e["prompt"], e["answer"]])
    answer_mask_BxL[b, p - 1:p + a - 1] = True
    answer_BxA[b, :a] = e["answer"]
    prompt_len_B[b] = p
  return {"tokens_BxL": tokens_BxL, "answer_mask_BxL": answer_mask_BxL,
          "prompt_len_B": prompt_len_B, "answer_BxA": answer_BxA,
          "question_len_B": question_len_B}


class SyntheticDocuments:
  """Random-access training source: item i is int32[length] tokens (prompt + answer) of `task`."""

  def __init__(self, task: str, length: int, split: str, seed: int = 0, size: int = 2**30,
               **kwargs):
    make_example(task, example_seed(seed, 0, split), length, **kwargs)  # validate early
    self.task, self.length, self.split, self.seed, self.size = task, length, split, seed, size
    self.kwargs = kwargs

  def __len__(self) -> int:
    return self.size

  def example(self, index: int) -> dict:
    """{'prompt', 'answer'} of item `index`."""
    return make_example(self.task, example_seed(self.seed, int(index), self.split), self.length,
                        **self.kwargs)

  def __getitem__(self, index: int) -> np.ndarray:
    e = self.example(index)
    return np.concatenate([e["prompt"], e["answer"]])


def synthetic_documents(task: str, length: int, split: str, seed: int = 0,
                        **kwargs) -> SyntheticDocuments:
  """Token arrays of exactly `length` for source 'synthetic:TASK' (random depth per example)."""
  return SyntheticDocuments(task, length, split, seed, **kwargs)
