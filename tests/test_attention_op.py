"""models/ops/attention.py: every backend == the masked einsum (its general path, itself checked
against naive loops in tests/test_models.py), rules, padding rows, the general (cache / mask /
prefix) path, resolve_impl and concat_kv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.anchor import AnchorRule, _block_rule, anchor_mask, sentence_and_document
from models.ops.attention import attention, concat_kv, position_mask, resolve_impl

ON_GPU = jax.default_backend() == 'gpu'
CPU_IMPLS = ('xla', 'chunked', 'masked', 'splash')      # splash: Pallas interpret mode off TPU
needs_gpu = pytest.mark.skipif(not ON_GPU, reason='cudnn needs a GPU')
RULE = AnchorRule(anchor_ids=(46, 10))                  # '.', '\n'; BOS 257, PAD 256


def qkv(T, N, K, H=8, seed=0, dtype=jnp.float32):
  """q [B, T, N, H], k and v [B, K, T, H], a cotangent like q."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (2, T, N, H), dtype)
  k, v = (jax.random.normal(r, (2, K, T, H), dtype) for r in keys[1:3])
  return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


def reference(q, k, v, mask_BxTxT=None, window=0):
  """The masked path: attend under the causal (window) position mask [and a token mask]."""
  B, K, T, _ = k.shape
  pos_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = position_mask(pos_BxT, jnp.broadcast_to(pos_BxT[:, None], (B, K, T)),
                       jnp.ones((B, K, T), bool), window)
  if mask_BxTxT is not None:
    mask &= mask_BxTxT[:, None]
  return attend(q, k, v, mask)[0]


def attend(q, k, v, mask):
  """(out, probs) of the dense masked einsum."""
  return attention(q, k, v, mask_BxKxTxS=mask, return_probs=True)


def attend_with_prefix(q_BxTxNxH, qraw_BxTxNxH, pk_KxPxH, pv_KxPxH, k_BxKxSxH, v_BxKxSxH,
                       mask_BxKxTxS):
  """Reference (models/titans.py before the op): softmax over [persistent keys (always
  visible, unrotated query) || masked keys]."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxKxSxH.shape[1]
  G, P = N // K, pk_KxPxH.shape[1]
  q = q_BxTxNxH.reshape(B, T, K, G, H)
  qr = qraw_BxTxNxH.reshape(B, T, K, G, H)
  lp = jnp.einsum('btkgh,kph->bkgtp', qr, pk_KxPxH.astype(q.dtype))
  lm = jnp.einsum('btkgh,bksh->bkgts', q, k_BxKxSxH)
  lm = jnp.where(mask_BxKxTxS[:, :, None], lm, -1e30)
  probs = jax.nn.softmax(jnp.concatenate([lp, lm], -1) * H ** -0.5, -1)
  out = (jnp.einsum('bkgtp,kph->btkgh', probs[..., :P], pv_KxPxH)
         + jnp.einsum('bkgts,bksh->btkgh', probs[..., P:], v_BxKxSxH))
  return out.reshape(B, T, N, H)


def output_and_grads(fn, q, k, v, cotangent):
  """Output and d<out, cotangent>/d(q, k, v), in one compiled function."""

  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)

  return jax.tree.leaves(jax.jit(run)(q, k, v))


def assert_close(got, want, tol=1e-5):
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert float(jnp.abs(a - b).max()) < tol, name


def ansan_tokens(T=37):
  """Two rows: anchors, packed documents (two BOS in row 1) and PAD tokens (row 0 at the end,
  row 1 in the middle). Returns tokens [2, T] and the rule's info dict (like AnchorAttention)."""
  tokens = np.array(jax.random.randint(jax.random.key(7), (2, T), 60, 200))
  tokens[:, 0] = tokens[1, 15] = 257
  tokens[0, [5, 12, 20]] = 46
  tokens[1, [7, 22]] = [46, 10]
  tokens[0, 31:] = tokens[1, 27:30] = 256
  tokens = jnp.asarray(tokens)
  anc, bos, pad = RULE.classify(tokens)
  seg, doc = sentence_and_document(anc, bos)
  return tokens, dict(seg=seg, doc=doc, anc=anc, ok=~pad)


@pytest.mark.parametrize('impl', CPU_IMPLS)
@pytest.mark.parametrize('window', [0, 5])
def test_backends_equal_masked_forward_and_gradients(impl, window):
  """Causal / sliding window, GQA (N=4, K=2), T=37 not a multiple of the block (8; splash 128)."""
  q, k, v, ct = qkv(37, 4, 2)
  got = output_and_grads(
      lambda q, k, v: attention(q, k, v, impl=impl, window=window, block=8), q, k, v, ct)
  want = output_and_grads(lambda q, k, v: reference(q, k, v, window=window), q, k, v, ct)
  assert_close(got, want)


