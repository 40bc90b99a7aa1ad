"""The side-by-side page in markdown, from a run's result dict alone (and the run's setup)."""
import math
import os

import numpy as np

from bench.common import ROOT, slope
from bench.side_by_side.kinds import MIX
from bench.side_by_side.throughput import step_times
from data import synthetic
from data.tokenizer import ByteTokenizer


def page(res, prefix, setup):
  """Returns the page (markdown) of result dict `res`, its plots linked as `prefix`_*.png;
  `setup` gives the remat of head-to-head rows that do not name it and the NAMM run."""
  # linked relative to the repository, as docs/ pages link it (bench/report.py)
  img = lambda part: f'{os.path.relpath(prefix, ROOT)}_{part}.png'
  lines = (header(res) + targets_part(res, setup) + train_part(res, img) + stream_part(res, img)
           + decode_part(res, img, setup.namm_run) + capability_part(res, img)
           + profile_part(res))
  return '\n'.join(lines)


def header(res):
  """Returns the page's title, the machine and setup, and the commands that produced it."""
  runs = {}
  for section, c in sorted(res['commands'].items(), key=lambda item: item[1]['started']):
    runs.setdefault(c['command'], []).append((section, c))
  lines = [f'## Side by side: every model kind ({"quick" if res["quick"] else "full"} run)', '',
           f"{res['machine']}. Seed {res['seed']}. Every kind (configs at preset "
           f"`{res.get('preset', 'tiny')}`): {describe(res.get('models', {}))}. Produced by:", '']
  for command, items in runs.items():
    c = items[0][1]
    minutes = max(i.get('minutes', float('nan')) for _, i in items)   # cumulative per section
    lines.append(f"- `{command}` (sections {', '.join(s for s, _ in items)}; started "
                 f"{c['started']} UTC, {minutes:.0f} min; matmul peak "
                 f"measured in that run {c['peak'] / 1e9:.1f} GFLOP/s/device"
                 + (f"; on {c['cores']} of the host's cores" if 'cores' in c else '') + ')')
  return lines + ['']


def targets_part(res, setup):
  """Returns the targets table and how the head-to-head ratios were taken."""
  t = res.get('targets', [])
  if not t:
    return []
  lines = ['### Targets', '', '| target | measured | met |', '|---|---|---|']
  met = {True: 'yes', False: '**no**', None: '-'}
  lines += [f"| {x['name']} | {x['value']} | {met[x['met']]}"
            f"{' (' + x['note'] + ')' if x['note'] else ''} |" for x in t]
  h2h = [r for r in res.get('ratio', []) if 'ratio' in r]
  if h2h:
    fair = all('plain_remat' in r for r in h2h)    # older rows: plain at its preset only
    remats = {r['kind']: r.get('kind_remat') or setup.config(r['kind']).model.remat
              for r in h2h}
    if not fair:
      remats['plain'] = setup.config('plain').model.remat
    remat = ', '.join(f'{k} {v}' for k, v in sorted(remats.items()))
    lines += ['', f"Head to head: the kind's train step and plain's alternated, "
              f"{h2h[0]['rounds']} rounds after a warm-up step each; the ratio of the median "
              'step times (plain / kind). Each kind at its preset\'s `model.remat` '
              f'({remat}: block / segment: each block / segment recomputed in the backward '
              'pass)' + ("; plain at its preset's and without rematerialisation, the faster "
                         'of the two as the reference' if fair else '') + '. Step times: '
              + '; '.join(f"{r['kind']} at {r['length']}: {step_times(r)}" for r in h2h) + '.']
  return lines + ['']


