"""The page of bench/compression.py: score against compression ratio per policy and setting,
95% bootstrap intervals, paired differences, and NAMM's targets stated as met or missed."""
import numpy as np

RATIOS = (0.25, 0.5, 0.75, 0.875)
RESAMPLES = 2000
TRAINING_FREE = ('streaming_llm', 'recency', 'tova', 'snapkv', 'pyramidkv', 'adakv', 'h2o',
                 'l2', 'keydiff', 'random')


def encode(scores):
  """Per-prompt scores for the results file: a '0'/'1' string when every score is 0 or 1."""
  s = np.asarray(scores)
  if np.isin(s, (0., 1.)).all():
    return ''.join('1' if x else '0' for x in s)
  return [round(float(x), 4) for x in s]


def decode_scores(stored):
  return (np.array([c == '1' for c in stored], np.float64) if isinstance(stored, str)
          else np.asarray(stored, np.float64))


def key(setting, policy, ratio):
  return f'{setting}|{policy}|{ratio:g}'


def resample_means(scores, resamples=RESAMPLES, seed=0):
  """[resamples] bootstrap means over tasks of task means ({task: [n]}), stratified by task;
  the same seed draws the same prompts, so two policies' arrays are paired."""
  rng = np.random.default_rng(seed)
  per_task = []
  for t in sorted(scores):
    s = np.asarray(scores[t])
    idx = rng.integers(0, len(s), (resamples, len(s)))
    per_task.append(s[idx].mean(1))
  return np.mean(per_task, 0)


def interval(samples):
  lo, hi = np.percentile(samples, [2.5, 97.5])
  return float(lo), float(hi)


def cell_scores(cell):
  return {t: decode_scores(s) for t, s in cell['scores'].items()}


def summary(results):
  """{cell key: dict(mean, lo, hi, diff_full=(d, lo, hi), cache)} for every cell."""
  cells = results['cells']
  full = cells.get(key('full', 'keep_all', 0.0))
  full_boot = resample_means(cell_scores(full)) if full else None
  out = {}
  for k, c in cells.items():
    boot = resample_means(cell_scores(c))
    row = dict(mean=c['mean'], ci=interval(boot), cache=float(np.mean(list(c['cache'].values()))))
    if full_boot is not None:
      row['diff_full'] = (c['mean'] - full['mean'], *interval(boot - full_boot))
    out[k] = row
  return out


def namm_against_best(results, setting, label):
  """Per ratio: (best training-free policy, NAMM - it, its 95% interval), paired."""
  cells, out = results['cells'], {}
  for r in RATIOS:
    namm = cells.get(key(setting, label, r))
    others = [cells[key(setting, p, r)] for p in TRAINING_FREE if key(setting, p, r) in cells]
    if not namm or not others:
      continue
    best = max(others, key=lambda c: c['mean'])
    d = resample_means(cell_scores(namm)) - resample_means(cell_scores(best))
    out[r] = (best['policy'], namm['mean'] - best['mean'], *interval(d))
  return out


def targets(results, setting, rows, label):
  """The issue's target, per setting: NAMM at or above the full cache at ratio 0.5, and above
  the best training-free policy at >= 2 ratios with intervals that exclude a tie."""
  lines = []
  at_half = rows.get(key(setting, label, 0.5))
  if at_half is None:
    return [f'- {setting}, {label}: no rows at ratio 0.5: the targets are not tested.']
  d, lo, hi = at_half['diff_full']
  met = d >= 0
  lines.append(f'- {setting}, {label}: at ratio 0.5 it scores {at_half["mean"]:.3f}, full '
               f'cache {at_half["mean"] - d:.3f}: difference {d:+.3f} [{lo:+.3f}, {hi:+.3f}] '
               f'({"met" if met else "missed"}: at or above the full cache).')
  wins = namm_against_best(results, setting, label)
  clear = [r for r, (_, _, lo2, _) in wins.items() if lo2 > 0]
  parts = [f'{r:g}: {p} {d2:+.3f} [{lo2:+.3f}, {hi2:+.3f}]'
           for r, (p, d2, lo2, hi2) in wins.items()]
  lines.append(f'- {setting}, {label} minus the best training-free policy per ratio: '
               + '; '.join(parts) + f'. Above it with an interval excluding a tie at '
               f'{len(clear)} ratio(s) ({"met" if len(clear) >= 2 else "missed"}: >= 2).')
  return lines


