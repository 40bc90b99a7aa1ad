"""Model FLOPs per token and the measured matmul peak (for MFU)."""
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx


def param_count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def train_flops_per_token(model, seq_len, loss_positions=0):
  """6 x (matmul parameters) + 3 x the mixers' own forward FLOPs (attention scores etc.).

  Embedding lookups are free; a tied table is also the output head, so it counts once.
  loss_positions k > 0 (train.loss_positions): the head runs at k of the seq_len positions.
  """
  n = param_count(nnx.state(model, nnx.Param))
  if not model.cfg.tie_embeddings:
    n -= math.prod(model.embed.shape)          # (an abstract model's table too)
  if loss_positions:
    n -= math.prod(model.embed.shape) * (1 - loss_positions / seq_len)   # the head's share
  mixer = sum(blk.mixer.flops_per_token(seq_len) for blk in model.blocks)
  return 6 * n + 3 * mixer


def measure_peak_flops(n=None, dtype=None, repeats=5):
  """FLOP/s of a large square matmul on device 0 (the achievable matmul peak)."""
  dev = jax.devices()[0]
  gpu = dev.platform != 'cpu'
  n = n or (8192 if gpu else 1024)
  dtype = dtype or (jnp.bfloat16 if gpu else jnp.float32)
  a = jax.device_put(jnp.ones((n, n), dtype), dev)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best
