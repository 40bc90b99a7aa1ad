"""Infini-attention (models/infini.py): the equations against a naive loop, the gate limits,
constant state, the delta rule, live BPTT, decode == forward, gate optimizer group, and
converting a trained plain-attention checkpoint (plug and play)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from models import decode
from models.infini import InfiniAttention, memory_read, memory_update
from models.lm import LM

N_SEG = 16


def infini_config(update='linear', **overrides):
  cfg = tiny_config(**{'model.mixer': 'infini', 'model.segment_len': N_SEG,
                       'model.n_kv_heads': 2, 'model.n_layers': 1, 'model.remat': 'segment',
                       **overrides})
  cfg.model.infini.update_rule = update
  return cfg


def tokens(B=2, T=48, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 256)


def set_gates(model, value):
  for blk in model.blocks:
    blk.mixer.beta[...] = jnp.full_like(blk.mixer.beta[...], value)


# --- The equations ---------------------------------------------------------------------------

def _rope_np(x_TxNxH, pos_T, theta=10000.0):
  h = x_TxNxH.shape[-1]
  ang = pos_T[:, None] / theta ** (np.arange(0, h, 2) / h)
  ang = np.concatenate([ang, ang], -1)[:, None, :]
  x1, x2 = np.split(x_TxNxH, 2, -1)
  return x_TxNxH * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def naive_infini(x_TxD, wq, wk, wv, wo, beta_N, seg, rule):
  """Per-segment, per-head float64 loops over Eqs. 6-10 (one batch row)."""
  sig = lambda a: np.where(a > 0, a + 1, np.exp(np.minimum(a, 0)))
  T = x_TxD.shape[0]
  N, H = wq.shape[1:]
  K = wk.shape[1]
  q, k, v = (np.einsum('td,dnh->tnh', x_TxD, w) for w in (wq, wk, wv))
  qr, kr = _rope_np(q, np.arange(T)), _rope_np(k, np.arange(T))
  M, z = np.zeros((K, H, H)), np.zeros((K, H))
  out = np.zeros((T, N, H))
  for s in range(0, T, seg):
    for n in range(N):
      kv = n // (N // K)
      for t in range(s, s + seg):
        logits = np.array([qr[t, n] @ kr[j, kv] for j in range(s, t + 1)]) / np.sqrt(H)
        p = np.exp(logits - logits.max())
        a_dot = (p / p.sum()) @ v[s:t + 1, kv]
        den = sig(q[t, n]) @ z[kv]
        a_mem = sig(q[t, n]) @ M[kv] / den if den > 0 else np.zeros(H)
        g = 1 / (1 + np.exp(-beta_N[n]))
        out[t, n] = g * a_mem + (1 - g) * a_dot
    for kv in range(K):
      sk = sig(k[s:s + seg, kv])
      vv = v[s:s + seg, kv]
      if rule == 'delta' and z[kv].any():
        vv = vv - (sk @ M[kv]) / (sk @ z[kv])[:, None]
      M[kv] = M[kv] + sk.T @ vv
      z[kv] = z[kv] + sk.sum(0)
  return np.einsum('tnh,nhd->td', out, wo)


@pytest.mark.parametrize('rule', ['linear', 'delta'])
def test_segment_scan_matches_naive_loop(rule):
  cfg = infini_config(rule)
  mixer = InfiniAttention(cfg.model, rngs=nnx.Rngs(0))
  mixer.beta[...] = jnp.array([-1.5, -0.3, 0.4, 2.0])            # gates well inside (0, 1)
  B, S = 2, 3
  x_BxTxD = jax.random.normal(jax.random.key(2), (B, S * N_SEG, cfg.model.d_model))

  @jax.jit
  def scanned(x_BxTxD):
    split = lambda a: a.reshape(B, S, N_SEG, *a.shape[2:]).swapaxes(0, 1)
    pos = split(jnp.broadcast_to(jnp.arange(S * N_SEG), (B, S * N_SEG)))
    body = lambda st, xs: mixer(xs[0], st, xs[1])[::-1]
    _, y = jax.lax.scan(body, mixer.init_state(B, 0), (split(x_BxTxD), pos))
    return y.swapaxes(0, 1).reshape(x_BxTxD.shape)

  y = np.asarray(scanned(x_BxTxD))
  w = [np.asarray(p[...], np.float64) for p in (mixer.wq, mixer.wk, mixer.wv, mixer.wo)]
  for b in range(B):
    ref = naive_infini(np.asarray(x_BxTxD[b], np.float64), *w, np.asarray(mixer.beta[...]),
                       N_SEG, rule)
    np.testing.assert_allclose(y[b], ref, atol=1e-5, rtol=1e-5)


def test_delta_rule_rewrite_is_a_no_op_and_single_write_reads_back():
  r = jax.random.split(jax.random.key(0), 2)
  k_1x1x1xH = jax.random.normal(r[0], (1, 1, 1, 8))
  v_1x1x1xH = jax.random.normal(r[1], (1, 1, 1, 8))
  ones = jnp.ones((1, 1), bool)
  M0, z0 = jnp.zeros((1, 1, 8, 8)), jnp.zeros((1, 1, 8))
  M1, z1 = memory_update(M0, z0, k_1x1x1xH, v_1x1x1xH, ones, 'delta')
  np.testing.assert_allclose(memory_read(k_1x1x1xH, M1, z1), v_1x1x1xH, atol=1e-5)
  M2, z2 = memory_update(M1, z1, k_1x1x1xH, v_1x1x1xH, ones, 'delta')
  np.testing.assert_allclose(M2, M1, atol=1e-6)                 # the write was already there
  assert float(jnp.abs(z2 - 2 * z1).max()) < 1e-5               # z still counts it
  M2_lin, _ = memory_update(M1, z1, k_1x1x1xH, v_1x1x1xH, ones, 'linear')
  assert float(jnp.abs(M2_lin - M1).max()) > 0.1                # the linear rule adds it again


# --- The layer in the LM ---------------------------------------------------------------------

def test_fully_local_gate_equals_segment_local_attention():
  cfg = infini_config()
  model = LM(cfg.model, rngs=nnx.Rngs(0))
  set_gates(model, -1e4)                                        # sigmoid(beta) = 0: no memory
  plain = LM(tiny_config(**{'model.n_kv_heads': 2, 'model.n_layers': 1}).model, rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(model, nnx.Not(nnx.PathContains('beta'))))
  x = tokens()
  pos = jnp.broadcast_to(jnp.arange(48), (2, 48))
  per_segment = nnx.jit(lambda m, x, pos: m(x, m.init_state(2, 0), pos)[0])
  local = jnp.concatenate([per_segment(plain, x[:, s:s + N_SEG], pos[:, s:s + N_SEG])
                           for s in range(0, 48, N_SEG)], 1)
  forward = nnx.jit(lambda m, x: m(x)[0])
  assert float(jnp.abs(forward(model, x) - local).max()) < 1e-5
  cfg.model.infini.memory = False                               # the 'local' baseline preset
  baseline = LM(cfg.model, rngs=nnx.Rngs(0))
  assert float(jnp.abs(forward(baseline, x) - local).max()) < 1e-5


def test_state_size_does_not_depend_on_length():
  model = LM(infini_config().model, rngs=nnx.Rngs(0))
  shapes = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
  assert shapes(model.init_state(2, 64)) == shapes(model.init_state(2, 10 ** 6))
  out = lambda T: jax.eval_shape(lambda t: model(t, model.init_state(2, 1))[1],
                                 jax.ShapeDtypeStruct((2, T), jnp.int32))
  assert shapes(out(64)) == shapes(out(2 ** 16))
  assert all(a.dtype == jnp.float32 for s in model.init_state(2, 64)
             for a in (s.M_BxKxHxH, s.z_BxKxH))


def test_first_segment_is_finite_and_reads_nothing():
  model = LM(infini_config().model, rngs=nnx.Rngs(0))
  from training.step import loss_fn
  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, tokens(T=N_SEG + 1))   # 1 segment
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  zero = memory_read(jnp.ones((1, 2, 4, 16)), jnp.zeros((1, 2, 16, 16)), jnp.zeros((1, 2, 16)))
  assert float(jnp.abs(zero).max()) == 0.0


def test_bptt_flows_through_the_carried_memory():
  """grad(loss on the last of 3 segments, W_K) changes when the memory is detached."""
  x = tokens(T=3 * N_SEG + 1)

  def grad_wk(detach):
    cfg = infini_config()
    cfg.model.infini.detach = detach
    model = LM(cfg.model, rngs=nnx.Rngs(0))

    def last_segment_loss(model):
      logits, _ = model(x[:, :-1])
      logp = jax.nn.log_softmax(logits[:, -N_SEG:], -1)
      return -jnp.take_along_axis(logp, x[:, -N_SEG:, None], -1).mean()

    return nnx.jit(nnx.grad(last_segment_loss))(model).blocks[0].mixer.wk[...]

  full, truncated = grad_wk(False), grad_wk(True)
  assert float(jnp.abs(full).max()) > 0
  assert float(jnp.abs(full - truncated).max()) > 1e-3 * float(jnp.abs(full).max())


@pytest.mark.parametrize('rule,memory', [('delta', True), ('linear', False)])
def test_prefill_and_steps_equal_full_forward(rule, memory):
  """Across 3 segment boundaries (16, 32, 48): partial-segment K/V folded at each (and, for
  the segment-local baseline, dropped at each)."""
  cfg = infini_config(rule, **{'model.n_layers': 2})
  cfg.model.infini.memory = memory
  model = LM(cfg.model, rngs=nnx.Rngs(0))
  set_gates(model, 0.7)
  x = tokens(T=56)
  full = nnx.jit(lambda m, x: m(x)[0])(model, x)
  step = nnx.jit(lambda m, tok, t, st: decode.step(m, tok, jnp.full((2,), t), st))
  state = decode.init_state(model, 2, 64)
  last, state = decode.prefill(model, x[:, :20], state)
  rows = [last]
  for t in range(20, 56):
    logits, state = step(model, x[:, t], t, state)
    rows.append(logits)
  assert float(jnp.abs(jnp.stack(rows, 1) - full[:, 19:]).max()) < 1e-4
  # 56 tokens = 3 folded segments + 8 pending slots
  assert [int((s.pos_BxS >= 0).sum(-1).max()) for s in state] == [8, 8]


# --- Training: gate group, plug and play -----------------------------------------------------

def test_gate_group_gets_its_own_learning_rate():
  from training.step import make_optimizer, param_group
  cfg = infini_config(**{'train.warmup_steps': 0, 'train.lr': 1e-3})
  cfg.train.param_groups = (('mixer/beta$', 10.0, False),)
  model = LM(cfg.model, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           if param_group(p, cfg.train.param_groups)[0]]
  assert paths == ["['blocks'][0]['mixer']['beta'].value"]
  tx, _ = make_optimizer(cfg.train)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  beta_step = float(jnp.abs(updates['blocks'][0]['mixer']['beta'][...]).mean())
  norm_step = float(jnp.abs(updates['blocks'][0]['norm1']['scale'][...]).mean())
  assert beta_step == pytest.approx(10 * norm_step, rel=1e-3)


def test_plug_and_play_from_a_trained_attention_checkpoint(tmp_path):
  """A trained plain-attention run converts into Infini (same wq/wk/wv/wo, new gates) and
  continues training through training.loop.train from far below a fresh model's loss."""
  from training import mesh as meshlib
  from training.init_from import init_model_from, load_source
  from training.loop import train
  from training.state import model_ctor
  from training.metrics import read_metrics
  src_cfg = tiny_config(**{'model.n_kv_heads': 2, 'train.steps': 40, 'train.lr': 1e-2,
                           'train.warmup_steps': 5, 'train.log_every': 40,
                           'train.eval_every': 40, 'train.ckpt_every': 40})
  src_metrics = train(src_cfg, tmp_path / 'src')
  cfg = infini_config(**{'train.init_from': str(tmp_path / 'src'), 'train.steps': 3,
                         'model.n_kv_heads': 2, 'model.n_layers': 2, 'train.lr': 1e-3})
  cfg.model.infini.gate_init = -4.0                               # start almost local
  cfg.train.param_groups = (('mixer/beta$', 10.0, False),)
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  _, fresh, _ = meshlib.sharded_init(model_ctor(cfg), mesh, rules)
  loaded = init_model_from(cfg, mesh, fresh)
  source = load_source(cfg, mesh)
  for name in ('wq', 'wk', 'wv', 'wo'):
    np.testing.assert_array_equal(loaded['blocks'][1]['mixer'][name][...],
                                  source['blocks'][1]['mixer'][name][...])
  np.testing.assert_array_equal(loaded['blocks'][0]['mixer']['beta'][...], -4.0)
  train(cfg, tmp_path / 'infini')
  rows = read_metrics(tmp_path / 'infini')
  first = rows[1]['loss']
  assert np.isfinite(first) and np.isfinite(rows[3]['eval_loss'])
  assert first < src_metrics['eval_loss'] + 0.5 < 5.0, (first, src_metrics)


def test_presets_validate_and_bad_values_name_their_key():
  from configs.infini import get_config
  from training.config import ConfigError, resolve, validate
  for preset in ('tiny', 'local', 'small', 'paper'):
    validate(resolve(get_config(preset)), 1)
  for key, value, match in (('update_rule', 'hebb', 'model.infini.update_rule'),):
    cfg = resolve(get_config('tiny'))
    cfg.model.infini[key] = value
    with pytest.raises(ConfigError, match=match):
      validate(cfg, 1)
  cfg = resolve(get_config('tiny'))
  cfg.decode.prefill_chunk = 100
  with pytest.raises(ConfigError, match='decode.prefill_chunk'):
    validate(cfg, 1)
  cfg = resolve(get_config('tiny'))
  cfg.train.param_groups = (('beta(', 2.0, False),)
  with pytest.raises(ConfigError, match='train.param_groups'):
    validate(cfg, 1)
