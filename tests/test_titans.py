"""Titans neural memory: chunked form == per-token references, gates, causality, decode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from models import decode, titans
from models.lm import LM
from training.config import ConfigError, validate


def titans_config(mixer='titans_mac', **titans_keys):
  cfg = tiny_config(**{'model.mixer': mixer, 'model.d_model': 32, 'model.n_heads': 2,
                       'model.n_kv_heads': 1, 'model.n_layers': 1, 'model.segment_len': 16,
                       'model.window': 8, 'data.seq_len': 48})
  cfg.model.titans.update({**dict(chunk=4, persistent=3, expansion=2), **titans_keys})
  return cfg


def max_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def naive_memory(mem, x_BxTxD, b):
  """Per-token loop, Eq 13-14 with the gradient of token t at M_{t'} (t' = start of its
  chunk of b), the clipped theta from the explicit per-token gradient; reads at M_{t'}."""
  state = mem.init_state(x_BxTxD.shape[0])
  (q, k, v), _ = mem.project(x_BxTxD, state.conv)
  theta, eta, alpha = mem.gates(x_BxTxD)
  w, s, w_chunk, reads = state.w, state.s, state.w, []
  for t in range(x_BxTxD.shape[1]):
    if t % b == 0:
      w_chunk = w
    sl = lambda a: a[:, t:t + 1].swapaxes(1, 2)           # [B, N, 1, H]
    reads.append(titans.mlp(w_chunk, sl(q)))
    u = jax.grad(lambda w: titans.token_losses(w, sl(k), sl(v)).sum())(w_chunk)
    norm_BxN = jnp.sqrt(sum((g ** 2).sum((-2, -1)) for g in jax.tree.leaves(u)))
    th = theta[..., t] / jnp.sqrt(1 + (norm_BxN / mem.grad_clip) ** 2)
    col = lambda a: a[..., t, None, None]
    s = jax.tree.map(lambda s_, u_: col(eta) * s_ - th[..., None, None] * u_, s, u)
    w = jax.tree.map(lambda w_, s_: (1 - col(alpha)) * w_ + s_, w, s)
  return jnp.concatenate(reads, 2).swapaxes(1, 2), w, s


@pytest.mark.parametrize('chunk_form,b,depth,T', [('closed', 4, 2, 10), ('scan', 4, 2, 10),
                                                   ('closed', 1, 2, 6), ('closed', 4, 1, 8)])
def test_chunked_equals_per_token_loop(chunk_form, b, depth, T):
  """b = 1 is the fully sequential recurrence (gradient at M_{t-1})."""
  cfg = titans_config('titans_lmm', chunk=b, depth=depth, chunk_form=chunk_form)
  mem = titans.NeuralMemory(cfg.model, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, T, 32))
  reads, state = mem.forward(x, mem.init_state(2))
  ref_reads, ref_w, ref_s = naive_memory(mem, x, b)
  assert max_diff(state.w, ref_w) < 1e-5 and max_diff(state.s, ref_s) < 1e-5
  assert max_diff(reads, ref_reads) < 1e-5
  assert max_diff(ref_w, mem.init_state(2).w) > 1e-3          # the memory did change


def test_unrolled_chunks_equal_the_scanned_ones(monkeypatch):
  """Up to titans.UNROLL chunks run as straight-line code, more as a lax.scan over that many
  per iteration: same numbers, values and gradients."""
  cfg = titans_config('titans_lmm', chunk=4)
  mem = titans.NeuralMemory(cfg.model, rngs=nnx.Rngs(0))
  graph, params = nnx.split(mem)
  x = jax.random.normal(jax.random.key(1), (2, 14, 32))

  def run(params, x):
    m = nnx.merge(graph, params)
    reads, state = m.forward(x, m.init_state(2))
    return (reads ** 2).sum() + sum((w ** 2).sum() for w in jax.tree.leaves(state.w)), reads

  grad = lambda: jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(params, x)
  unrolled = grad()
  monkeypatch.setattr(titans, 'UNROLL', 2)          # 3 chunks: an iteration of 2, then 1
  scanned = grad()                     # traced again: UNROLL is read at trace time
  assert max_diff(unrolled, scanned) < 1e-5
  assert max_diff(unrolled[1], jax.tree.map(jnp.zeros_like, unrolled[1])) > 1e-3


