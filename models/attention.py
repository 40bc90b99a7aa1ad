"""Causal / sliding-window attention with GQA, RoPE and a static-shape KV cache.

The cache is a set of slots per (batch row, KV head): keys, values, the absolute
position of the token in each slot, and a validity bit. Slot order carries no
meaning: attention masks by absolute positions, so eviction only clears validity
bits and new tokens are written into free (or, when full, the oldest) slots.
Eviction policies see the attention probabilities of the new queries over the
slots and return a keep mask (see models/eviction.py).
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import registry
from models.layers import constrain, param, rope, rope_scaling
from models.ops.attention import attention, concat_kv


@struct.dataclass
class KVCache(registry.KVState):
  k_BxKxSxH: jax.Array
  v_BxKxSxH: jax.Array
  pos_BxKxS: jax.Array          # int32 absolute positions (-1 in empty slots)
  valid_BxKxS: jax.Array        # bool
  token_state: Any = None       # policy's per-slot arrays [B, K, S, ...]: reset on write
  policy_state: Any = None      # policy's other state (buffers, counters)

  @classmethod
  def empty(cls, batch, kv_heads, capacity, head_dim, dtype=jnp.float32):
    shape = (batch, kv_heads, capacity)
    return cls(jnp.zeros(shape + (head_dim,), dtype), jnp.zeros(shape + (head_dim,), dtype),
               jnp.full(shape, -1, jnp.int32), jnp.zeros(shape, bool))

  @property
  def capacity(self):
    return self.pos_BxKxS.shape[-1]

  def size_BxK(self):
    """Number of cached tokens per (batch row, KV head)."""
    return self.valid_BxKxS.sum(-1)

  def token_bytes(self):
    """Bytes of one cached token of this layer: (k, v) x kv_heads x head_dim x itemsize."""
    return 2 * self.k_BxKxSxH.shape[1] * self.k_BxKxSxH.shape[3] * self.k_BxKxSxH.dtype.itemsize


def _scatter(buf_BxKxS_, slots_BxKxT, new_BxKxT_):
  set_one = lambda b, i, n: b.at[i].set(n)
  return jax.vmap(jax.vmap(set_one))(buf_BxKxS_, slots_BxKxT, new_BxKxT_)


def write(cache: KVCache, k_BxKxTxH, v_BxKxTxH, pos_BxT):
  """Writes T new tokens into free slots (the oldest ones when full). Returns cache, slots."""
  if k_BxKxTxH.shape[2] > cache.capacity:                 # only the newest S can stay
    S = cache.capacity
    k_BxKxTxH, v_BxKxTxH, pos_BxT = k_BxKxTxH[:, :, -S:], v_BxKxTxH[:, :, -S:], pos_BxT[:, -S:]
  B, K, T, _ = k_BxKxTxH.shape
  priority_BxKxS = jnp.where(cache.valid_BxKxS, cache.pos_BxKxS, -1)
  if T == 1:                                               # decode: argmin, not a sort
    slots_BxKxT = priority_BxKxS.argmin(-1)[..., None].astype(jnp.int32)
  else:
    _, slots_BxKxT = jax.lax.top_k(-priority_BxKxS, T)    # free slots first, then oldest
  pos_BxKxT = jnp.broadcast_to(pos_BxT[:, None, :], (B, K, T)).astype(jnp.int32)
  token_state = jax.tree.map(
      lambda s: _scatter(s, slots_BxKxT, jnp.zeros((B, K, T) + s.shape[3:], s.dtype)),
      cache.token_state)
  cache = cache.replace(
      k_BxKxSxH=_scatter(cache.k_BxKxSxH, slots_BxKxT, k_BxKxTxH.astype(cache.k_BxKxSxH.dtype)),
      v_BxKxSxH=_scatter(cache.v_BxKxSxH, slots_BxKxT, v_BxKxTxH.astype(cache.v_BxKxSxH.dtype)),
      pos_BxKxS=_scatter(cache.pos_BxKxS, slots_BxKxT, pos_BxKxT),
      valid_BxKxS=_scatter(cache.valid_BxKxS, slots_BxKxT, jnp.ones((B, K, T), bool)),
      token_state=token_state)
  return cache, slots_BxKxT


class Attention(nnx.Module):
  """Multi-head causal attention with GQA and RoPE; `window` > 0 makes it sliding-window.

  Mixer contract: (x_BxTxD, state, pos_BxT) -> (y_BxTxD, state). State is a KVCache of
  the tokens before this chunk (capacity 0: a single-chunk training forward).
  """

  def __init__(self, cfg, *, window=0, rngs):
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.n_heads, self.kv_heads, self.head_dim = N, K, H
    self.window, self.rope_theta = window, cfg.rope_theta
    self.rope_scaling = rope_scaling(cfg)        # None or a hashable tuple (models/layers.py)
    self.impl, self.block = cfg.attention_impl, cfg.attention_block
    self.wq = param(rngs, (D, N, H), ('embed', 'heads', 'head_dim'), scale=D ** -0.5)
    self.wk = param(rngs, (D, K, H), ('embed', 'kv_heads', 'head_dim'), scale=D ** -0.5)
    self.wv = param(rngs, (D, K, H), ('embed', 'kv_heads', 'head_dim'), scale=D ** -0.5)
    self.wo = param(rngs, (N, H, D), ('heads', 'head_dim', 'embed'), scale=(N * H) ** -0.5)

  def init_state(self, batch, capacity, dtype=jnp.float32):
    if self.window:
      capacity = min(capacity, self.window)
    return KVCache.empty(batch, self.kv_heads, capacity, self.head_dim, dtype)

  def flops_per_token(self, seq_len):
    """Forward FLOPs per token of scores + weighted values (causal: keys actually seen)."""
    seen = [min(p + 1, self.window or p + 1) for p in range(seq_len)]
    return 4 * self.n_heads * self.head_dim * sum(seen) / seq_len

  def qkv(self, x_BxTxD, pos_BxT):
    dt = x_BxTxD.dtype
    q = jnp.einsum('btd,dnh->btnh', x_BxTxD, self.wq[...].astype(dt))
    k = jnp.einsum('btd,dkh->btkh', x_BxTxD, self.wk[...].astype(dt))
    v = jnp.einsum('btd,dkh->btkh', x_BxTxD, self.wv[...].astype(dt))
    q = rope(q, pos_BxT, self.rope_theta, self.rope_scaling)
    k = rope(k, pos_BxT, self.rope_theta, self.rope_scaling)
    q = constrain(q, ('batch', 'seq', 'heads', 'head_dim'))
    k = constrain(k, ('batch', 'seq', 'kv_heads', 'head_dim'))
    return q, k, v

  def out(self, o_BxTxNxH):
    return jnp.einsum('btnh,nhd->btd', o_BxTxNxH, self.wo[...].astype(o_BxTxNxH.dtype))

  def __call__(self, x_BxTxD, cache: KVCache, pos_BxT, *, policy=None, tokens_BxT=None):
    q, k, v = self.qkv(x_BxTxD, pos_BxT)
    k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if cache.capacity == 0 and policy is None:      # one chunk, positions 0..T-1: any backend
      return self.out(attention(q, k_new, v_new, impl=self.impl, block=self.block,
                                window=self.window)), cache
    T = x_BxTxD.shape[1]
    k_all, v_all, pos_all, valid_all = concat_kv(cache.k_BxKxSxH, cache.v_BxKxSxH,
                                                 cache.pos_BxKxS, cache.valid_BxKxS, k_new,
                                                 v_new, pos_BxT)
    o, probs_BxKxTxS_T = attention(q, k_all, v_all, q_pos_BxT=pos_BxT, k_pos_BxKxS=pos_all,
                                   k_valid_BxKxS=valid_all, window=self.window,
                                   return_probs=True)
    if cache.capacity == 0:
      return self.out(o), cache
    cache, slots_BxKxT = write(cache, k_new, v_new, pos_BxT)
    if policy is not None:
      # Attention of the new queries over the cache slots (new tokens moved to their slots).
      S, W = cache.capacity, slots_BxKxT.shape[-1]          # W = min(T, S) tokens written
      onehot_BxKxWxS = jax.nn.one_hot(slots_BxKxT, S, dtype=probs_BxKxTxS_T.dtype)
      written_BxKx1xS = onehot_BxKxWxS.sum(2, keepdims=True) > 0
      probs_BxKxTxS = jnp.where(written_BxKx1xS, 0., probs_BxKxTxS_T[..., :S]) + jnp.einsum(
          'bkqw,bkws->bkqs', probs_BxKxTxS_T[..., S + T - W:], onehot_BxKxWxS)
      keep_BxKxS, cache = policy.keep(cache, probs_BxKxTxS, pos_BxT)
      cache = cache.replace(valid_BxKxS=cache.valid_BxKxS & keep_BxKxS)
    return self.out(o), cache


def _validate_sliding(cfg):
  registry.check(cfg.model.window >= 1, 'model.window', 'sliding-window attention needs window >= 1')


registry.register_mixer('attention', Attention, state=KVCache)
registry.register_mixer('sliding', lambda cfg, rngs: Attention(cfg, window=cfg.window, rngs=rngs),
                        state=KVCache, validate=_validate_sliding)
