"""RULER's suite on a trained run, full cache vs eviction policies at a fraction of it.

  python -m bench.ruler --run=runs/standin/lm --lengths=512,1024 --examples=8 \\
      --policies=none,recency,h2o --cache=0.5

Every (policy, task, length) cell goes through evaluate.py's path (training/evaluation.py,
training/ruler_eval.py): prefill under the policy, greedy generation, RULER's metric x 100
on held-out examples (needles at RULER's drawn depths). A policy keeps `--cache` of the
context: recency a window of that many tokens, h2o / l2 that budget per head (an eighth of it
recent), acting every 64 tokens of the prefill. Writes bench/results/OUT.{json,md,png}, with
provenance; `python -m bench.report` renders it into docs/ruler.md.
"""
import argparse
import json
import os

import numpy as np

from bench import provenance
from bench.common import ROOT

MEASURES = provenance.CORE + ('data/ruler.py', 'training/ruler_eval.py',
                              'training/evaluation.py', 'models/eviction.py', 'models/namm.py')
TASKS = ('niah_single_1', 'niah_single_2', 'niah_single_3', 'niah_multikey_1',
         'niah_multikey_2', 'niah_multikey_3', 'niah_multivalue', 'niah_multiquery', 'vt',
         'cwe', 'fwe')


def overrides(policy, length, cache, tasks, examples):
  """evaluate.py overrides of one (policy, length) pass."""
  keep = max(int(cache * length), 16)
  o = {'ruler.tasks': tuple(tasks), 'ruler.lengths': (length,), 'ruler.examples': examples,
       'eval.tasks': (), 'decode.policy': policy}
  if policy != 'none':
    o.update({'decode.window': keep, 'decode.budget': keep, 'decode.recent': max(keep // 8, 1),
              'decode.prefill_chunk': 64})
  return o


def measure_pass(run, policy, length, tasks, examples, cache, **extra):
  """[row]: one per task of one (policy, length) pass (score None: the length is too short);
  `extra`: more evaluate.py overrides (decode.namm_run)."""
  from training.evaluation import Evaluator
  from training.ruler_eval import run_suite
  from training.run import load_run
  ev = Evaluator(load_run(run, overrides={**overrides(policy, length, cache, tasks, examples),
                                          **extra}))
  rows = []
  for c in run_suite(ev):
    rows.append(dict(policy=policy, task=c['task'], length=c['length'], score=c['score'],
                     skipped=c.get('skipped'), first=c.get('first')))
    print(json.dumps({k: v for k, v in rows[-1].items() if k != 'first'}), flush=True)
  return rows


def measure(run, policies, lengths, tasks, examples, cache):
  """[row]: one per (policy, task, length) cell."""
  return [r for policy in policies for length in lengths
          for r in measure_pass(run, policy, length, tasks, examples, cache)]


def page(report):
  """Markdown: per policy, a task x length table of scores, the average and its command."""
  rows, lengths = report['rows'], sorted({r['length'] for r in report['rows']})
  lines = ['# RULER on the subword stand-in', '',
           f"Run `{report['run']}` ({report['params']} parameters, tokenizer "
           f"{report['tokenizer']}). RULER's tasks and metric (data/ruler.py, its deviations "
           f"listed there), {report['examples']} held-out examples per cell, lengths in the "
           f"tokenizer's tokens; policies keep {report['cache']:g} of the context. Scores x 100; "
           '`-`: the length is too short for the task.', '',
           '| policy | task | ' + ' | '.join(str(n) for n in lengths) + ' |',
           '|---|---|' + '---|' * len(lengths)]
  for policy in report['policies']:
    mine = [r for r in rows if r['policy'] == policy]
    tasks = list(dict.fromkeys(r['task'] for r in mine))
    for task in tasks + ['average']:
      cells = []
      for n in lengths:
        got = [r['score'] for r in mine if r['length'] == n and r['score'] is not None
               and task in (r['task'], 'average')]
        cells.append(f'{np.mean(got):.1f}' if got else '-')
      lines.append(f'| {policy} | {task} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines + ['', f"![RULER](bench/results/{report['out']}.png)", '',
                            f"`{report['provenance']['command']}`"])


def plot(report, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  lengths = sorted({r['length'] for r in report['rows']})
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for policy in report['policies']:
    means = [np.mean([r['score'] for r in report['rows'] if r['policy'] == policy
                      and r['length'] == n and r['score'] is not None] or [np.nan])
             for n in lengths]
    ax.plot(lengths, means, 'o-', label=policy)
  ax.set(xscale='log', xlabel='length (tokens)', ylabel='RULER average (x100)', ylim=(0, 100))
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--run', required=True, help='train.py workdir (or hf:DIR)')
  ap.add_argument('--lengths', default='512,1024')
  ap.add_argument('--tasks', default=','.join(TASKS))
  ap.add_argument('--policies', default='none,recency,h2o')
  ap.add_argument('--examples', type=int, default=8)
  ap.add_argument('--cache', type=float, default=0.5, help='fraction of the context kept')
  ap.add_argument('--out', default='ruler', help='bench/results/OUT.{json,md,png}')
  args = ap.parse_args(argv)
  from training.run import load_run
  base = load_run(args.run)
  policies, tasks = args.policies.split(','), args.tasks.split(',')
  rows = measure(args.run, policies, [int(n) for n in args.lengths.split(',')], tasks,
                 args.examples, args.cache)
  from training import flops
  report = dict(run=args.run, params=f"{flops.param_count(base.state) / 1e6:.1f}M",
                tokenizer=base.cfg.data.tokenizer, policies=policies, examples=args.examples,
                cache=args.cache, out=args.out, rows=rows,
                provenance=provenance.record(MEASURES, 0))
  out = os.path.join(ROOT, 'bench', 'results', args.out)
  with open(out + '.json', 'w') as f:
    json.dump(report, f, indent=1)
  plot(report, out + '.png')
  with open(out + '.md', 'w') as f:
    f.write(page(report) + '\n')
  print(page(report))


if __name__ == '__main__':
  main()