def test_token_grad_norms_match_autodiff():
  cfg = titans_config('titans_lmm', depth=3)
  mem = titans.NeuralMemory(cfg.model, rngs=nnx.Rngs(0))
  w = mem.init_state(1).w
  k, v = jax.random.normal(jax.random.key(2), (2, 1, 2, 5, 16))
  per_token = [jax.grad(lambda w: titans.token_losses(w, k[:, :, t:t + 1], v[:, :, t:t + 1]).sum())(w)
               for t in range(5)]
  ref = jnp.stack([jnp.sqrt(sum((g ** 2).sum((-2, -1)) for g in jax.tree.leaves(u)))
                   for u in per_token], -1)
  np.testing.assert_allclose(titans.grad_norms(*titans.backprop(w, k, v)), ref, rtol=1e-5)


def _chunk_inputs(n=5, seed=3):
  cfg = titans_config('titans_lmm')
  mem = titans.NeuralMemory(cfg.model, rngs=nnx.Rngs(0))
  r = jax.random.split(jax.random.key(seed), 4)
  w = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(r[0], a.shape), mem.init_state(1).w)
  s = jax.tree.map(lambda a: 0.1 * jax.random.normal(r[1], a.shape), w)
  k, v = jax.random.normal(r[2], (2, 1, 2, n, 16))
  gates = jax.random.uniform(r[3], (3, 1, 2, n), minval=0.1, maxval=0.9)
  return w, s, k, v, gates


@pytest.mark.parametrize('depth,clip', [(1, 0.0), (2, 1.0), (3, 0.5)])
def test_closed_chunk_backward_matches_autodiff(depth, clip):
  """chunk_closed's hand-written VJP against JAX's autodiff of the same chunk (backprop,
  clipped_theta, chunk_update_closed): outputs and the cotangents of every input (fast
  weights, surprise, q, k, v, theta and the five gate terms) for random output cotangents."""
  cfg = titans_config('titans_lmm', depth=depth)
  mem = titans.NeuralMemory(cfg.model, rngs=nnx.Rngs(0))
  r = jax.random.split(jax.random.key(5), 7)
  w = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(r[0], a.shape), mem.init_state(2).w)
  s = jax.tree.map(lambda a: 0.1 * jax.random.normal(r[1], a.shape), w)
  q, k, v = jax.random.normal(r[2], (3, 2, 2, 5, 16))
  theta, eta, alpha = jax.random.uniform(r[3], (3, 2, 2, 5), minval=0.05, maxval=0.9)
  args = (w, s, q, k, v, theta, titans.closed_gate_terms(eta, alpha))
  ref = lambda *a: titans.chunk_autodiff(titans.chunk_update_closed, *a, clip)
  mine = lambda *a: titans.chunk_closed(*a, clip)
  out_ref, vjp_ref = jax.vjp(ref, *args)
  out, vjp = jax.vjp(mine, *args)
  assert max_diff(out, out_ref) < 1e-5
  leaves, tree = jax.tree.flatten(out_ref)
  keys = jax.random.split(r[4], len(leaves))
  cts = jax.tree.unflatten(tree, [jax.random.normal(kk, a.shape) for kk, a in zip(keys, leaves)])
  got, want = jax.jit(vjp)(cts), jax.jit(vjp_ref)(cts)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.abs(w_).max())
    assert scale > 0 and float(jnp.abs(g - w_).max()) < 1e-4 * max(1.0, scale)


@pytest.mark.parametrize('form', ['closed', 'scan'])
def test_gates_alpha_one_erases_theta_zero_keeps(form):
  w, s, k, v, (theta, eta, alpha) = _chunk_inputs()
  gate_terms, apply, _ = titans.UPDATES[form]
  update = lambda w, s, k, v, theta, eta, alpha: apply(w, s, *titans.backprop(w, k, v), theta,
                                                       gate_terms(eta, alpha))
  zeros, ones = jnp.zeros_like(theta), jnp.ones_like(theta)
  zero_s = jax.tree.map(jnp.zeros_like, s)
  # theta = 0, alpha = 0, no past surprise: M_0 kept exactly
  w1, s1 = update(w, zero_s, k, v, zeros, eta, zeros)
  assert max_diff(w1, w) == 0 and max_diff(s1, zero_s) == 0
  # alpha = 1: everything before is forgotten; with theta = 0 the memory is empty
  w2, _ = update(w, zero_s, k, v, zeros, eta, ones)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(w2)) == 0
  # alpha = 1, eta = 0: only the last token's surprise -theta_n u_n(M_0) remains
  w3, _ = update(w, s, k, v, theta, zeros, ones)
  u_last = jax.grad(lambda w: titans.token_losses(w, k[:, :, -1:], v[:, :, -1:]).sum())(w)
  # (entries up to ~3.3: 1e-5 is a few float32 roundings, the compiled code's order of ops)
  assert max_diff(w3, jax.tree.map(lambda u: -theta[..., -1, None, None] * u, u_last)) < 1e-5


