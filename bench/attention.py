"""Attention alone, fwd + bwd: time and XLA temporary memory of attention_impl xla vs chunked.

  python bench/attention.py --lengths=2048,8192,32768 --heads=4 --head_dim=32 --block=256

Prints a markdown table (no results page: this is a kernel check, not a model benchmark).
Memory is `compiled.memory_analysis().temp_size_in_bytes` (XLA's scratch for the whole
fwd + bwd program); a program whose temporaries exceed --max_run_gib is compiled and
reported but not run.
"""
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from models.ops.chunked import chunked_attention

_LENGTHS = flags.DEFINE_string('lengths', '2048,8192,32768', 'Context lengths.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Query heads (= KV heads).')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 32, 'Head dimension.')
_BLOCK = flags.DEFINE_integer('block', 256, 'chunked: block size.')
_WINDOW = flags.DEFINE_integer('window', 0, 'Sliding window (0: causal).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs (after one warm-up); the median.')
_MAX_RUN_GIB = flags.DEFINE_float('max_run_gib', 8.0, 'Compile only above this many GiB.')


def impls(window, block):
  dense_window = (window - 1, 0) if window else None
  return {
      'xla': lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=dense_window),
      'chunked': lambda q, k, v: chunked_attention(q, k, v, window=window, block=block),
  }


def measure(attention, T):
  """(temp GiB, median fwd+bwd seconds or None when too big to run)."""
  shape = (1, T, _HEADS.value, _HEAD_DIM.value)
  loss = lambda q, k, v: attention(q, k, v).sum()
  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  compiled = step.lower(*[jax.ShapeDtypeStruct(shape, jnp.float32)] * 3).compile()
  temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
  if temp_gib > _MAX_RUN_GIB.value:
    return temp_gib, None
  q, k, v = jax.random.normal(jax.random.key(0), (3,) + shape)
  jax.block_until_ready(compiled(q, k, v))
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - t0)
  return temp_gib, sorted(times)[len(times) // 2]


def main(argv):
  del argv
  print(f'B=1 heads={_HEADS.value} head_dim={_HEAD_DIM.value} block={_BLOCK.value} '
        f'window={_WINDOW.value} fp32, {jax.devices()[0].device_kind}, jax {jax.__version__}\n')
  print('| T | impl | fwd+bwd s | XLA temp GiB |\n|---|---|---|---|')
  for T in map(int, _LENGTHS.value.split(',')):
    for name, attention in impls(_WINDOW.value, _BLOCK.value).items():
      temp_gib, seconds = measure(attention, T)
      timing = f'{seconds:.3f}' if seconds is not None else f'not run (> {_MAX_RUN_GIB.value} GiB)'
      print(f'| {T} | {name} | {timing} | {temp_gib:.3f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
