"""Blockwise (flash-style) causal / sliding-window attention in pure JAX (attention_impl='chunked').

Dense attention materialises [B, heads, T, T] scores in the forward pass and again in the
backward pass; at 16K-64K context that does not fit. Here queries and keys are cut into
blocks of `block` tokens and each query block visits only the key blocks it can see (up
to the causal diagonal; for a sliding window only the ~window / block before it), with an
fp32 online softmax (running max and sum). The backward pass is hand-written
(`jax.custom_vjp`, FlashAttention-2 style): it recomputes each block's probabilities from
the saved log-sum-exp, so neither pass keeps anything larger than O(T * block).

Loops are `lax.fori_loop`s with dynamic bounds (the visible key range of each query
block), so the compiled program does not grow with T and skipped blocks cost nothing.
Key blocks that a query block sees in full (all but the diagonal and the window's edge)
skip the mask.

A per-token rule can narrow the causal mask further: `rule=(fn, info)` with info a dict of
[B, T] arrays and fn(info_q, info_k) -> bool [B, Q, C] (AnSAN's anchor mask, models/anchor.py).
A row it masks entirely (padding) gives zeros.

A persistent prefix `prefix=(q_raw, pk, pv)` (Titans' P learned tokens, position-free): P keys
every query sees, scored with its own query q_raw [B, T, N, H] (the unrotated one), in the
same softmax: each query block's online softmax starts from its prefix scores.

Layout inside: q/o [B, K, G, T, H] (G = N / K query heads per KV head), k/v [B, K, T, H].
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NEG_INF = -1e30


def chunked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, window=0, block=256, rule=None,
                      prefix=None):
  """Causal softmax attention over one contiguous chunk (positions 0..T-1), GQA.

  window > 0: key j is visible to query i iff i - window < j <= i (sliding window).
  rule: (fn, {name: [B, T]}): key j is also visible only where fn(info_q, info_k) holds.
  prefix: (q_raw [B, T, N, H], pk [K, P, H], pv [K, P, H]): always-visible keys (see above).
  T need not be a multiple of `block`: the chunk is padded at the end; padded keys are in
  the future of every real query, so causality masks them. Returns [B, T, N, H].
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  b = min(block, T)
  Tp = -(-T // b) * b
  pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
  groups = lambda x: pad(x).reshape(B, Tp, K, N // K, H).transpose(0, 2, 3, 1, 4)
  q_BxKxGxTxH = groups(q_BxTxNxH)
  if prefix is not None:
    prefix = (groups(prefix[0]), prefix[1].astype(q_BxTxNxH.dtype),
              prefix[2].astype(v_BxTxKxH.dtype))
  k_BxKxTxH = pad(k_BxTxKxH).transpose(0, 2, 1, 3)
  v_BxKxTxH = pad(v_BxTxKxH).transpose(0, 2, 1, 3)
  fn, info = rule or (None, {})
  info = {n: jnp.pad(a, ((0, 0), (0, Tp - T))) for n, a in info.items()}
  o_BxKxGxTxH = _flash(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, info, prefix, (window, fn), b)
  return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]


def _block(x, i, b, axis):
  """Block i (of b tokens) of x along `axis` (the token axis)."""
  return lax.dynamic_slice_in_dim(x, i * b, b, axis % x.ndim)


def _put(x, blk, i, b, axis):
  return lax.dynamic_update_slice_in_dim(x, blk.astype(x.dtype), i * b, axis % x.ndim)


def _visit(i, b, mask_spec, body, carry):
  """carry = body(j, carry, masked) over the key blocks j that query block i can see.

  None after the diagonal block; with a window none wholly before the first query's oldest
  visible key. Blocks that every query of block i sees in full run without the mask
  (masked=False): off the diagonal and inside the window, unless a per-token rule is set.
  """
  window, fn = mask_spec
  lo = 0 if not window else jnp.maximum(i * b - window + 1, 0) // b
  if fn is not None:
    full_lo = i
  elif window:               # the oldest pair (last query, first key) inside the window
    full_lo = jnp.clip((i * b + b - 1 - window) // b + 1, lo, i)
  else:
    full_lo = lo
  carry = lax.fori_loop(lo, full_lo, lambda j, c: body(j, c, True), carry)
  carry = lax.fori_loop(full_lo, i, lambda j, c: body(j, c, False), carry)
  return body(i, carry, True)


def _mask(i, j, b, mask_spec, info):
  """Visibility of key block j to query block i, shaped like the scores [B, K, G, Q, C]:
  [1, 1, 1, Q, C], or [B, 1, 1, Q, C] under a rule."""
  window, fn = mask_spec
  q_pos_Qx1 = i * b + jnp.arange(b)[:, None]
  k_pos_1xC = j * b + jnp.arange(b)[None, :]
  mask_QxC = k_pos_1xC <= q_pos_Qx1
  if window:
    mask_QxC &= q_pos_Qx1 - k_pos_1xC < window
  if fn is not None:
    mask_QxC = mask_QxC & fn({n: _block(a, i, b, -1) for n, a in info.items()},
                             {n: _block(a, j, b, -1) for n, a in info.items()})
  return mask_QxC.reshape((-1, 1, 1, b, b))


def _prefix_scores(qraw_BxKxGxQxH, pk_KxPxH):
  """Scores of a query block over the prefix keys, fp32 [B, K, G, Q, P]."""
  H = qraw_BxKxGxQxH.shape[-1]
  return jnp.einsum('bkgqh,kph->bkgqp', qraw_BxKxGxQxH, pk_KxPxH,
                    preferred_element_type=jnp.float32) * H ** -0.5


def _forward_block(q_BxKxGxQxH, k_BxKxTxH, v_BxKxTxH, info, prefix, i, b, mask_spec):
  """Online softmax of query block i over the prefix (if any) and its visible key blocks:
  out (fp32), lse. prefix: (this block's q_raw, pk, pv) or None."""
  H = q_BxKxGxQxH.shape[-1]

  def body(j, carry, masked):
    m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxH = carry
    s = jnp.einsum('bkgqh,bkch->bkgqc', q_BxKxGxQxH, _block(k_BxKxTxH, j, b, -2),
                   preferred_element_type=jnp.float32) * H ** -0.5
    if masked:
      mask = _mask(i, j, b, mask_spec, info)
      s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m_BxKxGxQ, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    if masked:   # a row with no visible key yet has m_new = NEG_INF, and exp(s - m_new) = 1
      p = jnp.where(mask, p, 0.)
    alpha = jnp.exp(m_BxKxGxQ - m_new)
    v_blk = _block(v_BxKxTxH, j, b, -2)
    pv = jnp.einsum('bkgqc,bkch->bkgqh', p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    return m_new, alpha * l_BxKxGxQ + p.sum(-1), alpha[..., None] * acc_BxKxGxQxH + pv

  shape = q_BxKxGxQxH.shape[:-1]
  if prefix is None:
    init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_BxKxGxQxH.shape, jnp.float32))
  else:                                  # the online softmax starts from the prefix keys
    qraw_blk, pk_KxPxH, pv_KxPxH = prefix
    s_p = _prefix_scores(qraw_blk, pk_KxPxH)
    m = s_p.max(-1)
    p = jnp.exp(s_p - m[..., None])
    init = (m, p.sum(-1), jnp.einsum('bkgqp,kph->bkgqh', p.astype(pv_KxPxH.dtype), pv_KxPxH,
                                     preferred_element_type=jnp.float32))
  m, l, acc = _visit(i, b, mask_spec, body, init)
  # l > 0 unless a rule masks the whole row (padding): that row gives 0, lse 0.
  seen = l > 0
  l = jnp.where(seen, l, 1.)
  return acc / l[..., None], jnp.where(seen, m + jnp.log(l), 0.)


def _prefix_block(prefix, i, b):
  """(query block i of q_raw, pk, pv), or None."""
  return None if prefix is None else (_block(prefix[0], i, b, -2),) + tuple(prefix[1:])


def _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, info, prefix, mask_spec, b):
  """All query blocks: out [B, K, G, T, H] (q's dtype) and the fp32 log-sum-exp [B, K, G, T]."""

  def body(i, carry):
    o, lse = carry
    o_blk, lse_blk = _forward_block(_block(q_BxKxGxTxH, i, b, -2), k_BxKxTxH, v_BxKxTxH,
                                    info, _prefix_block(prefix, i, b), i, b, mask_spec)
    return _put(o, o_blk, i, b, -2), _put(lse, lse_blk, i, b, -1)

  init = (jnp.zeros_like(q_BxKxGxTxH), jnp.zeros(q_BxKxGxTxH.shape[:-1], jnp.float32))
  return lax.fori_loop(0, q_BxKxGxTxH.shape[-2] // b, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, info, prefix, mask_spec, b):
  return _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, info, prefix, mask_spec, b)[0]