def build(mixer, **titans_keys):
  cfg = titans_config(mixer, **titans_keys)
  validate(cfg, 1)
  return LM(cfg.model, rngs=nnx.Rngs(0))


@jax.jit
def decode_logits(model, x_BxT):
  """Prefill 21 tokens (one segment + a partial one), then step token by token."""
  B, T = x_BxT.shape
  state = decode.init_state(model, B, T)
  last, state = decode.prefill(model, x_BxT[:, :21], state)

  def body(state, t):
    logits, state = decode.step(model, x_BxT[:, t], jnp.full((B,), t), state)
    return state, logits

  _, rows = jax.lax.scan(body, state, jnp.arange(21, T))
  return jnp.concatenate([last[:, None], rows.swapaxes(0, 1)], 1)


@pytest.mark.parametrize('mixer', ['titans_mac', 'titans_mag', 'titans_mal', 'titans_lmm'])
def test_causal_and_decode_equals_forward(mixer):
  model = build(mixer)
  x = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)
  forward = jax.jit(lambda m, x: m(x)[0])
  full = forward(model, x)
  assert bool(jnp.isfinite(full).all())
  # causality: changing token j (inside the second segment) leaves logits < j unchanged
  j = 21
  other = forward(model, x.at[:, j].set((x[:, j] + 7) % 256))
  assert max_diff(full[:, :j], other[:, :j]) < 1e-6
  assert max_diff(full[:, j:], other[:, j:]) > 1e-4
  # decode: prefill + steps == full forward (memory, conv and segment buffers carried)
  assert max_diff(decode_logits(model, x), full[:, 20:]) < 2e-4


def test_outer_gradient_flows_through_two_segments():
  """Loss on the 3rd segment's outputs only; parameters used only while processing the 1st
  segment (a copy of the mixer) get gradients through the memory written there."""
  cfg = titans_config('titans_mac')
  cfg.model.segment_len = C = 8
  mac = titans.MAC(cfg.model, rngs=nnx.Rngs(0))
  gdef, params = nnx.split(mac)
  x = jax.random.normal(jax.random.key(4), (1, 3 * C, 32))
  pos = jnp.arange(3 * C)[None]

  def loss(p_first, p_rest):
    state = mac.init_state(1, 2 * C)
    y = None
    for i, p in enumerate([p_first, p_rest, p_rest]):
      y, state = nnx.merge(gdef, p)(x[:, C * i:C * (i + 1)], state, pos[:, C * i:C * (i + 1)])
    return (y ** 2).sum()

  g = jax.jit(jax.grad(loss))(params, params)
  for name in ('wk', 'wv', 'w_gates', 'b_gates'):
    norm = float(jnp.linalg.norm(g['memory'][name][...]))
    assert np.isfinite(norm) and norm > 0, name
  assert float(jnp.linalg.norm(g['wv'][...])) > 0     # attention of segment 1 -> y -> memory


def test_config_errors_name_the_key():
  cfg = titans_config('titans_mac')
  cfg.model.segment_len = 18                           # chunk 4 does not divide it
  cfg.data.seq_len = 36
  with pytest.raises(ConfigError, match='model.titans.chunk'):
    validate(cfg, 1)
  cfg = titans_config('titans_mac', chunk_form='fast')
  with pytest.raises(ConfigError, match='model.titans.chunk_form'):
    validate(cfg, 1)


@pytest.mark.parametrize('write', ['y', 'residual'])
def test_mac_write_input(write):
  """model.titans.mac_write: 'y' writes the attention output only (Eq 24 literally), so with a
  blank attention (W_O = 0) the memory after a segment does not depend on its tokens;
  'residual' writes x + y, which keeps each token's identity in the written keys/values."""
  cfg = titans_config('titans_mac', mac_write=write)
  mac = titans.MAC(cfg.model, rngs=nnx.Rngs(0))
  mac.wo[...] = jnp.zeros_like(mac.wo[...])
  C = cfg.model.segment_len
  x1, x2 = jax.random.normal(jax.random.key(5), (2, 1, C, 32))
  pos = jnp.arange(C)[None]
  mem = [mac(x, mac.init_state(1, 0), pos)[1].mem.w for x in (x1, x2)]
  diff = max_diff(*mem)
  assert (diff > 1e-3) if write == 'residual' else (diff == 0)
