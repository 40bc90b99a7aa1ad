"""Where a measurement came from, and whether the code it measured has changed since.

Every study stores `record(...)` with the rows it writes (its JSON's `provenance`, or one
per section). A record holds:
- the command, the git commit (and `dirty`: the measured paths had uncommitted changes);
- the machine (CPU model, cores used, device) and the versions of the stack;
- the seed, the date, and `measures`: the code paths the rows measure.
`staleness(rec)` tells whether a commit after `commit` changed those paths; the report prints
it next to the rows. Commit the code before measuring: a dirty measurement is stale as soon
as any later commit touches what it measured.
"""
import datetime
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What every training or decode measurement runs through; studies add their method's files.
CORE = ('models/lm.py', 'models/layers.py', 'models/ops', 'models/attention.py',
        'models/decode.py', 'training/step.py', 'training/loop.py', 'training/config.py',
        'data/pipeline.py', 'data/synthetic.py')
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'evosax', 'numpy')


def _git(*args, root=ROOT):
  """git's stdout, stripped, or None if git fails (not a repository, no git)."""
  try:
    out = subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions():
  from importlib import metadata
  out = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def record(measures, seed, command=None, root=ROOT):
  """The provenance of rows measured now by `command` (default: this process's argv) with
  `seed`, measuring the code at paths `measures` (relative to the repository root)."""
  import jax
  measures = sorted(set(measures))
  dirty = _git('status', '--porcelain', '--', *measures, root=root)
  return dict(
      command=command or this_command(root),
      commit=_git('rev-parse', 'HEAD', root=root), dirty=bool(dirty),
      date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      machine=dict(cpu=cpu_model(), cores_used=len(os.sched_getaffinity(0)),
                   cores=os.cpu_count(), device=f'{jax.devices()[0].device_kind} '
                                                f'x{jax.device_count()}'),
      versions=versions(), seed=seed, measures=measures)


def this_command(root=ROOT):
  """This process's command line: `python -m bench.x ...` or `python path/x.py ...`."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  script = (f'-m {spec.name}' if spec and spec.name else
            os.path.relpath(sys.argv[0], root) if sys.argv[0].endswith('.py') else sys.argv[0])
  return ' '.join(['python', script] + sys.argv[1:])


def staleness(rec, root=ROOT):
  """(stale: True / False / None if it cannot tell, the reason in words)."""
  commit = rec.get('commit')
  if not commit:
    return None, 'no commit recorded'
  if _git('cat-file', '-e', f'{commit}^{{commit}}', root=root) is None:
    return None, f'commit {commit[:8]} is not in this repository'
  later = _git('log', '--format=%h', f'{commit}..HEAD', '--', *rec['measures'], root=root)
  if later:
    changed = _git('diff', '--name-only', commit, 'HEAD', '--', *rec['measures'], root=root)
    files = changed.split() if changed else []
    return True, (f'{", ".join(files[:3])}{" ..." if len(files) > 3 else ""} changed in '
                  f'{len(later.split())} commit(s) since {commit[:8]}')
  if rec.get('dirty'):
    return None, f'measured with uncommitted changes on top of {commit[:8]}'
  return False, f'the measured code is unchanged since {commit[:8]}'


def describe(rec, root=ROOT):
  """One markdown line: the command, where and when it ran, and whether it is stale."""
  stale, why = staleness(rec, root)
  flag = {True: '**stale**', False: 'current', None: 'staleness unknown'}[stale]
  m, v = rec['machine'], rec['versions']
  return (f'- `{rec["command"]}`: {flag} ({why}); {rec["date"]}, {m["cpu"]}, '
          f'{m["cores_used"]} of {m["cores"]} cores, {m["device"]}; jax {v.get("jax")}, '
          f'flax {v.get("flax")}; seed {rec["seed"]}')