def train_part(res, img):
  """Returns the training speed table and the fitted exponents of time per token."""
  rows, P = res.get('train', []), res['plan']
  if not rows:
    return []
  lengths = sorted({r['length'] for r in rows if r['kind'] != 'plain_wide'}) or [
      rows[0]['length']]                           # (a run of plain_wide alone)
  lines = ['### Training speed', '',
           f"Real train step (the same jitted code as train.py), batch = max(1, "
           f"{P['train_tokens']} / length), "
           f"mean of {P['train_steps']} timed step(s) after a warm-up. Cells: tokens/s "
           '(ratio to plain at that length) / MFU / XLA memory. Each kind at its preset\'s '
           '`model.remat`; plain at its preset\'s and without rematerialisation, the faster '
           'of the two kept (named in its cells). Full attention stops at '
           f"{max(P['ratio_lengths'])} (quadratic).", '',
           '| kind | ' + ' | '.join(f'L = {L}' for L in lengths) + ' |',
           '|---|' + '---|' * len(lengths)]
  for kind in dict.fromkeys(r['kind'] for r in rows):
    cells = []
    for L in lengths:
      r = next((r for r in rows if r['kind'] == kind and r['length'] == L), None)
      if r is None:
        cells.append('')
      elif 'skipped' in r:
        cells.append(f"skipped: {r['skipped']}")
      else:
        ratio = f" ({r['vs_plain']:.2f}x)" if 'vs_plain' in r else ''
        if 'remat_other' in r:              # plain: the faster remat setting, named
          ratio = f" ({r['vs_plain']:.2f}x, remat {r['remat']})"
        cells.append(f"{r['tokens_per_s']:.0f}{ratio} / "
                     f"{100 * r['mfu']:.1f}% / {r['memory_mib']:.0f} MiB")
    if kind == 'plain_wide':
      r = next(r for r in rows if r['kind'] == kind)
      cells = [f"width 512, 8 layers, no remat, L = {r['length']}, batch {r['batch']} in "
               f"{r.get('microbatches', 1)} micro-batches: " + (r.get('skipped') or
               f"{r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%" +
               (f" (fastest of {r['best_of']} steps)" if r.get('best_of', 1) > 1 else ''))
               ] + [''] * (len(lengths) - 1)
    lines.append(f'| {kind} | ' + ' | '.join(cells) + ' |')
  fits = {k: slope([r['length'] for r in rows if r['kind'] == k and 'step_ms' in r],
                   [1 / r['tokens_per_s'] for r in rows if r['kind'] == k and 'step_ms' in r])
          for k in dict.fromkeys(r['kind'] for r in rows) if k != 'plain_wide'}
  if not fits:
    return lines + ['']
  return lines + ['', 'Time per training token ~ L^a: ' + ', '.join(
      f'{k} a = {fmt(v, ".2f")}' for k, v in fits.items()) + '.', '',
      f'![training speed]({img("train")})', '']


def stream_part(res, img):
  """Returns the inference scaling table (per kind and length) with the fitted exponents."""
  rows = res.get('stream', [])
  if not rows:
    return []
  lines = ['### Inference scaling (state carried chunk by chunk)', '',
           'Batch 1, random tokens, chunks of the segment length (plain: 256 tokens into a '
           'KV cache sized for the whole input). Cells: us per token while reading / decode '
           'state bytes / one decode step after it (ms).', '']
  ns = sorted({r['tokens'] for r in rows})
  lines += ['| kind | ' + ' | '.join(f'{n:,}' for n in ns) + ' | state ~ N^b | step ~ N^c |',
            '|---|' + '---|' * (len(ns) + 2)]
  for kind, f in res['stream_fits'].items():
    cells = []
    for n in ns:
      r = next((r for r in rows if r['kind'] == kind and r['tokens'] == n), None)
      cells.append('' if r is None else f"skipped: {r['skipped']}" if 'skipped' in r else
                   f"{r['us_per_token']:.1f} / {r['state_bytes']:,} / {r['decode_step_ms']:.2f}")
    lines.append(f'| {kind} | ' + ' | '.join(cells) +
                 f" | {fmt(f['state_exp'], '.2f')} | {fmt(f['step_exp'], '.2f')} |")
  return lines + ['', f'![inference scaling]({img("stream")})', '']


