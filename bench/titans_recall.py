"""Titans long-context recall: MAC vs segment-only (sliding) attention vs full attention.

  python bench/titans_recall.py --steps=3000 --length=128 --curriculum=64:300 --out=OUT
  python bench/titans_recall.py --render=A.json,B.json --out=OUT     # one table of several runs

Task (multi-query associative recall on a small token alphabet): P key/value pairs (right
after BOS, or at a random depth with --depth=random), random filler tokens, then the P keys
again in random order, each followed by its value; the loss and the accuracy count only the
queried values. The pairs lie beyond the attention reach: at the start (distance ~ L), or
at random depth before the last n_layers x C positions (stacked sliding windows of C see
n_layers x C back). P = 1 is passkey retrieval. Chance = 1 / n_values. Every
variant trains for the same number of steps (or wall-clock seconds) at length L, per seed,
and is evaluated on held-out seeds at L and 2L, also per query rank (k-th query of a
sequence: a model that knows the values but not their keys scores 1/P, 1/(P-1), .., 1).
Variants: MAC, MAC without momentum / forgetting, LMM, MAG, MAL, sliding-window attention
(window = C, the reach of MAC's attention), full causal attention, and Infini-attention with
segments of C (infini, infini_delta; local: its attention inside the segment only; its gates
get their own lr and no weight decay as in configs/infini.py). Writes OUT.json, OUT.png and
prints a markdown table. bench/infini.py runs the passkey case through run_variant.
"""
import json
import os
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from bench import provenance
from bench.common import apply_overrides, infini_gates
from configs.base import get_base_config
from configs.infini import GATES
from models.lm import LM
from training.config import resolve, validate
from training.step import make_optimizer

_STEPS = flags.DEFINE_integer('steps', 0, 'Optimizer steps per variant (machine-independent '
                               'budget); 0: use --seconds.')
_SECONDS = flags.DEFINE_float('seconds', 240, 'Wall-clock budget per variant when --steps=0.')
_LR = flags.DEFINE_float('lr', 1e-3, 'Peak learning rate (warmup 50 steps, cosine to 0.1x).')
_CURRICULUM = flags.DEFINE_string(
    'curriculum', '', 'Shorter training sequences first: "LEN:STEPS,LEN:STEPS" (then L for the '
    'rest of the budget); the steps count in the budget.')
_SET = flags.DEFINE_string('set', '', 'Model config overrides for every variant, '
                           '"titans.theta_max=1.0,titans.grad_clip=0" (each converted to the '
                           'type of its key).')
_GATE_BIAS = flags.DEFINE_string('gate_bias', '', 'Initial gate biases "theta,eta,alpha" (pre-'
                                 'sigmoid; model.titans.gate_bias) for the memory variants.')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 8, 'Held-out batches of 32 per length.')
_LEN = flags.DEFINE_integer('length', 256, 'Training sequence length L.')
_SEG = flags.DEFINE_integer('segment', 32, 'Segment length C (= the sliding window).')
_PAIRS = flags.DEFINE_integer('pairs', 4, 'Key/value pairs per sequence.')
_VALUES = flags.DEFINE_integer('values', 32, 'Value alphabet (chance = 1 / values).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_DEPTH = flags.DEFINE_enum('depth', 'start', ['start', 'random'], 'Where the pairs are: right '
                           'after BOS, or at a random depth beyond the reach of stacked '
                           'windows (before the last n_layers x C positions).')
_VARIANTS = flags.DEFINE_string('variants', 'mac,sliding,full,mac_no_momentum,mac_no_forget',
                                'Comma list.')
_SEEDS = flags.DEFINE_string('seeds', '0', 'Comma list: every variant is trained once per seed '
                             '(model init and training data; the held-out data is fixed).')
_OUT = flags.DEFINE_string('out', 'bench/results/titans', 'Output path prefix.')
_RENDER = flags.DEFINE_string('render', '', 'Comma list of OUT.json files of earlier runs: print '
                              'their joint table and plot them to --out.png (no training).')

MEASURES = provenance.CORE + ('models/titans.py',)   # the code the rows measure

KEY0, VAL0, FILL0, N_FILL = 10, 100, 180, 64
N_LAYERS = 2


def make_batch(rng, B, L, P, V, C=0):
  """tokens [B, L+1] and a mask of the positions whose next token is a queried value.
  C = 0: the pairs right after BOS; C > 0: at a random depth, ending before the last C
  input positions (the queries' attention reach)."""
  if C and L - C - 2 * P < 1:
    raise ValueError(f'--depth=random at length {L}: no room for {P} pairs beyond the reach '
                     f'{C} (n_layers x segment); use longer sequences')
  toks = np.concatenate([np.ones((B, 1), np.int64),
                         rng.integers(FILL0, FILL0 + N_FILL, (B, L))], 1)
  mask = np.zeros((B, L), bool)
  for b in range(B):
    keys = rng.choice(64, P, replace=False) + KEY0
    vals = rng.integers(0, V, P) + VAL0
    s = rng.integers(1, L - C - 2 * P + 1) if C else 1
    toks[b, s:s + 2 * P:2], toks[b, s + 1:s + 1 + 2 * P:2] = keys, vals
    order = rng.permutation(P)
    q0 = L + 1 - 2 * P
    toks[b, q0::2], toks[b, q0 + 1::2] = keys[order], vals[order]
    mask[b, q0::2] = True                 # input position of the key -> predicts its value
  return jnp.asarray(toks, jnp.int32), jnp.asarray(mask)