def _flash_fwd(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, info, prefix, mask_spec, b):
  o, lse = _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, info, prefix, mask_spec, b)
  return o, (q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, o, lse, info, prefix)


def _flash_bwd(mask_spec, b, residuals, do_BxKxGxTxH):
  """dq, dk, dv in one pass over query blocks: each (query block, visible key block) pair
  recomputes p = exp(s - lse), adds its dq to the query block's accumulator and its dk,
  dv into fp32 [B, K, T, H] buffers.

  Scores are formed key-major, [B, K, C, G, Q]: dk and dv then contract over the minor
  (G, Q) axes and need no transpose of the [C, G * Q] probabilities (on CPU, a transposing
  elementwise fusion costs more than the matmuls); dq is accumulated as [B, K, H, G, Q].
  With a prefix, each query block adds its d q_raw and its share of d pk, d pv.
  """
  q, k, v, o, lse_BxKxGxT, info, prefix = residuals
  H = q.shape[-1]
  delta_BxKxGxT = jnp.einsum('bkgth,bkgth->bkgt', do_BxKxGxTxH.astype(jnp.float32),
                             o.astype(jnp.float32))        # rowsum(dO * O) = sum_j p_j dp_j

  def q_body(i, carry):
    dq, dk, dv, dprefix = carry
    q_blk, do_blk = _block(q, i, b, -2), _block(do_BxKxGxTxH, i, b, -2)
    lse_Bx1xKxGxQ = _block(lse_BxKxGxT, i, b, -1)[:, :, None]
    delta_BxKx1xGxQ = _block(delta_BxKxGxT, i, b, -1)[:, :, None]

    def kv_body(j, inner, masked):
      dqT_blk, dk, dv = inner
      k_blk, v_blk = _block(k, j, b, -2), _block(v, j, b, -2)
      sT = jnp.einsum('bkch,bkgqh->bkcgq', k_blk, q_blk,
                      preferred_element_type=jnp.float32) * H ** -0.5
      pT = jnp.exp(sT - lse_Bx1xKxGxQ)
      if masked:
        maskT = _mask(i, j, b, mask_spec, info).transpose(0, 1, 4, 2, 3)   # [., 1, C, 1, Q]
        pT = jnp.where(maskT, pT, 0.)
      dpT = jnp.einsum('bkch,bkgqh->bkcgq', v_blk, do_blk, preferred_element_type=jnp.float32)
      dsT = pT * (dpT - delta_BxKx1xGxQ) * H ** -0.5           # d loss / d (q.k), fp32
      dqT_blk += jnp.einsum('bkch,bkcgq->bkhgq', k_blk, dsT.astype(k_blk.dtype),
                            preferred_element_type=jnp.float32)
      dk_blk = jnp.einsum('bkcgq,bkgqh->bkch', dsT.astype(q_blk.dtype), q_blk,
                          preferred_element_type=jnp.float32)
      dv_blk = jnp.einsum('bkcgq,bkgqh->bkch', pT.astype(do_blk.dtype), do_blk,
                          preferred_element_type=jnp.float32)
      dk = _put(dk, _block(dk, j, b, -2) + dk_blk, j, b, -2)
      dv = _put(dv, _block(dv, j, b, -2) + dv_blk, j, b, -2)
      return dqT_blk, dk, dv

    B, K, G, Q, _ = q_blk.shape
    init = (jnp.zeros((B, K, H, G, Q), jnp.float32), dk, dv)
    dqT_blk, dk, dv = _visit(i, b, mask_spec, kv_body, init)
    if prefix is not None:               # the prefix keys: p = exp(s_p - lse), as any key
      (qraw_blk, pk, pv), (dqraw, dpk, dpv) = _prefix_block(prefix, i, b), dprefix
      p_p = jnp.exp(_prefix_scores(qraw_blk, pk) - _block(lse_BxKxGxT, i, b, -1)[..., None])
      dp_p = jnp.einsum('bkgqh,kph->bkgqp', do_blk, pv, preferred_element_type=jnp.float32)
      ds_p = p_p * (dp_p - _block(delta_BxKxGxT, i, b, -1)[..., None]) * H ** -0.5
      dqraw_blk = jnp.einsum('bkgqp,kph->bkgqh', ds_p, pk.astype(jnp.float32))
      dprefix = (_put(dqraw, dqraw_blk, i, b, -2),
                 dpk + jnp.einsum('bkgqp,bkgqh->kph', ds_p, qraw_blk.astype(jnp.float32)),
                 dpv + jnp.einsum('bkgqp,bkgqh->kph', p_p, do_blk.astype(jnp.float32)))
    return _put(dq, dqT_blk.transpose(0, 1, 3, 4, 2), i, b, -2), dk, dv, dprefix

  zeros = lambda a: jnp.zeros(a.shape, jnp.float32)
  init = (zeros(q), zeros(k), zeros(v), None if prefix is None else tuple(map(zeros, prefix)))
  dq, dk, dv, dprefix = lax.fori_loop(0, q.shape[-2] // b, q_body, init)
  if prefix is not None:
    dprefix = tuple(d.astype(a.dtype) for d, a in zip(dprefix, prefix))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), info), dprefix)


_flash.defvjp(_flash_fwd, _flash_bwd)