def decode_part(res, img, namm_run):
  """Returns the decode table per policy and what NAMM's update costs (namm_run: the NAMM
  parameters' evolve.py workdir, '' for a random vector)."""
  rows = res.get('decode', [])
  if not rows:
    return []
  lines = ['### Decode per eviction policy', '',
           f"Batch {rows[0]['batch']}, a {rows[0]['prompt']}-token corpus prompt, then "
           f"{len(rows[0]['kv_bytes'])} greedy steps; cache capacity prompt + new tokens "
           '(static shapes, so every policy attends over the same slots: the time '
           'difference is the policy itself); time: the fastest of ' +
           (f"{rows[0]['rounds']} rounds, each running every policy once in turn" if 'rounds'
            in rows[0] else 'three runs of each policy') +
           '. Budget = half the prompt; NAMM: ' +
           (f'`{namm_run}`' if namm_run else 'a random parameter vector '
            '(sigma 0.065, as a CMA-ES population member), i.e. its cost, not its choices') +
           '.', '', '| kind / policy | tokens/s | ms/step | KV bytes after prefill | '
           'KV bytes at the end |', '|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['kind']} / {r['policy']} | {r['tokens_per_s']:.1f} | "
                 f"{r['ms_per_step']:.2f} | {r['kv_bytes'][0]:,.0f} | {r['kv_bytes'][-1]:,.0f} |")
  u = next((r['update_ms'] for r in rows if 'update_ms' in r), None)
  base = next((r for r in rows if r['policy'] == 'keep_all'), None)
  if u and base:
    lines += ['', namm_text(res, u, base)]
  return lines + ['', f'![decode]({img("decode")})', '']


def namm_text(res, u, base):
  """Returns NAMM's update in words: its parts (u, the row's update_ms) against the
  keep-all decode step (`base`, its row), and what the rest of NAMM's overhead is."""
  rows = res['decode']
  every = u['every']
  m = res.get('models', {}).get(base['kind'], dict(n_layers=2, d_model=128))
  small = f"{m['n_layers']}-layer, width-{m['d_model']}"
  per_step = u['total'] * u['layers'] / every
  text = (f"One NAMM update of one layer's {u['slots']}-slot cache (batch "
          f"{rows[0]['batch']}): features (ring -> STFT -> EMA) {u['features']:.0f} ms, "
          f"BAM scorer {u['bam']:.0f} ms, keep rule {u['keep_rule']:.0f} ms. Every "
          f"{every} tokens in each of {u['layers']} layers that is {per_step:.2f} ms "
          f"per step, {100 * per_step / base['ms_per_step']:.0f}% of the keep-all step "
          f"({base['ms_per_step']:.2f} ms): the scorer's cost is set by the cache size, ")
  if 'update_kept' not in u:                  # a page from before the compacted update
    return text + f'not the model, so next to this {small} model it dominates.'
  share = 100 * u['update_kept'] * u['layers'] / every / base['ms_per_step']
  text += (f'not the model, so next to this {small} model it would dominate. '
           'An update therefore runs on the valid slots only, gathered into the smallest '
           f"of S/8, S/4, S/2, S slots that holds them: with the {u['kept']} tokens per "
           f"head this NAMM keeps at the end, one whole update takes "
           f"{u['update_kept']:.0f} ms, {share:.0f}% of the keep-all step.")
  over = {r['policy']: 100 * (r['ms_per_step'] / base['ms_per_step'] - 1) for r in rows
          if r['kind'] == base['kind']}
  if 'recency' in over:
    rest = over['namm'] - share
    paid = ("every step (the new attention row written into each slot's ring; the "
            'policy hook, which needs the attention probabilities)')
    text += (f" The other {rest:.0f} points of NAMM's {over['namm']:+.1f}% are paid "
             f'{paid}' if rest >= 1 else f" NAMM's {over['namm']:+.1f}% leaves nothing "
             f'measurable for the costs paid {paid}')
    text += (': recency, with no features and no scorer, costs '
             f"{over['recency']:+.1f}% in the same run.")
  return text