def headroom(results, setting):
  """Per ratio, the best training-free policy: its score, that minus the full cache's, and 1
  minus it (the most any policy could still gain on these tasks)."""
  cells, parts = results['cells'], []
  full = cells.get(key('full', 'keep_all', 0.0))
  for r in RATIOS:
    others = [cells[key(setting, p, r)] for p in TRAINING_FREE if key(setting, p, r) in cells]
    if not others or not full:
      continue
    best = max(others, key=lambda c: c['mean'])
    parts.append(f'{r:g}: {best["policy"]} {best["mean"]:.3f} ({best["mean"] - full["mean"]:+.3f}'
                 f' vs the full cache; {1 - best["mean"]:.3f} below 1)')
  if not parts:
    return []
  return [f'- {setting}, the room left above the best training-free policy per ratio: '
          + '; '.join(parts) + '.']


def ratios(settings):
  """The ratio(s) a NAMM label was evolved at: one run's, or joined runs' (one NAMM per ratio,
  each cell from the run evolved at its ratio)."""
  r = settings['compression_ratio']
  return (f'{r:g}' if not isinstance(r, list) else
          ' / '.join(f'{x:g}' for x in r) + ' (one run per ratio, each cell from its own ratio\'s run)')


def table(results, rows, setting):
  ratios = [r for r in RATIOS if any(key(setting, p, r) in rows for p in policies(results))]
  full = rows.get(key('full', 'keep_all', 0.0))
  head = '| policy | ' + ' | '.join(f'{r:g}' for r in ratios) + ' |'
  lines = [head, '|---' * (len(ratios) + 1) + '|']
  if full:
    lines.append('| full cache (ratio 0) | ' + ' | '.join(
        f'{full["mean"]:.3f} [{full["ci"][0]:.3f}, {full["ci"][1]:.3f}]' for _ in ratios) + ' |')
  for p in policies(results):
    cells = [rows.get(key(setting, p, r)) for r in ratios]
    if not any(cells):
      continue
    lines.append(f'| {p} | ' + ' | '.join(
        '—' if c is None else f'{c["mean"]:.3f} [{c["ci"][0]:.3f}, {c["ci"][1]:.3f}]'
        for c in cells) + ' |')
  return lines


def policies(results):
  seen = [c['policy'] for c in results['cells'].values() if c['policy'] != 'keep_all']
  return list(dict.fromkeys(seen))


def render(results, png):
  p = results['protocol']
  runs = p.get('namm_runs', {})
  rows = summary(results)
  b = p['base_model']
  settings = [s for s in ('prefill', 'streamed')
              if any(c['setting'] == s for c in results['cells'].values())]
  first = min((c['provenance']['date'] for c in results['cells'].values()), default='')
  n_cells = len(results['cells'])
  out = [
      '## KV-cache compression on kvpress\'s protocol', '',
      f'Base LM `{p["base"]}`: {b["layers"]} layers, d {b["d_model"]}, {b["heads"]} query / '
      f'{b["kv_heads"]} KV heads, {b["steps"]} steps on `{b["source"]}`. Tasks '
      f'{", ".join(p["tasks"])} at {p["length"]} tokens, {p["prompts"]} held-out prompts each '
      f'(eval split, seed {p["seed"]}); context compressed: '
      + ', '.join(f'{t} {c} tokens (question {p["question"][t]})' for t, c in p['context'].items())
      + f'. NAMM runs: ' + (', '.join(f'{k} `{v}`' for k, v in runs.items()) or 'none')
      + f'. {n_cells} cells, first measured {first}. Produced by', '',
      f'    python -m bench.compression --base={p["base"]}'
      + (' --namm_run=' + ','.join(f'{k}={v}' for k, v in runs.items()) if runs else '')
      + f' --tasks={",".join(p["tasks"])} --length={p["length"]} --prompts={p["prompts"]}', '',
      'Score: teacher-forced answer accuracy, mean over tasks; in brackets its 95% bootstrap '
      f'interval ({RESAMPLES} resamples, stratified by task). Budget: each policy keeps '
      '(1 - ratio) x the context per KV head (AdaKV: per layer, shared by its heads); the '
      'question and the answer follow the compression (query-agnostic, kvpress\'s default). '
      f'prefill: compressed once after the context; streamed: after every {p["interval"]} '
      'context tokens. NAMM is the evolved scorer keeping its best-scored tokens up to the '
      'budget (NAMM.budget). A row of one run serves every ratio with one search, as one press '
      'does in kvpress; a row of joined runs is one evolution per ratio, each cell from the '
      'run evolved at that ratio.', '']
  for label, e in p.get('namm_settings', {}).items():
    out.append(f'- {label} (`{runs.get(label, "?")}`): {e["strategy"]}, population '
               f'{e["population"]}, stages {" -> ".join(e["stages"])} '
               f'({", ".join(map(str, e["generations"]))} generations), {e["prompts"]} prompts '
               f'per task of {e["length"]} tokens, update interval {e["update_interval"]}, '
               + (f'question after the compression, members at ratio {ratios(e)}'
                  if e.get('query_agnostic') and e.get('compression_ratio') else
                  f'question visible, keep threshold, cache_weight {e["cache_weight"]:g}')
               + f', seed {e["seed"]}.')
  if p.get('namm_settings'):
    out.append('')
  for s in settings:
    out += [f'### Setting: {s}', ''] + table(results, rows, s) + ['']
  out += ['### Against the targets', '']
  for s in settings:
    for label in runs or ['namm']:
      out += targets(results, s, rows, label)
    out += headroom(results, s)
  out += ['', f'![score against compression ratio]({png})', '']
  if results.get('speed'):
    out += speed_table(results['speed'])
  return '\n'.join(out)


