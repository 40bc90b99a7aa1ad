"""Titans long-context recall: MAC vs segment-only (sliding) attention vs full attention.

  python bench/titans_recall.py --seconds=240 --out=bench/results/titans

Task (multi-query associative recall on a small token alphabet): P key/value pairs right
after BOS, then random filler tokens, then the P keys again, each followed by its value;
the loss and the accuracy count only the queried values. Keys come first, queries last,
so the distance is ~ the sequence length: far beyond the attention window/segment C.
Chance = 1 / n_values. Every model trains for the same wall-clock budget (CPU) at length
L, and is evaluated on held-out seeds at L and 2L. Variants: MAC, MAC without momentum,
MAC without forgetting, sliding-window attention (window = C, the same reach as MAC's
attention), full causal attention. Writes OUT.json, OUT.png and prints a markdown table.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from bench.common import apply_overrides
from configs.base import get_base_config
from models import titans
from models.lm import LM
from training.config import resolve, validate

_STEPS = flags.DEFINE_integer('steps', 0, 'Optimizer steps per variant (machine-independent '
                               'budget); 0: use --seconds.')
_SECONDS = flags.DEFINE_float('seconds', 240, 'Wall-clock budget per variant when --steps=0.')
_LR = flags.DEFINE_float('lr', 3e-3, 'Peak learning rate (warmup 50 steps, cosine to 0.1x).')
_CURRICULUM = flags.DEFINE_string(
    'curriculum', '', 'Shorter training sequences first: "LEN:STEPS,LEN:STEPS" (then L for the '
    'rest of the budget); the steps count in the budget.')
_SET = flags.DEFINE_string('set', '', 'Model config overrides for every variant, '
                           '"titans.theta_max=1.0,titans.grad_clip=0" (each converted to the '
                           'type of its key).')
_GATE_BIAS = flags.DEFINE_string('gate_bias', '', 'Initial gate biases "theta,eta,alpha" (pre-'
                                 'sigmoid; models.titans.GATE_BIAS) for the memory variants.')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 8, 'Held-out batches of 32 per length.')
_LEN = flags.DEFINE_integer('length', 256, 'Training sequence length L.')
_SEG = flags.DEFINE_integer('segment', 32, 'Segment length C (= the sliding window).')
_PAIRS = flags.DEFINE_integer('pairs', 4, 'Key/value pairs per sequence.')
_VALUES = flags.DEFINE_integer('values', 32, 'Value alphabet (chance = 1 / values).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_VARIANTS = flags.DEFINE_string('variants', 'mac,sliding,full,mac_no_momentum,mac_no_forget',
                                'Comma list.')
_OUT = flags.DEFINE_string('out', 'bench/results/titans', 'Output path prefix.')

KEY0, VAL0, FILL0, N_FILL = 10, 100, 180, 64


def make_batch(rng, B, L, P, V):
  """tokens [B, L+1] and a mask of the positions whose next token is a queried value."""
  toks = np.concatenate([np.ones((B, 1), np.int64),
                         rng.integers(FILL0, FILL0 + N_FILL, (B, L))], 1)
  mask = np.zeros((B, L), bool)
  for b in range(B):
    keys = rng.choice(64, P, replace=False) + KEY0
    vals = rng.integers(0, V, P) + VAL0
    toks[b, 1:1 + 2 * P:2], toks[b, 2:2 + 2 * P:2] = keys, vals
    order = rng.permutation(P)
    q0 = L + 1 - 2 * P
    toks[b, q0::2], toks[b, q0 + 1::2] = keys[order], vals[order]
    mask[b, q0::2] = True                 # input position of the key -> predicts its value
  return jnp.asarray(toks, jnp.int32), jnp.asarray(mask)


def variant_config(name, L, C):
  cfg = get_base_config()
  m = cfg.model
  m.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=C, window=C))
  m.titans.update(dict(chunk=8, expansion=2, persistent=4))
  cfg.data.seq_len = L
  if name.startswith('mac'):
    m.mixer = 'titans_mac'
    m.titans.momentum = name != 'mac_no_momentum'
    m.titans.forget = name != 'mac_no_forget'
  elif name == 'lmm':
    m.mixer = 'titans_lmm'
  elif name == 'sliding':
    m.mixer = 'sliding'
  else:
    m.mixer, m.segment_len = 'attention', 0
  apply_overrides(cfg, dict(('model.' + k, v) for k, v in (
      item.split('=') for item in filter(None, _SET.value.split(',')))))
  cfg = resolve(cfg)
  validate(cfg, 1)
  return cfg


def _length_schedule(stages, L):
  """step -> training length: each (LEN, STEPS) stage in turn, then L."""
  ends = np.cumsum([n for _, n in stages]) if stages else []

  def length_at(i):
    for (n, _), end in zip(stages, ends):
      if i < end:
        return n
    return L
  return length_at


def masked_loss(model, toks, mask):
  logits, _ = model(toks[:, :-1])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1)[..., 0]
  acc = (logits.argmax(-1) == toks[:, 1:])
  return (nll * mask).sum() / mask.sum(), (acc * mask).sum() / mask.sum()


def run_variant(name):
  L, C = _LEN.value, _SEG.value
  cfg = variant_config(name, L, C)
  if _GATE_BIAS.value:
    titans.GATE_BIAS = tuple(float(b) for b in _GATE_BIAS.value.split(','))
  model = LM(cfg.model, rngs=nnx.Rngs(0))
  total = _STEPS.value or 4000
  warm = min(50, total // 4)
  sched = optax.warmup_cosine_decay_schedule(0, _LR.value, warm, total, _LR.value / 10)
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched)),
                      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, toks, mask):
    (loss, acc), g = nnx.value_and_grad(masked_loss, has_aux=True)(model, toks, mask)
    opt.update(model, g)
    return loss, acc

  evaluate = nnx.jit(masked_loss)
  rng = np.random.default_rng(0)
  stages = [(int(a), int(b)) for a, b in (
      x.split(':') for x in filter(None, _CURRICULUM.value.split(',')))]
  length_at = _length_schedule(stages, L)
  t0, steps, curve = time.time(), 0, []
  budget_left = ((lambda: steps < _STEPS.value) if _STEPS.value
                 else (lambda: time.time() - t0 < _SECONDS.value))
  while budget_left():
    n = length_at(steps)
    loss, acc = step(model, opt, *make_batch(rng, _BATCH.value, n, _PAIRS.value, _VALUES.value))
    steps += 1
    if steps % 20 == 0:
      curve.append((steps, round(time.time() - t0, 1), float(loss), float(acc), n))
      print(name, curve[-1], flush=True)
  result = dict(variant=name, steps=steps, train_seconds=round(time.time() - t0, 1), curve=curve)
  for length in (L, 2 * L):
    erng = np.random.default_rng(10_000 + length)            # held-out seeds
    accs = [float(evaluate(model, *make_batch(erng, 32, length, _PAIRS.value, _VALUES.value))[1])
            for _ in range(_EVAL_BATCHES.value)]
    result[f'acc_{length}'] = float(np.mean(accs))
  print(json.dumps({k: v for k, v in result.items() if k != 'curve'}), flush=True)
  return result


def main(argv):
  del argv
  results = []
  for name in _VARIANTS.value.split(','):
    results.append(run_variant(name))
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value + '.json', 'w') as f:
      json.dump(dict(config=dict(length=_LEN.value, segment=_SEG.value, pairs=_PAIRS.value,
                                 values=_VALUES.value, batch=_BATCH.value,
                                 steps=_STEPS.value, seconds=_SECONDS.value, lr=_LR.value,
                                 curriculum=_CURRICULUM.value, set=_SET.value,
                                 gate_bias=_GATE_BIAS.value,
                                 eval_queries=32 * _EVAL_BATCHES.value * _PAIRS.value),
                 argv=sys.argv[1:], results=results), f, indent=1)
  L = _LEN.value
  lines = [f'| variant | steps | acc @ {L} | acc @ {2 * L} |', '|---|---|---|---|']
  lines += [f"| {r['variant']} | {r['steps']} | {r[f'acc_{L}']:.3f} | {r[f'acc_{2 * L}']:.3f} |"
            for r in results]
  print('\n'.join(lines) + f'\nchance = {1 / _VALUES.value:.3f}')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for r in results:
    c = np.array([p[0] for p in r['curve']]), np.array([p[3] for p in r['curve']])
    ax.plot(*c, label=r['variant'])
  ax.axhline(1 / _VALUES.value, ls=':', c='gray', label='chance')
  ax.set(xlabel='step', ylabel='train recall accuracy', title=f'recall at distance ~{L} (C={_SEG.value})')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(_OUT.value + '.png', dpi=100)


if __name__ == '__main__':
  app.run(main)