@pytest.mark.parametrize('impl,window', [(i, 0) for i in CPU_IMPLS] + [('xla', 6), ('chunked', 6)])
def test_rule_equals_dense_reference(impl, window):
  """AnSAN's rule (anchors, two documents, padding): every backend == the dense AnSAN mask
  (splash falls back to chunked)."""
  tokens, info = ansan_tokens()
  q, k, v, ct = qkv(37, 4, 2, seed=1)
  rule = (_block_rule, info)
  got = output_and_grads(
      lambda q, k, v: attention(q, k, v, impl=impl, window=window, block=8, rule=rule),
      q, k, v, ct)
  want = output_and_grads(
      lambda q, k, v: reference(q, k, v, anchor_mask(tokens, RULE), window), q, k, v, ct)
  assert_close(got, want)


@pytest.mark.parametrize('impl', CPU_IMPLS + ('auto',))
def test_pad_rows_are_zero(impl):
  """PAD queries see no key under the AnSAN rule: their rows are exactly 0 (not the mean of V,
  what jax.nn.dot_product_attention gives) and the gradients are finite."""
  tokens, info = ansan_tokens()
  q, k, v, ct = qkv(37, 4, 2, seed=2)
  out, *grads = output_and_grads(
      lambda q, k, v: attention(q, k, v, impl=impl, block=8, rule=(_block_rule, info)),
      q, k, v, ct)
  pad_BxT = tokens == 256
  assert int(pad_BxT.sum()) == 9
  assert float(jnp.abs(out[pad_BxT]).max()) == 0.
  assert float(jnp.abs(out[~pad_BxT]).max(axis=(1, 2)).min()) > 0    # real rows are not
  assert all(bool(jnp.isfinite(g).all()) for g in grads)


@needs_gpu
@pytest.mark.parametrize('window', [0, 5])
def test_cudnn_equals_masked_bf16(window):
  """bf16 forward and gradients against the fp32 reference, relative to the largest entry."""
  q, k, v, ct = qkv(37, 4, 2, H=64, dtype=jnp.bfloat16)
  got = output_and_grads(lambda q, k, v: attention(q, k, v, impl='cudnn', window=window),
                         q, k, v, ct)
  f32 = lambda x: x.astype(jnp.float32)
  want = output_and_grads(lambda q, k, v: reference(q, k, v, window=window),
                          f32(q), f32(k), f32(v), f32(ct))
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert float(jnp.abs(f32(a) - b).max() / jnp.abs(b).max()) < 2e-2, name


def holey_cache(B=2, K=2, S=6, H=8):
  """A cache with empty slots (pos -1) and slots in no particular order."""
  keys = jax.random.split(jax.random.key(3), 2)
  pos = jnp.asarray([[[4, -1, 0, 7, 2, -1], [9, 3, -1, 1, 8, 5]],
                     [[-1, 6, 2, 0, -1, 3], [1, 1, 4, -1, 0, 2]]], jnp.int32)
  return (jax.random.normal(keys[0], (B, K, S, H)), jax.random.normal(keys[1], (B, K, S, H)),
          pos, pos >= 0)


@pytest.mark.parametrize('window', [0, 4])
def test_general_path_equals_attend(window):
  """3 new tokens over a cache with holes: positions / validity, or the same as an explicit
  mask; output and probabilities == the dense masked einsum."""
  q, k_new, v_new, _ = qkv(3, 4, 2, seed=4)
  pos_BxT = jnp.asarray([[8, 9, 10], [10, 11, 12]], jnp.int32)
  k, v, pos, valid = concat_kv(*holey_cache(), k_new, v_new, pos_BxT)
  mask = position_mask(pos_BxT, pos, valid, window)
  want = attend(q, k, v, mask)
  got = attention(q, k, v, q_pos_BxT=pos_BxT, k_pos_BxKxS=pos, k_valid_BxKxS=valid,
                  window=window, return_probs=True)
  got_mask = attention(q, k, v, mask_BxKxTxS=mask, return_probs=True)
  for g in (got, got_mask):
    assert all(float(jnp.abs(a - b).max()) < 1e-6 for a, b in zip(g, want))


