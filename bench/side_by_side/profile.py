"""Section profile: the train step of the kind furthest from its speed target, under the
profiler and in parts, and on one core vs all; where it goes (worst_gap)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import (TooBig, alternate, at_length, log, on_one_core, op_trace, time_calls,
                          train_program, warm_steps)
from bench.side_by_side.kinds import init_model
from bench.side_by_side.targets import TARGET_LENGTHS, targets

CORE_ROUNDS = 2


def profile_section(kind, L, why, plain_remat, plan, setup):
  """Returns the profile of the train step of `kind` at length L (`why`: the page's reason):
  timed, run once under the profiler (how many XLA ops, how long each), and split into parts
  by timing fwd+bwd of each alone at the same batch and length: one block's mixer, its
  neural memory (Titans), its MLP. With more than one core: the kind's and plain's (at
  model.remat = plain_remat) steps on one core and on all (`core_scaling`)."""
  cfg = at_length(setup.config(kind), L, plan.train_tokens)
  plain_remat_over = {'model.remat': plain_remat} if plain_remat else {}
  plain = at_length(setup.config('plain', **plain_remat_over), L, plan.train_tokens)
  step = whole_step(kind, cfg, plain, plan)
  model = init_model(cfg)
  B, D = cfg.train.batch_size, cfg.model.d_model
  x = jax.random.normal(jax.random.key(0), (B, L, D))
  tok = jax.random.randint(jax.random.key(1), (B, L), 0, 256)       # token-dependent masks
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  blk = model.blocks[0]
  C = cfg.model.segment_len or L
  seg = lambda a: a.reshape(B, L // C, C, *a.shape[2:]).swapaxes(0, 1)
  # each segment recomputed in the backward pass where the kind's model.remat does (without,
  # a part's residuals for every segment made it slower alone than the whole step)
  remat = jax.checkpoint if cfg.model.remat != 'none' else (lambda f: f)

  def mixer_loss(mixer, x):
    state = mixer.init_state(B, L - C)
    if C == L:
      return mixer(x, state, pos, tokens_BxT=tok)[0].sum()

    def body(s, inp):
      y, s = mixer(inp[0], s, inp[1], tokens_BxT=inp[2])
      return s, y.sum()
    return jax.lax.scan(remat(body), state, (seg(x), seg(pos), seg(tok)))[1].sum()

  def memory_loss(memory, x):           # reads and writes, segment by segment
    def body(s, x_seg):
      reads, s = memory.forward(x_seg, s)
      return s, reads.sum()
    s, reads = jax.lax.scan(remat(body), memory.init_state(B), seg(x))
    return reads.sum() + sum(w.sum() for w in jax.tree.leaves(s.w))

  parts = {'mixer (one layer)': (blk.mixer, mixer_loss)}
  if hasattr(blk.mixer, 'memory'):
    parts['its neural memory (one layer)'] = (blk.mixer.memory, memory_loss)
  parts['MLP (one layer)'] = (blk.mlp, lambda mlp, x: mlp(x).sum())
  out = {}
  for name, (module, loss) in parts.items():
    graphdef, params = nnx.split(module)
    grad = jax.jit(jax.grad(lambda p, x: loss(nnx.merge(graphdef, p), x), argnums=(0, 1)))
    grad = grad.lower(params, x).compile()
    out[name] = 1e3 * time_calls(lambda: grad(params, x), max(plan.train_steps, 2), True)
  return dict(kind=kind, length=L, why=why, batch=B, layers=cfg.model.n_layers, parts_ms=out,
              plain_remat=plain_remat, **step)


def whole_step(kind, cfg, plain_cfg, plan):
  """Returns {step_ms, cores, op_trace's keys}: the train step compiled once, timed, traced
  and (with more than one core) compared with plain's on one core and on all."""
  one = train_program(cfg)[0]
  step_ms = 1e3 * time_calls(one, max(plan.train_steps, 2), compiled=True)
  trace = op_trace(one)
  cores = None
  if len(os.sched_getaffinity(0)) > 1:
    try:
      plain = warm_steps([plain_cfg])
      cores = core_scaling({kind: one, 'plain': plain[0]})
    except TooBig as e:                      # plain's step at L does not fit: no comparison
      log(f'cores: skipped ({e})')
  return dict(step_ms=step_ms, cores=cores, **trace)


def core_scaling(steps):
  """Returns {kind: {'one': [s], 'all': [s]}, 'cores': n}: each warm train step of `steps`
  ({kind: one()}) with every thread on one core and on all n cores of this process, all
  alternated for CORE_ROUNDS rounds."""
  times = alternate([f for one in steps.values() for f in (on_one_core(one), one)], CORE_ROUNDS)
  out = {k: dict(one=times[2 * i], all=times[2 * i + 1]) for i, k in enumerate(steps)}
  log('cores ' + '; '.join(f"{k}: {np.median(v['one']):.2f} s on one core, "
                           f"{np.median(v['all']):.2f} s on all" for k, v in out.items()))
  return dict(out, cores=len(os.sched_getaffinity(0)))


def worst_gap(res, path, plan):
  """Returns (kind, length, why, plain's remat) to profile: where the speed target missed
  by most was measured; with every speed target met, the memory kind slowest relative to
  plain at 2048 (this run's train and ratio rows, else those of the earlier run at `path`);
  plain's model.remat is the one its train row at that length ran (the faster; None: its
  preset's)."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  rows = res.get('train') or old.get('train')
  if not rows:
    raise SystemExit('profile: no train rows (run --sections=train first)')
  ratios = res.get('ratio') or old.get('ratio', [])
  missed = [t for t in targets(rows, {}, [], plan, ratios) if 'fraction' in t and not t['met']]
  if missed:
    t = min(missed, key=lambda t: t['fraction'])
    kind, L, why = t['kind'], t['length'], f"the target missed by most: {t['name']}, {t['value']}"
  else:
    L = TARGET_LENGTHS[0]
    r = min([r for r in rows if r['length'] == L and 'vs_plain' in r
             and not r['kind'].startswith('plain')], key=lambda r: r['vs_plain'])
    kind, why = r['kind'], f'the slowest kind relative to plain at {L}'
  plain = next((r for r in rows if r['kind'] == 'plain' and r['length'] == L), {})
  return kind, L, why, plain.get('remat')
