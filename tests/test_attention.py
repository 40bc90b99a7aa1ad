"""attention_impl='chunked' (models/ops/chunked.py) == the dense paths, in O(T * block)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import tiny_config
from models.ops.attention import attention, position_mask
from models.ops.chunked import chunked_attention
from models.lm import LM
from training.step import loss_fn


def masked_reference(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, window):
  """The 'masked' path: einsum + position mask over the whole chunk."""
  B, T, K = k_BxTxKxH.shape[:3]
  pos_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = position_mask(pos_BxT, jnp.broadcast_to(pos_BxT[:, None], (B, K, T)),
                       jnp.ones((B, K, T), bool), window)
  return attention(q_BxTxNxH, k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3),
                   mask_BxKxTxS=mask)


def output_and_grads(attention, q, k, v, cotangent):
  """Output and d<out, cotangent>/d(q, k, v), in one compiled function."""

  def run(q, k, v):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(cotangent)

  return jax.jit(run)(q, k, v)


@pytest.mark.parametrize('T,N,K,window,block', [
    (37, 4, 2, 0, 8),      # causal, GQA, T not a multiple of the block
    (37, 4, 2, 5, 8),      # sliding window inside one block
    (40, 2, 2, 13, 4),     # window spans several blocks (first blocks skipped)
    (20, 4, 1, 6, 64),     # block larger than T, multi-query
])
def test_chunked_equals_masked_forward_and_gradients(T, N, K, window, block):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, T, N, 8))
  k, v = (jax.random.normal(r, (2, T, K, 8)) for r in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  got = output_and_grads(lambda q, k, v: chunked_attention(q, k, v, window=window, block=block),
                         q, k, v, cotangent)
  want = output_and_grads(lambda q, k, v: masked_reference(q, k, v, window), q, k, v, cotangent)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.abs(a - b).max()) < 1e-5, name


def test_lm_with_chunked_attention_equals_xla():
  """Same weights: same loss and parameter gradients (sliding + full layers, T % block != 0)."""
  overrides = {'model.mixer': 'sliding,attention', 'model.window': 8, 'model.attention_block': 16}
  model = LM(tiny_config(**overrides).model, rngs=nnx.Rngs(0))
  chunked = LM(tiny_config(**overrides, **{'model.attention_impl': 'chunked'}).model,
               rngs=nnx.Rngs(1))
  nnx.update(chunked, nnx.state(model))
  x = jax.random.randint(jax.random.key(1), (2, 41), 0, 256)
  value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))
  (loss_a, grads_a), (loss_b, grads_b) = value_and_grad(model, x), value_and_grad(chunked, x)
  assert abs(float(loss_a) - float(loss_b)) < 1e-5
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads_a, grads_b)
  assert max(jax.tree.leaves(diffs)) < 1e-5


def test_chunked_attention_memory_is_linear_not_quadratic():
  """XLA's temporaries for fwd + bwd at T=4096: dense scores (4 x 4096^2 fp32 = 256 MiB per
  copy) vs blocks of 512."""
  q = jax.ShapeDtypeStruct((1, 4096, 4, 32), jnp.float32)

  def temp_bytes(attention):
    loss = lambda q, k, v: attention(q, k, v).sum()
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense = temp_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
  chunked = temp_bytes(lambda q, k, v: chunked_attention(q, k, v, block=512))
  assert dense > 256 * 2**20 and chunked < dense / 4, (dense, chunked)