def variant_config(name, L, C, o):
  cfg = get_base_config()
  m = cfg.model
  m.update(dict(d_model=64, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, segment_len=C, window=C))
  m.titans.update(dict(chunk=8, expansion=2, persistent=4))
  cfg.data.seq_len = L
  if name.startswith('mac'):
    m.mixer = 'titans_mac'
    m.titans.momentum = name != 'mac_no_momentum'
    m.titans.forget = name != 'mac_no_forget'
  elif name in ('lmm', 'mag', 'mal'):
    m.mixer = 'titans_' + name                  # MAG / MAL: sliding window C + memory
  elif name == 'sliding':
    m.mixer = 'sliding'
  elif name.startswith('infini') or name == 'local':   # Infini-attention, segments of C
    m.mixer = 'infini'
    m.infini.update_rule = 'delta' if name == 'infini_delta' else 'linear'
    m.infini.memory = name != 'local'          # local: attention inside the segment only
  else:
    m.mixer, m.segment_len = 'attention', 0
  apply_overrides(cfg, dict(('model.' + k, v) for k, v in (
      item.split('=') for item in filter(None, o.set.split(',')))))
  if o.gate_bias:
    m.titans.gate_bias = tuple(float(b) for b in o.gate_bias.split(','))
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
  """(mean nll, accuracy) over the queried values, and the hits [B, L]."""
  logits, _ = model(toks[:, :-1])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1)[..., 0]
  acc = (logits.argmax(-1) == toks[:, 1:])
  return (nll * mask).sum() / mask.sum(), ((acc * mask).sum() / mask.sum(), acc)


def options(**changes):
  """The run's settings: the flags' values, with `changes` (other bench scripts' settings)."""
  names = ('steps', 'seconds', 'lr', 'curriculum', 'set', 'gate_bias', 'eval_batches', 'length',
           'segment', 'pairs', 'values', 'batch', 'depth')
  o = SimpleNamespace(**{n: flags.FLAGS[n].value for n in names}, eval_lengths=(1, 2))
  return SimpleNamespace(**{**vars(o), **changes})


def run_variant(name, seed, o):
  """Trains one variant on the recall task and evaluates it on held-out seeds at o.length
  times each of o.eval_lengths."""
  L, C = o.length, o.segment
  cfg = variant_config(name, L, C, o)
  # make_batch's C: 0 (pairs after BOS) or the reach of stacked windows, n_layers x C (a
  # 2-layer sliding window of C sees 2C back: random-depth needles must lie before that).
  reach = N_LAYERS * C if o.depth == 'random' else 0
  model = LM(cfg.model, rngs=nnx.Rngs(seed))
  total = o.steps or 4000
  warm = min(50, total // 4)
  sched = optax.warmup_cosine_decay_schedule(0, o.lr, warm, total, o.lr / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched))
  if cfg.model.mixer == 'infini':      # the gates' own lr and no weight decay (configs/infini.py)
    t = cfg.train.copy_and_resolve_references()
    t.update(lr=o.lr, steps=total, warmup_steps=warm, weight_decay=1e-4, b2=0.999,
             param_groups=GATES)
    tx = make_optimizer(t)[0]
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, toks, mask):
    (loss, (acc, _)), g = nnx.value_and_grad(masked_loss, has_aux=True)(model, toks, mask)
    opt.update(model, g)
    return loss, acc

  evaluate = nnx.jit(masked_loss)
  rng = np.random.default_rng(seed)
  stages = [(int(a), int(b)) for a, b in (
      x.split(':') for x in filter(None, o.curriculum.split(',')))]
  length_at = _length_schedule(stages, L)
  t0, steps, curve = time.time(), 0, []
  budget_left = ((lambda: steps < o.steps) if o.steps
                 else (lambda: time.time() - t0 < o.seconds))
  while budget_left():
    n = length_at(steps)
    batch = make_batch(rng, o.batch, n, o.pairs, o.values, reach)
    loss, acc = step(model, opt, *batch)
    steps += 1
    if steps % 20 == 0:
      curve.append((steps, round(time.time() - t0, 1), float(loss), float(acc), n))
      print(name, seed, curve[-1], flush=True)
  result = dict(variant=name, seed=seed, steps=steps, train_seconds=round(time.time() - t0, 1),
                curve=curve)
  for length in (m * L for m in o.eval_lengths):
    erng = np.random.default_rng(10_000 + length)            # held-out seeds
    hits = []                                # [queries, P]: the k-th query of each sequence
    for _ in range(o.eval_batches):
      toks, mask = make_batch(erng, 32, length, o.pairs, o.values, reach)
      hit = np.asarray(evaluate(model, toks, mask)[1][1])
      hits.append(hit[np.asarray(mask)].reshape(len(hit), o.pairs))
    hits = np.concatenate(hits)
    result[f'acc_{length}'] = float(hits.mean())
    result[f'acc_{length}_by_query'] = hits.mean(0).round(3).tolist()
  result['gates'] = infini_gates(nnx.state(model), cfg.model)
  print(json.dumps({k: v for k, v in result.items() if k != 'curve'}), flush=True)
  return result