def speed_table(sp):
  """Decode tokens/s and bytes per sequence per policy (rows) and ratio (columns)."""
  rows = sp['rows']
  ratios = sorted({r['ratio'] for r in rows if r['policy'] != 'keep_all'})
  full = next(r for r in rows if r['policy'] == 'keep_all')
  out = ['### Decode speed and memory', '',
         f'Head to head in one run ({sp["rounds"]} rounds, every program once per round): '
         f'{sp["batch"]} sequences, a {sp["prompt"]}-token prompt read in chunks of '
         f'{sp["new"]}, then {sp["new"]} greedy steps timed; the cache holds budget + '
         f'{sp["new"]} slots per KV head (full cache and adakv: prompt + new tokens). Cell: '
         'decode tokens/s (median; slowest-fastest round) / decode state KiB per sequence '
         'as allocated (K, V and the policy\'s own per-slot state).', '',
         f'Full cache: {full["tokens_per_s"]:,.0f} tok/s ({full["spread"][0]:,.0f}-'
         f'{full["spread"][1]:,.0f}) / {full["state_bytes"] / 2**10:,.0f} KiB.', '',
         '| policy | ' + ' | '.join(f'{r:g}' for r in ratios) + ' |',
         '|---' * (len(ratios) + 1) + '|']
  for p in dict.fromkeys(r['policy'] for r in rows if r['policy'] != 'keep_all'):
    cells = {r['ratio']: r for r in rows if r['policy'] == p}
    out.append(f'| {p} | ' + ' | '.join(
        f'{cells[x]["tokens_per_s"]:,.0f} ({cells[x]["spread"][0]:,.0f}-'
        f'{cells[x]["spread"][1]:,.0f}) / {cells[x]["state_bytes"] / 2**10:,.0f}'
        if x in cells else '—' for x in ratios) + ' |')
  return out + ['']


def plot(results, rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  settings = [s for s in ('prefill', 'streamed')
              if any(c['setting'] == s for c in results['cells'].values())]
  fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(6 * max(1, len(settings)), 4.2),
                           squeeze=False)
  full = rows.get(key('full', 'keep_all', 0.0))
  for ax, s in zip(axes[0], settings):
    for p in policies(results):
      pts = [(r, rows[key(s, p, r)]) for r in RATIOS if key(s, p, r) in rows]
      if not pts:
        continue
      x = [0.0] + [r for r, _ in pts] if full else [r for r, _ in pts]
      y = ([full['mean']] if full else []) + [c['mean'] for _, c in pts]
      lo = ([full['ci'][0]] if full else []) + [c['ci'][0] for _, c in pts]
      hi = ([full['ci'][1]] if full else []) + [c['ci'][1] for _, c in pts]
      line, = ax.plot(x, y, marker='o', lw=2.5 if p.startswith('namm') else 1.2, label=p)
      ax.fill_between(x, lo, hi, alpha=0.12, color=line.get_color())
    ax.set(title=s, xlabel='compression ratio (fraction of the context\'s KV removed)',
           ylabel='score', ylim=(0, 1.05))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write(results, prefix):
  import os
  rows = summary(results)
  name = os.path.basename(prefix)
  with open(prefix + '.md', 'w') as f:
    f.write(render(results, f'{name}.png'))
  plot(results, rows, prefix + '.png')
