"""One attention op for every mixer: backends (model.attention_impl), masks, the KV append.

Layout: q [B, T, N, H]; k, v [B, K, S, H] (the KV cache's layout, on every path); the N query
heads share the K KV heads in groups of G = N / K (GQA).

Contiguous path (no positions, mask or probabilities asked for): causal self-attention
of one chunk at positions 0..T-1 (S == T), an optional sliding window and an optional per-token
rule=(fn, info) (models/ops/chunked.py; AnSAN's anchor mask). `impl` picks the backend:
  xla      jax.nn.dot_product_attention(implementation='xla'), is_causal / local_window_size;
           with a rule, the dense [B, 1, T, T] mask of fn over the whole chunk.
  cudnn    the same with implementation='cudnn' (GPU; bf16 / fp16 only; an odd T is padded by
           one future token). It gets no rule: with one, resolve_impl falls back to xla.
  chunked  models.ops.chunked: blockwise, O(T * block) memory; rules block by block.
  splash   the TPU Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu), causal or
           local mask; off TPU it runs in Pallas interpret mode (tests). Its masks are static,
           so a data-dependent rule cannot be expressed: with one, resolve_impl falls back to
           chunked (same math, same O(T * block) memory).
  masked   the dense einsum below (fp32 softmax): the reference every backend is tested against.
  auto     the fastest correct backend (resolve_impl): chunked on CPU; on GPU cudnn for bf16 /
           fp16 without a rule, else xla; splash on TPU (chunked with a rule).

General path (q_pos / k_pos, an explicit mask or return_probs): the dense masked einsum
whatever `impl` is: eviction policies read the probabilities, and caches with holes, AnSAN's
cached mask and Titans' [causal | causal] segment mask are arbitrary masks. Titans' persistent
prefix (keys every query sees, scored with the unrotated query) runs on chunked in a
contiguous chunk, else on the dense path (dot_product_attention and splash cannot take it).

A query row with no visible key (AnSAN padding) gives zeros on every backend: chunked and the
einsum do so by construction; dot_product_attention (xla, cudnn) returns the mean of V there,
so its rows are zeroed; splash gets no rule, and a causal row always sees its own key.
"""
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from models.ops.chunked import chunked_attention

NEG_INF = -1e30
IMPLS = ('auto', 'xla', 'cudnn', 'chunked', 'splash', 'masked')
LANES = 128                                  # splash's block sizes are multiples of a TPU lane


def resolve_impl(impl, dtype, has_rule=False, platform=None):
  """The backend `impl` runs on `platform` (default: jax's default backend) for `dtype`:
  'auto' picks the fastest correct one; cudnn and splash fall back when has_rule."""
  if impl not in IMPLS:
    raise ValueError(f'model.attention_impl={impl!r} not {"|".join(IMPLS)}')
  platform = platform or jax.default_backend()
  if impl == 'auto':
    if platform in ('gpu', 'cuda'):
      impl = 'cudnn' if jnp.dtype(dtype).name in ('bfloat16', 'float16') else 'xla'
    else:
      impl = 'splash' if platform == 'tpu' else 'chunked'
  if has_rule:
    impl = {'cudnn': 'xla', 'splash': 'chunked'}.get(impl, impl)
  return impl


def position_mask(q_pos_BxT, k_pos_BxKxS, k_valid_BxKxS, window=0):
  """mask[b, k, t, s]: key s is valid, not in the future of query t, and inside the window."""
  q = q_pos_BxT[:, None, :, None]
  k = k_pos_BxKxS[:, :, None, :]
  mask = k_valid_BxKxS[:, :, None, :] & (k <= q)
  if window:
    mask &= (q - k) < window
  return mask


def attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, *, impl='auto', block=256, window=0, rule=None,
              q_pos_BxT=None, k_pos_BxKxS=None, k_valid_BxKxS=None, mask_BxKxTxS=None,
              prefix=None, return_probs=False):
  """Softmax attention (GQA). Returns out [B, T, N, H]; with return_probs (out, probs
  [B, K, T, S]), probs averaged over the query heads of each KV group.

  Contiguous path: key j is visible to query i iff j <= i, i - j < window (window > 0) and
  fn(info_q, info_k) (rule). Backend: resolve_impl(impl, q dtype, rule given); `block` is the
  chunked and splash block (splash: rounded up to a multiple of 128).
  General path: key s is visible to query t iff k_valid (default all) and k_pos <= q_pos (and
  q_pos - k_pos < window) where positions are given, and mask_BxKxTxS where given (K may be 1);
  with neither, the contiguous mask. Dense einsum for every impl.
  prefix=(q_raw_BxTxNxH, pk_KxPxH, pv_KxPxH): P keys every query sees, scored with q_raw (the
  unrotated query), one softmax over [prefix || keys]; probs are those of the S keys. A
  prefix on a contiguous chunk runs on chunked (the online softmax starts from it), on the
  general path for the other backends.
  """
  if (q_pos_BxT is None) != (k_pos_BxKxS is None) or (
      k_valid_BxKxS is not None and k_pos_BxKxS is None):
    raise ValueError('attention: q_pos_BxT and k_pos_BxKxS (and k_valid_BxKxS) go together')
  explicit = k_pos_BxKxS is not None or mask_BxKxTxS is not None
  if rule is not None and explicit:
    raise ValueError('attention: a rule applies to a contiguous chunk; with positions or a '
                     'mask, put it in mask_BxKxTxS')
  impl = resolve_impl(impl, q_BxTxNxH.dtype, rule is not None)
  if explicit or return_probs or impl == 'masked' or (prefix is not None and impl != 'chunked'):
    if explicit:
      mask = mask_BxKxTxS
      if k_pos_BxKxS is not None:
        valid = jnp.ones(k_pos_BxKxS.shape, bool) if k_valid_BxKxS is None else k_valid_BxKxS
        seen = position_mask(q_pos_BxT, k_pos_BxKxS, valid, window)
        mask = seen if mask is None else seen & mask
    else:
      mask = _chunk_mask(q_BxTxNxH.shape[1], window, rule)
    out, probs = _dense(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask, prefix)
    return (out, probs) if return_probs else out
  if impl == 'chunked':
    return chunked_attention(q_BxTxNxH, k_BxKxSxH.transpose(0, 2, 1, 3),
                             v_BxKxSxH.transpose(0, 2, 1, 3), window=window, block=block,
                             rule=rule, prefix=prefix)
  if impl == 'splash':
    return _splash(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, window, block)
  return _dot_product(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, impl, window, rule)


def concat_kv(cache_k_BxKxSxH, cache_v_BxKxSxH, cache_pos_BxKxS, cache_valid_BxKxS,
              k_new_BxKxTxH, v_new_BxKxTxH, pos_BxT, valid_BxT=None):
  """A cache's S slots followed by a chunk's T new tokens, for `attention`'s general path:
  (k, v [B, K, S + T, H] in the new keys' dtype, pos, valid [B, K, S + T]).
  valid_BxT: which new tokens are real (AnSAN: not padding); default all."""
  B, K, T, _ = k_new_BxKxTxH.shape
  per_head = lambda a_BxT: jnp.broadcast_to(a_BxT[:, None], (B, K, T))
  valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else valid_BxT
  return (jnp.concatenate([cache_k_BxKxSxH.astype(k_new_BxKxTxH.dtype), k_new_BxKxTxH], 2),
          jnp.concatenate([cache_v_BxKxSxH.astype(v_new_BxKxTxH.dtype), v_new_BxKxTxH], 2),
          jnp.concatenate([cache_pos_BxKxS, per_head(pos_BxT).astype(cache_pos_BxKxS.dtype)], 2),
          jnp.concatenate([cache_valid_BxKxS, per_head(valid_BxT)], 2))


def _chunk_mask(T, window, rule):
  """The contiguous chunk's mask [B or 1, 1, T, T]: causal (sliding), narrowed by the rule."""
  pos_T = jnp.arange(T)
  mask = position_mask(pos_T[None], pos_T[None, None], jnp.ones((1, 1, T), bool), window)
  if rule is not None:
    fn, info = rule
    mask = mask & fn(info, info)[:, None]
  return mask


