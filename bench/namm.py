"""NAMM vs recency / H2O / L2 at matched mean cache on held-out prompts; zero-shot transfer.

  python bench/namm.py --base=runs/base --runs=runs/namm_s0,runs/namm_s1,runs/namm_s2 \
      [--transfer_base=runs/base_b] [--prompts=32] [--out=bench/results/namm]

For each evolve.py run (one per seed) and task of its curriculum, on held-out prompts
(eval split, a base seed no run has seen): the full-cache score, the NAMM score (shipped
mean) and its cache fraction at the end of the prefill, then each baseline with its budget
set to NAMM's mean cache size on that task (so caches match). Scores are normalised by the
full cache (mean score / mean full-cache score), as in the fitness. Writes the results page
OUT.md (tables, evolution curve, the targets met or missed), OUT.json and OUT.png.
"""
import json
import os
import shutil
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from bench import provenance
from bench.common import machine
from models import eviction, namm as nammlib
from training import evolve as evo
from training.checkpoint import Checkpointer
from training.metrics import read_metrics

_BASE = flags.DEFINE_string('base', None, 'train.py workdir of the base LM the runs evolved on.')
_RUNS = flags.DEFINE_list('runs', None, 'evolve.py workdirs (one per seed).')
_TRANSFER = flags.DEFINE_string('transfer_base', '', 'A second base LM for zero-shot transfer.')
_PROMPTS = flags.DEFINE_integer('prompts', 32, 'Held-out prompts per task.')
_SEED = flags.DEFINE_integer('seed', 1000, 'Base seed of the held-out prompts (eval split).')
_OUT = flags.DEFINE_string('out', 'bench/results/namm', 'Output prefix (.json / .png).')
MEASURES = provenance.CORE + ('models/namm.py', 'models/eviction.py', 'training/evolve.py')
flags.mark_flags_as_required(['base', 'runs'])


def evaluate(base, policy, tokens, contexts, chunk):
  score = jax.jit(evo.make_scorer(base.graphdef, contexts, chunk))
  out = {}
  for t, tok in tokens.items():
    s, frac_L, _ = score(base.state, policy, {t: tok})
    out[t] = dict(score=float(np.mean(s[t])), cache=float(np.mean(frac_L)),
                  layers=np.asarray(frac_L).round(4).tolist())
  return out