def capability_part(res, img):
  """Returns the capability table (loss, loss by position, task exact match) and the
  answer-format guess it compares with."""
  rows, P = res.get('capability', []), res['plan']
  if not rows:
    return []
  r0 = rows[0]
  cells = [c for r in rows for c in r['tasks'] if c['accuracy'] is not None]
  if not any(c['accuracy'] for c in cells):
    return unlearned_part(rows, P)
  tasks = list(dict.fromkeys(c['task'] for c in r0['tasks']))
  lens = sorted({c['length'] for c in r0['tasks']})
  lines = ['### Capability', '',
           f"Each kind trained {r0['steps']} steps (batch {P['cap_batch']}, length "
           f"{P['cap_length']}) on `{MIX}`; held-out loss (nats/byte) on the corpus by "
           'position bucket; exact match on held-out task seeds (teacher forcing; the '
           'plain model under a policy goes through the decode path with half the cache), '
           f"{P['cap_examples']} examples per cell, mean over depths 0.1/0.5/0.9; in brackets "
           'the fraction of answer tokens right.', '',
           '| kind / policy | train s | loss | loss by position | ' +
           ' | '.join(f'{t} @ {n}' for t in tasks for n in lens) + ' |',
           '|---|---|---|---|' + '---|' * (len(tasks) * len(lens))]
  for r in rows:
    accs = []
    for t in tasks:
      for n in lens:
        cs = [c for c in r['tasks'] if c['task'] == t and c['length'] == n
              and c['accuracy'] is not None]
        accs.append(f"{np.mean([c['accuracy'] for c in cs]):.2f} "
                    f"({np.mean([c['token_accuracy'] for c in cs]):.2f})" if cs else 'skipped')
    loss = r['loss']
    lines.append(f"| {r['kind']} / {r['policy']} | {r['train_s']:.0f} | " +
                 (f"{loss['loss']:.3f} | " + ' '.join(f"{b['loss']:.2f}" for b in loss['buckets'])
                  if loss else '- | -') + ' | ' + ' | '.join(accs) + ' |')
  guess = {t: format_guess(t) for t in tasks}
  text = ('A guess that knows the answer format but not the needle (its spaces right, a '
          'tenth of its digits) gets ' + ', '.join(f'{t} {g:.2f}' for t, g in guess.items())
          + ' of the answer tokens, and no exact match.')
  return lines + ['', text, '', f'![capability]({img("capability")})', '']


def unlearned_part(rows, P):
  """When no kind answers any held-out task example, the held-out loss alone (a table of
  exact-match zeros teaches nothing) and where the tasks are learned."""
  r0 = rows[0]
  lines = ['### Held-out loss after equal training', '',
           f"Each kind trained {r0['steps']} steps (batch {P['cap_batch']}, length "
           f"{P['cap_length']}) on `{MIX}`: held-out loss (nats/byte) on the corpus, and by "
           'position bucket. At this budget no kind answers a held-out passkey / S-NIAH / MQAR '
           'example, so the task columns are left out: the per-method pages train the tasks '
           'until they are learned, and `--sections=capability --plan=cap_steps=N` trains '
           'every kind longer here.', '',
           '| kind | train s | loss | loss by position |', '|---|---|---|---|']
  for r in rows:
    if r['loss']:
      lines.append(f"| {r['kind']} | {r['train_s']:.0f} | {r['loss']['loss']:.3f} | " +
                   ' '.join(f"{b['loss']:.2f}" for b in r['loss']['buckets']) + ' |')
  return lines + ['']


