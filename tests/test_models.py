"""LM forward paths agree: segments == one pass, decode == full forward, policies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from models import decode, eviction
from models.attention import KVCache, write
from models.ops.attention import attention, position_mask
from models.lm import LM


def build(**overrides):
  cfg = tiny_config(**overrides)
  return LM(cfg.model, rngs=nnx.Rngs(0)), cfg


def tokens(B=2, T=48, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 256)


# Jitted decode entry points (eager per-token loops are slow to run, not to compile).
step = jax.jit(decode.step)                       # policies are pytrees: traced arguments
prefill = jax.jit(decode.prefill, static_argnames=('chunk',))


def max_diff(a, b):
  return float(jnp.abs(a - b).max())


@pytest.mark.parametrize('mixer,window', [('attention', 0), ('sliding', 8)])
def test_segments_equal_single_pass(mixer, window):
  model, _ = build(**{'model.mixer': mixer, 'model.window': window})
  seg, _ = build(**{'model.mixer': mixer, 'model.window': window, 'model.segment_len': 16})
  nnx.update(seg, nnx.state(model))
  x = tokens()
  assert max_diff(model(x)[0], seg(x)[0]) < 1e-5


@pytest.mark.parametrize('mixer,window', [('attention', 0), ('sliding', 8)])
def test_fast_path_equals_masked_reference(mixer, window):
  model, _ = build(**{'model.mixer': mixer, 'model.window': window})
  ref, _ = build(**{'model.mixer': mixer, 'model.window': window, 'model.attention_impl': 'masked'})
  nnx.update(ref, nnx.state(model))
  x = tokens()
  assert max_diff(model(x)[0], ref(x)[0]) < 1e-5


def naive_attention(q_TxNxH, k_TxKxH, v_TxKxH, window):
  """Per-query loops: the obviously-correct reference."""
  T, N, H = q_TxNxH.shape
  G = N // k_TxKxH.shape[1]
  out = np.zeros((T, N, H), np.float64)
  for t in range(T):
    for n in range(N):
      js = [j for j in range(t + 1) if not window or t - j < window]
      s = np.array([q_TxNxH[t, n] @ k_TxKxH[j, n // G] / np.sqrt(H) for j in js])
      p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
      out[t, n] = sum(pj * v_TxKxH[j, n // G] for pj, j in zip(p, js))
  return out


@pytest.mark.parametrize('window', [0, 5])
def test_attend_matches_naive_loops(window):
  r = np.random.default_rng(0)
  T, N, K, H = 12, 4, 2, 8
  q, k, v = r.normal(size=(T, N, H)), r.normal(size=(T, K, H)), r.normal(size=(T, K, H))
  pos = jnp.arange(T)[None]
  k_BxKxSxH = jnp.asarray(k.transpose(1, 0, 2))[None]
  mask = position_mask(pos, jnp.broadcast_to(pos[:, None], (1, K, T)), jnp.ones((1, K, T), bool),
                       window)
  out = attention(jnp.asarray(q)[None], k_BxKxSxH, jnp.asarray(v.transpose(1, 0, 2))[None],
                  mask_BxKxTxS=mask)
  np.testing.assert_allclose(out[0], naive_attention(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize('mixer,window,segment', [('attention', 0, 0), ('sliding', 8, 0),
                                                   ('attention', 0, 16)])
def test_prefill_and_steps_equal_full_forward(mixer, window, segment):
  model, _ = build(**{'model.mixer': mixer, 'model.window': window, 'model.segment_len': segment})
  x = tokens()
  full, _ = model(x)
  state = decode.init_state(model, 2, 64)
  last, state = prefill(model, x[:, :20], state)
  rows = [last]
  for t in range(20, 48):
    logits, state = step(model, x[:, t], jnp.full((2,), t), state)
    rows.append(logits)
  assert max_diff(jnp.stack(rows, 1), full[:, 19:]) < 1e-4


def test_greedy_generate_is_consistent_with_forward():
  model, _ = build()
  out, _ = decode.generate(model, tokens(T=16), jax.random.key(0), n_new=8)
  full, _ = model(out)
  np.testing.assert_array_equal(full[:, 15:-1].argmax(-1), out[:, 16:])


def test_generate_warns_when_the_cache_would_overwrite_tokens():
  model, _ = build()
  with pytest.warns(UserWarning, match='capacity 20 < prompt 16 \\+ 8 new tokens'):
    decode.generate(model, tokens(T=16), jax.random.key(0), n_new=8, capacity=20)


def test_recency_policy_keeps_exactly_the_window():
  model, _ = build()
  x = tokens(T=40)
  policy = eviction.Recency(6)
  state = decode.init_state(model, 2, 48, policy)
  _, state = prefill(model, x[:, :20], state, policy=policy)
  for t in range(20, 40):
    _, state = step(model, x[:, t], jnp.full((2,), t), state, policy=policy)
    for cache in state:
      kept = np.sort(np.asarray(cache.pos_BxKxS)[np.asarray(cache.valid_BxKxS)].reshape(2, 2, -1))
      np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(t - 5, t + 1), kept.shape))


def test_recency_decode_equals_sliding_window_forward():
  """A cache kept to the last W tokens, plus the new token, == sliding window W + 1."""
  model, _ = build(**{'model.mixer': 'sliding', 'model.window': 7})
  x = tokens(T=32)
  full, _ = model(x)
  dense, _ = build()                   # same weights, plain attention + recency eviction
  nnx.update(dense, nnx.state(model))
  policy = eviction.Recency(6)
  state = decode.init_state(dense, 2, 40, policy)
  rows = []
  for t in range(32):
    logits, state = step(dense, x[:, t], jnp.full((2,), t), state, policy=policy)
    rows.append(logits)
  assert max_diff(jnp.stack(rows, 1), full) < 1e-4


def test_cache_write_fills_free_slots_then_oldest():
  cache = KVCache.empty(1, 1, 4, 2)
  for t in range(6):
    cache, _ = write(cache, jnp.ones((1, 1, 1, 2)), jnp.ones((1, 1, 1, 2)), jnp.array([[t]]))
  assert sorted(np.asarray(cache.pos_BxKxS).ravel().tolist()) == [2, 3, 4, 5]


def test_gradients_reach_every_parameter():
  model, _ = build(**{'model.segment_len': 16})
  from training.step import loss_fn
  grads = nnx.grad(loss_fn)(model, tokens(T=49))
  norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads))
  assert all(np.isfinite(n) and n > 0 for n in norms)


def test_chunked_prefill_evicts_while_reading_the_prompt():
  model, _ = build()
  x = tokens(T=32)
  full, _ = model(x)
  state = decode.init_state(model, 2, 40)
  last, _ = prefill(model, x, state, chunk=5)            # no policy: exact
  assert max_diff(last, full[:, -1]) < 1e-4
  policy = eviction.Recency(6)
  state = decode.init_state(model, 2, 12, policy)               # 12 slots < 32 prompt tokens
  _, state = prefill(model, x, state, policy=policy, chunk=4)
  assert all(int(s.size_BxK().max()) == 6 for s in state)