def compare(base, policy, ev, seed, n):
  """{policy: {task: {score, cache, normalised}}} on held-out prompts of one base LM
  (`policy`: an evolve.py run's NAMM)."""
  chunk = policy.update_interval
  tasks = evo.all_tasks(ev)
  sets = {t: evo.task_examples(t, n, ev.length, seed, 'eval', evo.corpus_source(base.cfg),
                               base.cfg.data.tokenizer)
          for t in tasks}
  tokens = {t: v['tokens'] for t, v in sets.items()}
  contexts = {t: v['context'] for t, v in sets.items()}
  keep_all = policy.replace(theta=jnp.zeros_like(policy.theta), mu=jnp.zeros_like(policy.mu),
                            sigma=jnp.ones_like(policy.sigma))         # zero parameters
  full = evaluate(base, keep_all, tokens, contexts, chunk)
  res = dict(full=full)
  res['namm'] = evaluate(base, policy, tokens, contexts, chunk)
  for name in ('recency', 'h2o', 'l2'):
    res[name] = {}
    for t in tasks:
      budget = max(int(round(res['namm'][t]['cache'] * contexts[t])), 2)
      pol = dict(recency=eviction.Recency(budget), h2o=nammlib.H2O(budget, budget // 2),
                 l2=nammlib.L2Norm(budget, min(8, budget)))[name]
      res[name].update(evaluate(base, pol, {t: tokens[t]}, {t: contexts[t]}, chunk))
  for name, by_task in res.items():
    for t, r in by_task.items():
      r['normalised'] = r['score'] / max(full[t]['score'], 1e-7)
  return res


def summarise(res):
  return {name: dict(normalised=float(np.mean([r['normalised'] for r in by.values()])),
                     cache=float(np.mean([r['cache'] for r in by.values()])))
          for name, by in res.items()}


def run_info(run):
  """The evolve.py run's saved config and its per-generation metrics."""
  saved = Checkpointer.saved_config(run)
  rows = read_metrics(run)
  gens = sorted(rows)
  held = [dict(gen=g, stage=int(rows[g]['stage']), score=rows[g]['heldout_score'],
               cache=rows[g]['heldout_cache'], val=rows[g].get('val_fitness'))
          for g in gens if 'heldout_score' in rows[g]]
  return saved, dict(generations=len(gens), held=held,
                     shipped_gen=int(rows[gens[-1]].get('best_val_gen', 0)) or None if gens else None,
                     seconds=rows[gens[-1]]['time'] - rows[gens[0]]['time'] if gens else 0)


def base_info(base):
  c = base.cfg
  return dict(layers=c.model.n_layers, d_model=c.model.d_model, heads=c.model.n_heads,
              kv_heads=c.model.n_kv_heads, steps=c.train.steps, seq_len=c.data.seq_len,
              source=c.data.source, loss=c.data.loss)


def main(argv):
  del argv
  t0 = time.time()
  base = evo.load_base(_BASE.value)
  other = evo.load_base(_TRANSFER.value) if _TRANSFER.value else None
  report = dict(command=' '.join(['python bench/namm.py'] + sys.argv[1:]), machine=machine(),
                date=time.strftime('%Y-%m-%d'), prompts=_PROMPTS.value, seed=_SEED.value,
                base=dict(path=_BASE.value, **base_info(base)), runs=[], transfer=[],
                provenance=provenance.record(MEASURES, _SEED.value))
  if other:
    report['transfer_base'] = dict(path=_TRANSFER.value, **base_info(other))
  for run in _RUNS.value:
    policy = evo.load_namm(run)
    saved, evolution = run_info(run)
    ev = ml_collections.ConfigDict(saved['evolve'])
    res = compare(base, policy, ev, _SEED.value, _PROMPTS.value)
    settings = dict(strategy=ev.strategy, population=ev.population, stages=list(ev.stages),
                    generations=list(ev.generations), prompts=ev.prompts, length=ev.length,
                    cache_weight=ev.get('cache_weight', 0.0),
                    update_interval=policy.update_interval)
    report['runs'].append(dict(run=run, seed=saved['seed'], results=res, summary=summarise(res),
                               settings=settings, evolution=evolution))
    print(run, json.dumps(summarise(res)), flush=True)
    if other:
      res = compare(other, policy, ev, _SEED.value, _PROMPTS.value)
      report['transfer'].append(dict(run=run, seed=saved['seed'], results=res,
                                     summary=summarise(res)))
      print('transfer', run, json.dumps(summarise(res)), flush=True)
  report['seconds'] = time.time() - t0
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(report, f, indent=2)
  for r in report['runs']:                  # each run's fitness / cache curve (evolve.png)
    shutil.copy(os.path.join(r['run'], 'evolve.png'), f"{_OUT.value}_evolve_s{r['seed']}.png")
  page = render(report, os.path.basename(_OUT.value) + '.png')
  with open(_OUT.value + '.md', 'w') as f:
    f.write(page)
  print(page)
  plot(report, _OUT.value + '.png')


NAMES = ('full', 'namm', 'recency', 'h2o', 'l2')


def table(report):
  lines = ['| base | seed | ' + ' | '.join(f'{n} score / cache' for n in NAMES) + ' |',
           '|---' * (len(NAMES) + 2) + '|']
  for kind in ('runs', 'transfer'):
    for r in report[kind]:
      s = r['summary']
      lines.append(f"| {'B (transfer)' if kind == 'transfer' else 'A'} | {r['seed']} | " +
                   ' | '.join(f"{s[n]['normalised']:.3f} / {s[n]['cache']:.2f}" for n in NAMES)
                   + ' |')
  return '\n'.join(lines)


def task_table(runs):
  """Per task, mean over seeds: raw full-cache score, then normalised score / cache."""
  tasks = list(runs[0]['results']['full'])
  mean = lambda name, t, key: np.mean([r['results'][name][t][key] for r in runs])
  lines = ['| task | full-cache score | ' + ' | '.join(f'{n} score / cache' for n in NAMES[1:])
           + ' | NAMM cache per layer |', '|---' * (len(NAMES) + 2) + '|']
  for t in tasks:
    layers = np.mean([r['results']['namm'][t]['layers'] for r in runs], 0)
    lines.append(f"| {t} | {mean('full', t, 'score'):.3f} | " + ' | '.join(
        f"{mean(n, t, 'normalised'):.3f} / {mean(n, t, 'cache'):.2f}" for n in NAMES[1:])
        + ' | ' + ' '.join(f'{x:.2f}' for x in layers) + ' |')
  return '\n'.join(lines)


def _base_line(name, b):
  return (f"- base LM {name} (`{b['path']}`): {b['layers']} layers, d {b['d_model']}, "
          f"{b['heads']} query / {b['kv_heads']} KV heads, {b['steps']} steps at {b['seq_len']} "
          f"tokens on `{b['source']}` (data.loss={b['loss']}).")


def render(report, png):
  runs, st = report['runs'], report['runs'][0]['settings']
  lines = ['## NAMM (evolved KV-cache eviction): CPU-scale run', '',
           f"{report['machine']}; {report['date']}. Held-out prompts: eval split, base seed "
           f"{report['seed']}, {report['prompts']} per task. Produced by", '',
           f"    {report['command']}", '', 'from:',
           _base_line('A', report['base'])]
  if 'transfer_base' in report:
    lines.append(_base_line('B, for zero-shot transfer', report['transfer_base']))
  lines += [f"- NAMM runs (seeds {', '.join(str(r['seed']) for r in runs)}; `python evolve.py "
            f"--config=configs/namm.py:tasks --config.seed=S --config.evolve.base=A`): "
            f"{st['strategy']}, population {st['population']}, stages "
            + ' -> '.join(f'{s} ({g} generations)' for s, g in zip(st['stages'], st['generations']))
            + f", {st['prompts']} prompts per task per generation, {st['length']} tokens, update "
            f"interval {st['update_interval']}, cache_weight {st['cache_weight']}; "
            + ', '.join(f"{r['evolution']['seconds'] / 60:.0f}" for r in runs)
            + ' min of evolution each (one core).', '',
           'Score = teacher-forced answer-token accuracy (corpus: exp(-nll) of the last tokens), '
           'normalised by the full cache on the same prompts, mean over tasks; cache = mean '
           'fraction of the context kept per layer and KV head at the end of the prefill. '
           "Recency, H2O (half recent window) and L2 (8 recent tokens) get a budget equal to "
           "NAMM's mean cache on each task, so caches match."]
  if st['cache_weight']:
    n_last = len(st['stages'][-1].split(','))
    lines += ['', f"Fitness = normalised score - {st['cache_weight']} x mean cache fraction: a "
              'deviation from the official score-only fitness, which gives the search no '
              'reason to evict when the base already solves the tasks with the full cache (the '
              'CMA mean then drifts towards keeping everything). Losing one prompt of '
              f"{st['prompts']} on one of {n_last} tasks costs "
              f"{1 / st['prompts'] / n_last:.3f}; halving the cache "
              f"gains at most {st['cache_weight'] / 2:.3f}."]
  lines += ['', table(report), '',
           'Per task, mean over seeds (base A):', '', task_table(runs)]
  if report['transfer']:
    lines += ['', 'Per task, mean over seeds (zero-shot on base B):', '',
              task_table(report['transfer'])]
  lines += ['', 'The CMA mean during evolution, every few generations (generation: val fitness '
            'on the whole training pool of the stage / held-out score / held-out cache, on '
            "evolve.py's own held-out prompts: eval split, the run's seed, not the prompts of "
            'the tables above); '
            'shipped is the mean with the best val fitness in the last stage (the official '
            '`ckpt.pt` on the best val score; held-out prompts play no part in the choice):', '']
  for r in runs:
    val = lambda h: '-' if h.get('val') is None else f"{h['val']:.3f}"
    lines.append(f"- seed {r['seed']} (shipped: generation "
                 f"{r['evolution'].get('shipped_gen') or 'last'}): " + ', '.join(
        f"{h['gen']}: {val(h)} / {h['score']:.3f} / {h['cache']:.2f}"
        for h in r['evolution']['held']))
  met = lambda ok: 'met' if ok else 'missed'
  n_tasks = len(runs[0]['results']['full'])
  lines += ['', f"Against the targets ({report['prompts']} held-out prompts per task: one prompt "
            f"moves a task's score by {1 / report['prompts']:.3f} and the mean over "
            f"{n_tasks} tasks by {1 / report['prompts'] / n_tasks:.3f}):"]
  for r in runs:
    s = r['summary']
    ok = s['namm']['normalised'] >= 1.0 and s['namm']['cache'] <= 0.5
    margins = ', '.join(f"{n} {s['namm']['normalised'] - s[n]['normalised']:+.3f}"
                        for n in NAMES[2:])
    beats = all(s['namm']['normalised'] > s[n]['normalised'] for n in NAMES[2:])
    lines.append(f"- seed {r['seed']}: NAMM {s['namm']['normalised']:.3f} at cache "
                 f"{s['namm']['cache']:.2f} (target >= 1.0 at <= 0.50: {met(ok)}); margin over "
                 f"the baselines at equal cache: {margins} (beats all three: {met(beats)}).")
  for r in report['transfer']:
    s = r['summary']
    lines.append(f"- zero-shot transfer of seed {r['seed']} to B: {s['namm']['normalised']:.3f} "
                 f"at cache {s['namm']['cache']:.2f}.")
  lines += ['', f'![namm](bench/results/{png})'] + [
      f"![evolution, seed {r['seed']}](bench/results/{png[:-4]}_evolve_s{r['seed']}.png)"
      for r in runs]
  return '\n'.join(lines) + '\n'


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