def _dense(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxKxTxS, prefix):
  """Masked softmax (fp32) over [prefix || keys] (GQA). Rows with no visible key give zeros,
  not NaN.
  Returns out [B, T, N, H] and the keys' probs [B, K, T, S] (mean over each group)."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxKxSxH.shape[1]
  groups = lambda x: x.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  logits = jnp.einsum('bkgth,bksh->bkgts', groups(q_BxTxNxH), k_BxKxSxH,
                      preferred_element_type=jnp.float32) * H ** -0.5
  mask = mask_BxKxTxS[:, :, None]
  P = 0
  if prefix is not None:
    q_raw_BxTxNxH, pk_KxPxH, pv_KxPxH = prefix
    P = pk_KxPxH.shape[1]
    logits_p = jnp.einsum('bkgth,kph->bkgtp', groups(q_raw_BxTxNxH),
                          pk_KxPxH.astype(q_BxTxNxH.dtype),
                          preferred_element_type=jnp.float32) * H ** -0.5
    logits = jnp.concatenate([logits_p, logits], -1)
    mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (P,), bool), mask], -1)
  logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1) * mask
  dt = v_BxKxSxH.dtype
  out = jnp.einsum('bkgts,bksh->btkgh', probs[..., P:].astype(dt), v_BxKxSxH)
  if prefix is not None:
    out += jnp.einsum('bkgtp,kph->btkgh', probs[..., :P].astype(dt), pv_KxPxH.astype(dt))
  return out.reshape(B, T, N, H), probs[..., P:].mean(2)


def _dot_product(q_BxTxNxH, k_BxKxTxH, v_BxKxTxH, impl, window, rule):
  """jax.nn.dot_product_attention; with a rule, the dense mask and zeroed empty rows. cuDNN's
  training kernels take even lengths only: an odd chunk gets one padded (future) token."""
  k_BxTxKxH, v_BxTxKxH = k_BxKxTxH.transpose(0, 2, 1, 3), v_BxKxTxH.transpose(0, 2, 1, 3)
  if rule is None:
    T = q_BxTxNxH.shape[1]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, T % 2 if impl == 'cudnn' else 0), (0, 0), (0, 0)))
    local = (window - 1, 0) if window else None
    o = jax.nn.dot_product_attention(pad(q_BxTxNxH), pad(k_BxTxKxH), pad(v_BxTxKxH),
                                     is_causal=True, local_window_size=local,
                                     implementation=impl)
    return o[:, :T]
  mask_Bx1xTxT = _chunk_mask(q_BxTxNxH.shape[1], window, rule)
  o = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT,
                                   implementation=impl)
  seen_BxTx1x1 = mask_Bx1xTxT.any(-1).transpose(0, 2, 1)[..., None]
  return jnp.where(seen_BxTx1x1, o, 0.)


def _splash(q_BxTxNxH, k_BxKxTxH, v_BxKxTxH, window, block):
  """The splash kernel, [N, T, H] per batch row (vmap); GQA is native to its MHA kernel. It
  does not scale the logits: q is scaled here. T is padded to a multiple of the block: padded
  keys lie in the future of every real query, so the causal mask hides them."""
  B, T, N, H = q_BxTxNxH.shape
  b = min(-(-block // LANES), -(-T // LANES)) * LANES
  Tp = -(-T // b) * b
  if window:
    mask = splash.LocalMask((Tp, Tp), window_size=(window - 1, 0), offset=0)
  else:
    mask = splash.CausalMask((Tp, Tp))
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b,
                            block_q_dq=b, block_kv_dq=b)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * N), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1,
                                  interpret=jax.default_backend() != 'tpu')
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  q_BxNxTxH = pad((q_BxTxNxH * H ** -0.5).transpose(0, 2, 1, 3))
  o_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, pad(k_BxKxTxH), pad(v_BxKxTxH))
  return o_BxNxTxH[:, :, :T].transpose(0, 2, 1, 3)
