"""Sections shared out between processes, and the page's files written under a lock, each
run's sections merged into those of earlier runs of the same plan."""
import fcntl
import json
import os
import subprocess
import sys

from bench.common import ROOT, log
from bench.side_by_side.page import page
from bench.side_by_side.plots import plots
from bench.side_by_side.targets import targets

SECTION_KEYS = dict(train=('train',), ratio=('ratio',), stream=('stream', 'stream_fits'),
                    decode=('decode',),
                    capability=('capability',), profile=('profile',))
# Minutes of each section of a full run on one core of this 2-core host (a --jobs=2 run,
# 2026-12-04: 61 min, ratio then 26 min; 13.5 since the kinds share plain's steps); only
# used to share the sections out between --jobs processes (2: a full run took 40 min).
SECTION_COST = dict(train=28, ratio=14, stream=6, decode=9, capability=30, profile=1)


def share_sections(sections, jobs):
  """Returns the sections in `jobs` groups of about equal cost, longest first; profile goes
  with train (it reads train's rows). Each group keeps the page's section order."""
  units = [[s] + (['profile'] if s == 'train' and 'profile' in sections else [])
           for s in sections if s != 'profile']
  if 'profile' in sections and 'train' not in sections:
    units.append(['profile'])
  groups, load = [[] for _ in range(jobs)], [0] * jobs
  for unit in sorted(units, key=lambda u: -sum(SECTION_COST[s] for s in u)):
    i = load.index(min(load))
    groups[i] += unit
    load[i] += sum(SECTION_COST[s] for s in unit)
  return [[s for s in SECTION_KEYS if s in g] for g in groups if g]


def run_jobs(groups, argv):
  """Runs one `python -m bench.run --sections=GROUP --jobs=1` process per group (with the other
  arguments of `argv`), each pinned to its own slice of this process's cores; they merge
  into the same page (save() locks the file). Returns when all have ended; SystemExit if
  one failed."""
  cores = sorted(os.sched_getaffinity(0))
  share = max(len(cores) // len(groups), 1)
  args = [a for a in argv if not a.startswith(('--jobs', '--sections'))]
  procs = []
  for i, group in enumerate(groups):
    mine = set(cores[(i * share) % len(cores):][:share])
    cmd = [sys.executable, '-m', 'bench.run', *args, '--jobs=1',
           '--sections=' + ','.join(group)]
    log(f"job {i}: sections {','.join(group)} on cores {sorted(mine)}")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, preexec_fn=lambda m=mine: os.sched_setaffinity(
        0, m)))
  failed = [g for g, p in zip(groups, procs) if p.wait()]
  if failed:
    raise SystemExit(f'bench/run.py: the job(s) running {failed} failed (see above)')


def merged(path, res, sections, kinds):
  """Returns res laid over the sections of an earlier run of the same plan written at
  `path` (read now, so runs of different sections may go on side by side); in the sections
  run, the earlier rows of kinds not run are kept (and that run's command listed for
  them)."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  same = lambda r: (r.get('quick'), r.get('preset', 'tiny'))
  plan = {k: json.loads(json.dumps(v)) for k, v in res['plan'].items()}
  if (not old or same(old) != same(res)            # another plan or preset: a page of its own
      or any(plan.get(k, v) != v for k, v in old['plan'].items())):
    return res
  res['models'] = dict(old.get('models', {}), **res['models'])
  for name in [n for n in SECTION_KEYS if n not in sections]:        # a stable order
    for key in SECTION_KEYS[name]:
      if key in old:
        res[key] = old[key]
    res['commands'].update({key: c for key, c in old.get('commands', {}).items()
                            if key.split(' (')[0] == name})
  for name in [n for n in SECTION_KEYS if n in sections]:
    kept = False
    for key in SECTION_KEYS[name]:
      if isinstance(old.get(key), list) and isinstance(res.get(key), list):
        rows = [r for r in old[key] if r.get('kind') not in kinds]
        res[key], kept = rows + res[key], kept or bool(rows)
      elif key == 'stream_fits' and key in old:
        res[key] = dict({k: f for k, f in old[key].items() if k not in kinds}, **res.get(key, {}))
    if not kept:
      continue
    earlier = [c for key, c in old.get('commands', {}).items()
               if key.split(' (')[0] == name and not set(c.get('kinds', ['?'])) <= set(kinds)]
    for i, c in enumerate(earlier):
      res['commands'][name + ' (other kinds' + (f' {i + 1})' if i else ')')] = c
  return res


def save(prefix, res, sections, plan, setup):
  """Writes OUT.json / OUT.md / OUT_*.png (OUT: prefix) from res laid over the other
  sections on disk (under a lock: jobs running other sections merge into the same files).
  Returns the merged res, with the targets checked."""
  with open(prefix + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    res = merged(prefix + '.json', res, sections, res['kinds'])
    res['targets'] = targets(res.get('train', []), res.get('stream_fits', {}),
                             res.get('decode', []), plan, res.get('ratio', []))
    with open(prefix + '.json', 'w') as f:
      json.dump(res, f, indent=1, default=str)
    plots(res, prefix)
    with open(prefix + '.md', 'w') as f:
      f.write(page(res, prefix, setup) + '\n')
  return res
