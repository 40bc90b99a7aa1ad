"""The issue's targets, read from bench/targets.json, checked against a run's rows."""
import dataclasses
import json
import operator
import os

from bench.common import ROOT

with open(os.path.join(ROOT, 'bench', 'targets.json')) as f:
  TARGETS = json.load(f)['targets']
SPEED = [t for t in TARGETS if t['metric'] in ('vs_plain', 'vs_full_attention')]
RATIO_KINDS = tuple(dict.fromkeys(k for t in SPEED for k in t['kinds']))  # with speed targets
TARGET_LENGTHS = tuple(sorted({t['length'] for t in SPEED}))
COMPARE = {'>=': operator.ge, '<=': operator.le, '|x| <': lambda x, limit: abs(x) < limit}


def target_lengths(plan):
  """Returns the speed targets' lengths (TARGET_LENGTHS) that this plan trains at."""
  return [L for L in TARGET_LENGTHS if L in plan.train_lengths]


@dataclasses.dataclass
class Measured:
  """A run's rows as the targets look them up."""
  train: dict          # (kind, length) -> train row
  h2h: dict            # (kind, length) -> head-to-head ratio
  fits: dict           # kind -> stream fits
  decode: list         # decode rows
  plan: object


def targets(train_rows, stream_fits, decode_rows, plan, ratios=()):
  """Returns the targets that this run measured: [{name, value, met, note}]; speed targets
  also carry where they were measured (kind, length) and measured / target (fraction), from
  the head-to-head `ratios` where there are some, else from the train table. The speed
  targets come kind by kind, then the others in the file's order (their kinds in the order
  the stream section measured them)."""
  run = Measured(train={(r['kind'], r['length']): r for r in train_rows},
                 h2h={(r['kind'], r['length']): r['ratio'] for r in ratios if 'ratio' in r},
                 fits=stream_fits, decode=decode_rows, plan=plan)
  run_kinds = {k for k, _ in run.train}
  pairs = [(t, k) for k in RATIO_KINDS if k in run_kinds for t in SPEED if k in t['kinds']]
  pairs += [(t, k) for t in TARGETS if t not in SPEED
            for k in dict.fromkeys([*stream_fits, *t['kinds']]) if k in t['kinds']]
  return [e for t, k in pairs for e in [METRICS[t['metric']](t, k, run)] if e]


def entry(name, value, met, note='', **where):
  """Returns one target's row of the page."""
  return dict(name=name, value=value, met=None if met is None else bool(met), note=note,
              **where)


def length_of(t, plan):
  """Returns target t's length: its own, or the plan field it names."""
  return getattr(plan, t['length']) if isinstance(t['length'], str) else t['length']


def name_of(t, kind, plan):
  """Returns target t's text for `kind` (as the page shows it)."""
  return t['name'].format(kind=kind, length=length_of(t, plan) if 'length' in t else None,
                          threshold=t['threshold'])


def met(t, value):
  """Returns whether `value` meets target t."""
  return COMPARE[t['compare']](value, t['threshold'])


def not_measured(t, kind, run):
  """Returns the row of a speed target at a length this plan does not train at, else None."""
  if t['length'] in run.plan.train_lengths:
    return None
  return entry(name_of(t, kind, run.plan), 'not measured: this plan trains at '
               f'{", ".join(map(str, run.plan.train_lengths))}', None)


def speed(t, kind, run, table):
  """Returns the row of speed target t: the head-to-head ratio where there is one, else the
  train table's `table`."""
  L, target = t['length'], t['threshold']
  ratio = run.h2h.get((kind, L), table)
  ok = met(t, ratio)
  return entry(name_of(t, kind, run.plan), f'{ratio:.2f}x' + (
      f' head to head ({table:.2f}x in the table)' if (kind, L) in run.h2h else ''), ok,
      '' if ok else f'{100 * (1 - ratio / target):.0f}% short', kind=kind, length=L,
      fraction=ratio / target)


def vs_plain(t, kind, run):
  """Returns the row of the kind's tokens/s over plain's at the target length, or None."""
  r = run.train.get((kind, t['length']), {})
  return not_measured(t, kind, run) or (speed(t, kind, run, r['vs_plain']) if 'vs_plain' in r
                                        else None)


def vs_full_attention(t, kind, run):
  """Returns the row of the kind's tokens/s over plain's where plain ran (met where plain
  could not run at all), or None."""
  r, p = (run.train.get((k, t['length']), {}) for k in (kind, 'plain'))
  missing = not_measured(t, kind, run)
  if missing or 'tokens_per_s' not in r:
    return missing
  if 'tokens_per_s' in p:
    return speed(t, kind, run, r['tokens_per_s'] / p['tokens_per_s'])
  return entry(name_of(t, kind, run.plan), 'plain: ' + p.get('skipped', 'not run'), True,
               'full attention could not run at all')


def mfu(t, kind, run):
  """Returns the row of the kind's MFU at the target length, or None."""
  w = run.train.get((kind, length_of(t, run.plan)), {})
  if 'mfu' not in w:
    return None
  return entry(name_of(t, kind, run.plan), f"{100 * w['mfu']:.1f}%", met(t, w['mfu']),
               f"peak {w['peak'] / 1e9:.1f} GFLOP/s, the highest of "
               f"{'three' if 'best_of' in w else 'two'} measurements" if 'peak' in w else '')


def state_exponent(t, kind, run):
  """Returns the row of the fitted exponent of the kind's decode state in length, or None."""
  f = run.fits.get(kind)
  if f is None:
    return None
  return entry(name_of(t, kind, run.plan), f"{f['state_exp']:.3f}", met(t, f['state_exp']))


def namm_overhead(t, kind, run):
  """Returns the row of the kind's NAMM decode step time over keep-all's, or None."""
  d = {r['policy']: r for r in run.decode if r['kind'] == kind}
  if 'namm' not in d or 'keep_all' not in d:
    return None
  over = d['namm']['ms_per_step'] / d['keep_all']['ms_per_step'] - 1
  return entry(name_of(t, kind, run.plan), f'{100 * over:+.1f}%', met(t, over),
               f"update every {d['namm']['prompt'] // 8} tokens")


METRICS = dict(vs_plain=vs_plain, vs_full_attention=vs_full_attention, mfu=mfu,
               state_exponent=state_exponent, namm_overhead=namm_overhead)
