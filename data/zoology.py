"""Zoology's multi-query associative recall (MQAR), written from the paper's description
(Arora, Eyuboglu et al. 2023, "Zoology: Measuring and improving recall in efficient language
models", section 3 and appendix). The data source 'zoology:mqar[:KEY=VALUE,...]' (KEY: vocab
8192, pairs 8, power_a 0.01, train_examples 100000, test_examples 3000; the sequence length T
is data.seq_len; model.vocab_size must hold vocab).

One example of T + 1 tokens (T inputs, the targets shifted by one):
- the first 2P tokens are P key/value pairs k1 v1 k2 v2 ..., keys drawn without replacement
  from [1, V/2) and values from [V/2, V) (both unique within the example);
- the rest holds the P keys again as queries, key i at offset 2P + 2 g_i, where the gaps g_i
  are drawn without replacement from {0, .., S - 1} (S = (T - 2P) / 2) with probability
  proportional to a * i^(a - 1), i = g + 1 (a power law; a = 0.01 puts most queries soon after
  the pairs and some far away); the target after each query is its value;
- every other position is a uniform random token of [0, V) (Zoology's random_non_queries).
The loss and the accuracy count the P queried values only (weights 1 there, 0 elsewhere).

Deviation: here the value also stands in the input right after its query (the LM format's
targets are the next inputs), where Zoology's input has a random token there. Each key is
queried once, but a later query can rule out the values already answered: without the
key -> value binding a model scores the mean of 1/P, .., 1/1 here (0.52 for 4 pairs) against
1/P in Zoology; solving the task (0.99) needs the binding in both (bench/zoology_page.py).

Splits: example `index` of base `seed` uses the generator seed of data/synthetic.example_seed
(train seeds even, eval seeds odd: test examples are never trained on); train has
`train_examples` examples (the budget, cycled by epochs), eval `test_examples`.
"""
import functools

import numpy as np

from data.synthetic import example_seed


@functools.lru_cache(maxsize=64)
def gap_probabilities(space: int, power_a: float) -> np.ndarray:
  """p(g) for g in 0..space-1: proportional to power_a * (g + 1) ** (power_a - 1)."""
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  return p / p.sum()


def check(seq_len: int, vocab: int, pairs: int) -> None:
  """ValueError naming what does not fit (the config validation names the key)."""
  if seq_len % 2:
    raise ValueError(f'seq_len {seq_len} must be even')
  if vocab <= seq_len or vocab < 4:
    raise ValueError(f'vocab {vocab} must exceed seq_len {seq_len}')
  if pairs < 1 or 4 * pairs > seq_len:
    raise ValueError(f'{pairs} pairs need 4 x pairs <= seq_len {seq_len} (the pairs, then '
                     'room for as many query slots)')
  if pairs > vocab // 2 - 1:
    raise ValueError(f'{pairs} pairs need as many distinct keys; vocab {vocab} has '
                     f'{vocab // 2 - 1}')


def example(rng: np.random.Generator, seq_len: int, vocab: int = 8192, pairs: int = 8,
            power_a: float = 0.01) -> dict:
  """{'tokens': int32[seq_len + 1], 'weights': float32[seq_len] (1 at the queried values'
  targets)}."""
  T, V, P = seq_len, vocab, pairs
  half = V // 2
  keys = rng.choice(np.arange(1, half), size=P, replace=False)
  values = rng.choice(np.arange(half, V), size=P, replace=False)
  tokens = rng.integers(0, V, size=T + 1)
  tokens[0:2 * P:2], tokens[1:2 * P:2] = keys, values
  space = (T - 2 * P) // 2
  gaps = rng.choice(space, size=P, replace=False, p=gap_probabilities(space, power_a))
  at = 2 * P + 2 * gaps                        # the query's input position
  tokens[at], tokens[at + 1] = keys, values
  weights = np.zeros(T, np.float32)
  weights[at] = 1.                             # the target at input position `at` is tokens[at + 1]
  return {'tokens': tokens.astype(np.int32), 'weights': weights}


class MQAR:
  """Random access to a split's examples (grain MapDataset source): item i = example(...)."""

  def __init__(self, seq_len: int, split: str, seed: int = 0, vocab: int = 8192, pairs: int = 8,
               power_a: float = 0.01, train_examples: int = 100_000, test_examples: int = 3_000):
    check(seq_len, vocab, pairs)
    self.seq_len, self.split, self.seed = seq_len, split, seed
    self.kwargs = dict(vocab=vocab, pairs=pairs, power_a=power_a)
    self.size = train_examples if split == 'train' else test_examples

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng(example_seed(self.seed, int(index), self.split))
    return example(rng, self.seq_len, **self.kwargs)


PARAMS = dict(vocab=int, pairs=int, power_a=float, train_examples=int, test_examples=int)


def parse(source: str) -> dict:
  """'zoology:mqar[:KEY=VALUE,...]' -> MQAR's keyword arguments (KEY one of PARAMS); ValueError
  naming what is wrong."""
  name, _, args = source[len('zoology:'):].partition(':')
  if name != 'mqar':
    raise ValueError(f"unknown Zoology task {name!r}: only 'mqar'")
  out = {}
  for item in filter(None, args.split(',')):
    key, eq, value = item.partition('=')
    if not eq or key not in PARAMS:
      raise ValueError(f'{item!r}: expected KEY=VALUE with KEY one of {sorted(PARAMS)}')
    try:
      out[key] = PARAMS[key](value)
    except ValueError:
      raise ValueError(f'{item!r}: {value!r} is not a {PARAMS[key].__name__}') from None
  return out