def profile_part(res):
  """Returns the profile: the step's XLA ops, its parts timed alone, its core scaling."""
  prof = res.get('profile')
  if not prof:
    return []
  why = prof.get('why', 'the slowest kind relative to plain at 2048')
  ops = ''
  if 'ops' in prof:
    C = res.get('models', {}).get(prof['kind'], {}).get('segment_len')
    per = (f", {prof['ops'] * C / prof['length'] / prof['layers']:,.0f} per layer and "
           f"{C}-token segment" if C else '')
    ops = (f" One step under the profiler ({1e3 * prof['traced_s']:.0f} ms) ran "
           f"{prof['ops']:,} XLA ops{per}: median {prof['op_median_us']:.1f} us, mean "
           f"{1e6 * prof['op_s'] / prof['ops']:.1f} us, summed {1e3 * prof['op_s']:.0f} ms.")
  lines = [f"### Profile: {prof['kind']} at L = {prof['length']} ({why})", '',
           f"Train step at L = {prof['length']}, batch {prof['batch']}: "
           f"{prof['step_ms']:.0f} ms.{ops} Parts timed alone (forward + backward, same batch "
           'and length, segment by segment, each segment recomputed in the backward pass '
           "where the kind's `model.remat` does; timed alone they need not add up to the "
           'step):', '',
           '| part | ms | x layers, share of the step |', '|---|---|---|']
  for name, ms in prof['parts_ms'].items():
    k = prof['layers']
    lines.append(f"| {name} | {ms:.0f} | {100 * k * ms / prof['step_ms']:.0f}% |")
  return lines + (['', cores_text(prof), ''] if prof.get('cores') else [''])


def cores_text(prof):
  """Returns the profile's core scaling in words (medians of the alternated steps)."""
  c, kind, n = prof['cores'], prof['kind'], prof['cores']['cores']
  med = {k: (np.median(c[k]['one']), np.median(c[k]['all'])) for k in (kind, 'plain')}
  name = {kind: kind, 'plain': 'plain' + (f" (remat {prof['plain_remat']})"
                                            if 'plain_remat' in prof else '')}
  each = '; '.join(f'{name[k]} {one:.2f} s vs {all_:.2f} s ({one / all_:.2f}x from {n - 1} more '
                   f"core{'s' * (n > 2)})" for k, (one, all_) in med.items())
  return (f"Cores: the train step at L = {prof['length']} with every thread of the process on "
          f'one core vs on all {n} (alternated, {len(c[kind]["one"])} rounds, medians): {each}. '
          f"Plain / {kind}: {med['plain'][0] / med[kind][0]:.2f}x on one core, "
          f"{med['plain'][1] / med[kind][1]:.2f}x on {n}.")


def describe(models):
  """Returns 'd_model 128, 2 layers, ..., 2 KV heads (infini 4), ...': the kinds' common
  shape, the exceptions in brackets."""
  parts = []
  for key, text in (('d_model', 'd_model {}'), ('n_layers', '{} layers'), ('n_heads', '{} heads'),
                    ('n_kv_heads', '{} KV heads'), ('vocab', 'vocabulary {}'),
                    ('dtype', 'compute in {}'), ('attention', 'attention kernel {}'),
                    ('segment_len', 'memory kinds and sliding: segments/windows of {} tokens')):
    values = {k: m[key] for k, m in models.items() if m.get(key)}
    if values:
      common = max(set(values.values()), key=list(values.values()).count)
      odd = ', '.join(f'{k} {v}' for k, v in values.items() if v != common)
      parts.append(text.format(common) + (f' ({odd})' if odd else ''))
  options = {}
  for k, m in models.items():
    if m.get('xla_options'):
      options.setdefault(m['xla_options'], []).append(k)
  return ', '.join(parts) + ''.join(
      f"; {', '.join(ks)} compile the train step with `train.xla_options={o}` (see their config)"
      for o, ks in options.items())


def format_guess(task, n=64):
  """Returns the answer-token accuracy of a guess that knows a task's answer format but not
  the needle: its non-digit bytes right and a tenth of its digits (held-out examples)."""
  answers = [ByteTokenizer().decode(synthetic.make_example(
      task, synthetic.example_seed(0, i, 'eval'), 1024)['answer']) for i in range(n)]
  return np.mean([np.mean([0.1 if ch.isdigit() else 1.0 for ch in a]) for a in answers])


def fmt(x, spec):
  """Returns x formatted with spec; '-' for None and non-finite floats."""
  return '-' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)
