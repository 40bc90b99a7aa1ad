"""The page of bench/workflow.py, from its results file alone."""
import numpy as np


def mean(rows, task=None):
  got = [r['score'] for r in rows if r['score'] is not None and task in (None, r['task'])]
  return float(np.mean(got)) if got else None


def fmt(x):
  return '-' if x is None else f'{x:.1f}'


def markdown(results, prefix):
  S, passes = results.get('setup', {}), results['passes']
  lengths = sorted({p['length'] for p in passes.values()})
  lines = ['## The workflow on the subword stand-in', '',
           f"Base: the HF directory `{S.get('base')}` (the stand-in, configs/standin.py). Each "
           f"method continued from it (train.init_from=hf:BASE) for {S.get('steps')} steps of "
           f"8 x {S.get('train_length')} tokens of `{S.get('source')}` (answers weighted, "
           'data.loss=answer); `full` is the plain model continued the same way. RULER '
           f"(data/ruler.py; scores x 100, {S.get('examples')} held-out examples per task and "
           'length, needles at RULER\'s drawn depths) through the decode path; policies keep '
           f"{S.get('cache')} of the context. `-`: not measured (or the length is too short).",
           '', '### Continued pretraining', '',
           '| method | held-out loss | held-out accuracy | seconds |', '|---|---|---|---|']
  for m, t in results['training'].items():
    lines.append(f"| {m} | {t['eval_loss']:.3f} | {t['eval_accuracy']:.3f} | "
                 f"{t['seconds']:.0f} |")
  lines += ['', '### RULER with the full cache', '',
            '| run | task | ' + ' | '.join(str(n) for n in lengths) + ' |',
            '|---|---|' + '---|' * len(lengths)]
  runs = list(dict.fromkeys(p['run'] for p in passes.values() if p['policy'] == 'none'))
  table = {}
  for run in runs:
    tasks = list(dict.fromkeys(r['task'] for p in passes.values() if p['run'] == run
                               for r in p['rows']))
    for task in tasks + [None]:
      cells = []
      for n in lengths:
        p = passes.get(f'{run}|none|{n}')
        cells.append(mean(p['rows'], task) if p else None)
      if task is None:
        table[run] = cells
      lines.append(f"| {run} | {task or '**average**'} | " + ' | '.join(map(fmt, cells)) + ' |')
  policies = list(dict.fromkeys(p['policy'] for p in passes.values() if p['run'] == 'base'))
  lines += ['', f"### Eviction policies on the base ({S.get('cache')} of the context)", '',
            '| policy | ' + ' | '.join(str(n) for n in lengths) + ' |',
            '|---|' + '---|' * len(lengths)]
  for policy in policies:
    cells = [mean(passes[k]['rows']) if (k := f'base|{policy}|{n}') in passes else None
             for n in lengths]
    lines.append(f'| {policy} | ' + ' | '.join(map(fmt, cells)) + ' |')
  base = table.get('base')
  if base and all(x in (None, 0.) for x in base):
    lines += ['', '**The base scores 0 at every length measured**: it has not learned to retrieve, '
              'so no method or policy can be told apart on this page yet (a more capable base '
              'is needed: longer stage-2 training of configs/standin.py:retrieval).']
  control = table.get('full')
  if control:
    lines += ['', 'Against the control (`full`, the same continued pretraining):']
    for run, cells in table.items():
      if run in ('full', 'base'):
        continue
      diffs = [(n, a - b) for n, a, b in zip(lengths, cells, control)
               if a is not None and b is not None]
      if diffs:
        better = [n for n, d in diffs if d > 0]
        lines.append(f'- {run}: ' + ', '.join(f'{n}: {d:+.1f}' for n, d in diffs) + ' — '
                     + (f"above the control at {', '.join(map(str, better))}" if better
                        else 'does not beat the control at any length measured') + '.')
  return '\n'.join(lines)


def write(results, prefix):
  with open(prefix + '.md', 'w') as f:
    f.write(markdown(results, prefix) + '\n')
