"""NAMM vs recency / H2O / L2 at matched mean cache on held-out prompts; zero-shot transfer.

  python bench/namm.py --base=runs/base --runs=runs/namm_s0,runs/namm_s1,runs/namm_s2 \
      [--transfer_base=runs/base_b] [--prompts=32] [--out=bench/results/namm]

For each evolve.py run (one per seed) and task of its curriculum, on held-out prompts
(eval split, a base seed no run has seen): the full-cache score, the NAMM score (shipped
mean) and its cache fraction at the end of the prefill, then each baseline with its budget
set to NAMM's mean cache size on that task (so caches match). Scores are normalised by the
full cache (mean score / mean full-cache score), as in the fitness. Prints a markdown table,
writes OUT.json and OUT.png.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from models import eviction, namm as nammlib
from training import evolve as evo

_BASE = flags.DEFINE_string('base', None, 'train.py workdir of the base LM the runs evolved on.')
_RUNS = flags.DEFINE_list('runs', None, 'evolve.py workdirs (one per seed).')
_TRANSFER = flags.DEFINE_string('transfer_base', '', 'A second base LM for zero-shot transfer.')
_PROMPTS = flags.DEFINE_integer('prompts', 32, 'Held-out prompts per task.')
_SEED = flags.DEFINE_integer('seed', 1000, 'Base seed of the held-out prompts (eval split).')
_OUT = flags.DEFINE_string('out', 'bench/results/namm', 'Output prefix (.json / .png).')
flags.mark_flags_as_required(['base', 'runs'])


def evaluate(base, policy, theta, mu, sigma, tokens, contexts, chunk):
  graphdef, state, _ = base
  score = jax.jit(evo.make_scorer(graphdef, policy, contexts, chunk))
  out = {}
  for t, tok in tokens.items():
    s, frac, _ = score(state, theta, mu, sigma, {t: tok})
    out[t] = dict(score=float(np.mean(s[t])), cache=float(frac))
  return out


def compare(base, run_arrays, namm_cfg, ev, seed, n):
  """{policy: {task: {score, cache, normalised}}} on held-out prompts of one base LM."""
  policy = nammlib.namm_from_config(namm_cfg)
  chunk = policy.update_interval
  tasks = evo.all_tasks(ev)
  sets = {t: evo.task_examples(t, n, ev.length, seed, 'eval', evo.corpus_source(base[2]))
          for t in tasks}
  tokens = {t: v['tokens'] for t, v in sets.items()}
  contexts = {t: v['context'] for t, v in sets.items()}
  F = policy.n_feat
  zeros = (jnp.zeros(policy.n_params), jnp.zeros(F), jnp.ones(F))
  full = evaluate(base, policy, *zeros, tokens, contexts, chunk)
  res = dict(full=full)
  res['namm'] = evaluate(base, policy, jnp.asarray(run_arrays['theta']),
                         jnp.asarray(run_arrays['mu']), jnp.asarray(run_arrays['sigma']),
                         tokens, contexts, chunk)
  for name in ('recency', 'h2o', 'l2'):
    res[name] = {}
    for t in tasks:
      budget = max(int(round(res['namm'][t]['cache'] * contexts[t])), 2)
      pol = dict(recency=eviction.Recency(budget), h2o=nammlib.H2O(budget, budget // 2),
                 l2=nammlib.L2Norm(budget, min(8, budget)))[name]
      res[name].update(evaluate(base, pol, *zeros, {t: tokens[t]}, {t: contexts[t]}, chunk))
  for name, by_task in res.items():
    for t, r in by_task.items():
      r['normalised'] = r['score'] / max(full[t]['score'], 1e-7)
  return res


def summarise(res):
  return {name: dict(normalised=float(np.mean([r['normalised'] for r in by.values()])),
                     cache=float(np.mean([r['cache'] for r in by.values()])))
          for name, by in res.items()}


def main(argv):
  del argv
  t0 = time.time()
  base = evo.load_base(_BASE.value)
  report = dict(base=_BASE.value, runs=[], transfer=[])
  for run in _RUNS.value:
    arrays, namm_dict = evo.load_policy_arrays(run)
    ck = evo.EvolveCheckpointer(run, read_only=True)
    saved = ck.read_config(ck.latest())
    ck.close()
    ev = ml_collections.ConfigDict(saved['evolve'])
    namm_cfg = ml_collections.ConfigDict(namm_dict)
    res = compare(base, arrays, namm_cfg, ev, _SEED.value, _PROMPTS.value)
    report['runs'].append(dict(run=run, seed=saved['seed'], results=res, summary=summarise(res)))
    print(run, json.dumps(summarise(res)), flush=True)
    if _TRANSFER.value:
      other = evo.load_base(_TRANSFER.value)
      res = compare(other, arrays, namm_cfg, ev, _SEED.value, _PROMPTS.value)
      report['transfer'].append(dict(run=run, base=_TRANSFER.value, results=res,
                                     summary=summarise(res)))
      print('transfer', run, json.dumps(summarise(res)), flush=True)
  report['seconds'] = time.time() - t0
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(report, f, indent=2)
  print(table(report))
  plot(report, _OUT.value + '.png')


def table(report):
  names = ('full', 'namm', 'recency', 'h2o', 'l2')
  lines = ['| base | run (seed) | ' + ' | '.join(f'{n} score / cache' for n in names) + ' |',
           '|---' * (len(names) + 2) + '|']
  for kind in ('runs', 'transfer'):
    for r in report[kind]:
      s = r['summary']
      lines.append(f"| {'transfer' if kind == 'transfer' else 'same'} | {r.get('seed', '')} "
                   f"{os.path.basename(r['run'])} | " +
                   ' | '.join(f"{s[n]['normalised']:.3f} / {s[n]['cache']:.2f}" for n in names)
                   + ' |')
  return '\n'.join(lines)


def plot(report, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2 if report['transfer'] else 1, figsize=(9, 3.5), squeeze=False)
  for ax, kind in zip(axes[0], ('runs', 'transfer')):
    for name, marker in (('namm', 'o'), ('recency', 's'), ('h2o', '^'), ('l2', 'v'),
                         ('full', '*')):
      pts = [(r['summary'][name]['cache'], r['summary'][name]['normalised'])
             for r in report[kind]]
      if pts:
        ax.scatter(*zip(*pts), marker=marker, label=name)
    ax.axhline(1.0, color='gray', lw=0.5)
    ax.set(xlabel='mean cache / context', ylabel='normalised score',
           title='same base LM' if kind == 'runs' else 'zero-shot transfer')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