def test_prefix_equals_titans_attend_with_prefix():
  """Titans: persistent keys + MAC's [causal | causal] mask (general path), and SWA over one
  chunk (contiguous path routed to the dense one)."""
  q, k, v, q_raw = qkv(8, 4, 2, seed=5)
  pk, pv = jax.random.normal(jax.random.key(6), (2, 2, 3, 8))
  causal = jnp.tril(jnp.ones((8, 8), bool))
  mac = jnp.broadcast_to(jnp.concatenate([causal, causal], 1), (2, 2, 8, 16))
  k2, v2 = jnp.concatenate([k[::-1], k], 2), jnp.concatenate([v[::-1], v], 2)
  got = attention(q, k2, v2, mask_BxKxTxS=mac, prefix=(q_raw, pk, pv))
  want = attend_with_prefix(q, q_raw, pk, pv, k2, v2, mac)
  assert float(jnp.abs(got - want).max()) < 1e-5
  swa = jnp.broadcast_to(causal & ~jnp.tril(causal, -3), (2, 2, 8, 8))
  got = attention(q, k, v, impl='chunked', window=3, prefix=(q_raw, pk, pv))
  want = attend_with_prefix(q, q_raw, pk, pv, k, v, swa)
  assert float(jnp.abs(got - want).max()) < 1e-5


@pytest.mark.parametrize('impl,T,window,block', [('chunked', 37, 0, 8), ('chunked', 37, 5, 8),
                                                 ('chunked', 20, 6, 64), ('xla', 20, 6, 8)])
def test_prefix_on_a_chunk_forward_and_gradients(impl, T, window, block):
  """Titans' SWA over (P || x) on one chunk: the chunked backend (the online softmax starts
  from the prefix; its own backward) and the dense path == the reference, output and the
  gradients of q, k, v, q_raw, pk, pv; GQA, T not a multiple of the block."""
  q, k, v, cot = qkv(T, 4, 2, seed=8)
  q_raw = jax.random.normal(jax.random.key(9), q.shape)
  pk, pv = jax.random.normal(jax.random.key(10), (2, 2, 3, 8))
  pos_BxT = jnp.broadcast_to(jnp.arange(T), (2, T))
  mask = position_mask(pos_BxT, jnp.broadcast_to(pos_BxT[:, None], (2, 2, T)),
                       jnp.ones((2, 2, T), bool), window)

  def grads(fn):
    out, vjp = jax.vjp(fn, q, k, v, q_raw, pk, pv)
    return [out, *vjp(cot)]

  got = jax.jit(lambda: grads(lambda q, k, v, qr, pk, pv: attention(
      q, k, v, impl=impl, block=block, window=window, prefix=(qr, pk, pv))))()
  want = jax.jit(lambda: grads(lambda q, k, v, qr, pk, pv: attend_with_prefix(
      q, qr, pk, pv, k, v, mask)))()
  for name, a, b in zip(('out', 'dq', 'dk', 'dv', 'dq_raw', 'dpk', 'dpv'), got, want):
    assert float(jnp.abs(a - b).max()) < 1e-5, name


def test_resolve_impl():
  bf16, fp32 = jnp.bfloat16, jnp.float32
  assert resolve_impl('auto', fp32, platform='cpu') == 'chunked'
  assert resolve_impl('auto', bf16, platform='gpu') == 'cudnn'
  assert resolve_impl('auto', fp32, platform='gpu') == 'xla'
  assert resolve_impl('auto', bf16, platform='tpu') == 'splash'
  assert resolve_impl('auto', bf16, has_rule=True, platform='gpu') == 'xla'
  assert resolve_impl('auto', bf16, has_rule=True, platform='tpu') == 'chunked'
  assert resolve_impl('cudnn', bf16, has_rule=True, platform='gpu') == 'xla'
  assert resolve_impl('masked', fp32, has_rule=True, platform='tpu') == 'masked'
  with pytest.raises(ValueError, match='model.attention_impl'):
    resolve_impl('flash', fp32)


def test_concat_kv():
  cache = holey_cache(B=2, K=2, S=6, H=3)
  k_new = jnp.ones((2, 2, 2, 3), jnp.bfloat16)
  pos_BxT = jnp.asarray([[10, 11], [20, 21]])
  real_BxT = jnp.asarray([[True, False], [True, True]])
  k, v, pos, valid = concat_kv(*cache, k_new, 2 * k_new, pos_BxT, real_BxT)
  assert k.shape == v.shape == (2, 2, 8, 3) and k.dtype == v.dtype == jnp.bfloat16
  assert (k[:, :, :6] == cache[0].astype(jnp.bfloat16)).all() and (v[:, :, 6:] == 2).all()
  assert pos.dtype == jnp.int32 and pos.tolist()[1][1] == [1, 1, 4, -1, 0, 2, 20, 21]
  assert valid.tolist()[0][1] == [True, True, False, True, True, True, True, False]