def smoothed(curve, k=5):
  """(steps, trailing k-point mean train accuracy) of a run's logged curve; empty when the
  curve has fewer than k points (or k < 1)."""
  steps, acc = np.array([p[0] for p in curve]), np.array([p[3] for p in curve])
  if k < 1 or len(acc) < k:
    return steps[:0], acc[:0]
  return steps[k - 1:], np.convolve(acc, np.ones(k) / k, 'valid')


def escape_step(curve, level=0.5, k=5):
  """The first logged step whose trailing k-point mean train accuracy reaches `level` (the
  step a run leaves the chance plateau), or None."""
  steps, means = smoothed(curve, k)
  hit = np.flatnonzero(means >= level)
  return int(steps[hit[0]]) if len(hit) else None


def render(runs, out):
  """Markdown table (printed) and OUT.png of the results of one or more runs' JSON."""
  def label(run, r):                   # runs with overrides get their own rows
    extra = [x for x in (run['config'].get('set'), run['config'].get('gate_bias') and
                         f"gate_bias={run['config']['gate_bias']}") if x]
    return r['variant'] + (f" ({', '.join(extra)})" if extra else '')
  results = [dict(r, variant=label(run, r)) for run in runs for r in run['results']]
  L = runs[0]['config']['length']
  P = runs[0]['config']['pairs']
  lines = [f'| variant | steps | seeds | acc @ {L} (mean; per seed) | acc @ {2 * L} | '
           'train acc >= 0.5 from step |' + (f' acc @ {L} by query, 1st .. {P}th |' if P > 1
                                             else ''),
           '|---|---|---|---|---|---|' + ('---|' if P > 1 else '')]
  for name in dict.fromkeys(r['variant'] for r in results):
    rs = [r for r in results if r['variant'] == name]
    cell = lambda k: f"{np.mean([r[k] for r in rs]):.3f}" + (
        f" ({', '.join(f'{r[k]:.2f}' for r in rs)})" if len(rs) > 1 else '')
    by = [r[f'acc_{L}_by_query'] for r in rs if f'acc_{L}_by_query' in r]
    by = (' / '.join(f'{a:.2f}' for a in np.mean(by, 0)) +
          (f' ({len(by)} of the seeds)' if len(by) < len(rs) else '')) if by else '-'
    escapes = ', '.join(str(escape_step(r['curve']) or 'never') for r in rs)
    lines.append(f"| {name} | {rs[0]['steps']} | {len(rs)} | {cell(f'acc_{L}')} | "
                 f"{cell(f'acc_{2 * L}')} | {escapes} |" + (f' {by} |' if P > 1 else ''))
  lines.append(f"\nChance = {1 / runs[0]['config']['values']:.3f}.")
  if P > 1:
    lines[-1] += (f' Values known but not bound to their keys (guess among the values not yet '
                  f'answered): {np.mean([1 / (P - k) for k in range(P)]):.3f}, by query '
                  f"{' / '.join(f'{1 / (P - k):.2f}' for k in range(P))}.")
  print('\n'.join(lines))
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for r in results:
    steps, means = smoothed(r['curve'], min(5, len(r['curve'])))   # trailing 5-point mean
    if len(means):
      ax.plot(steps, means, label=f"{r['variant']} s{r.get('seed', 0)}")
  ax.axhline(1 / runs[0]['config']['values'], ls=':', c='gray', label='chance')
  ax.set(xlabel='step', ylabel='train recall accuracy (5-point mean)',
         title=f"recall at distance ~{L} (C={runs[0]['config']['segment']})")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out + '.png', dpi=100)


def main(argv):
  del argv
  if _RENDER.value:
    runs = []
    for path in _RENDER.value.split(','):
      with open(path) as f:
        runs.append(json.load(f))
    return render(runs, _OUT.value)
  results, o = [], options()
  config = dict(vars(o), seeds=_SEEDS.value, eval_queries=32 * o.eval_batches * o.pairs)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  for name in _VARIANTS.value.split(','):
    for seed in map(int, _SEEDS.value.split(',')):
      results.append(run_variant(name, seed, o))
      run = dict(config=config, argv=sys.argv[1:], results=results,
                 provenance=provenance.record(MEASURES, _SEEDS.value))
      with open(_OUT.value + '.json', 'w') as f:
        json.dump(run, f, indent=1)
  render([run], _OUT.value)


if __name__ == '__main__':
  app.run(main)
