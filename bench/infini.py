"""Infini-attention benchmark (CPU-sized): Infini vs segment-local vs full attention.

  python bench/infini.py --out=bench/results     # everything (about 2 core-hours on CPU)
  python bench/infini.py --parts=lm --variants=infini,local --seeds=0 --lm_steps=400

Parts (each trains every --variants entry once per --seeds entry):
  lm       train on the embedded corpus (stdlib) at seq_len = S x N, report the held-out
           loss per segment (segments >= 2 are where the memory can help) and each variant
           minus segment-local attention, paired by seed.
  decode   state bytes and process RSS while prefilling 4K ... 1M tokens into the trained
           Infini model's state in aligned chunks, vs the KV cache full attention would hold.
Recall: the passkey part (the task of bench/titans_recall.py, which trained with a loop of its
own) was retired with that script (last in commit 51453867) in favour of Zoology MQAR
(python -m bench.zoology --mixers=infini,infini_delta,...); its stored rows still render.
Every page also tabulates the gates sigmoid(beta) of the trained Infini models (init 0.5).
Parts run apart (other --out) are joined with --parts= --merge=A/infini.json,B/infini.json.
Writes OUT/infini.json, OUT/infini.md, OUT/infini_gates.png, OUT/infini_segments.png.
"""
import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import provenance
from bench.common import infini_gates, machine
from configs.infini import get_config
from training.config import resolve, validate

VARIANTS = ('infini', 'infini_delta', 'local', 'full')
MEASURES = provenance.CORE + ('models/infini.py',)    # the code the rows measure
RETIRED = '51453867'     # the last commit with bench/titans_recall.py (the passkey rows' code)


def variant_config(name, *, seq_len, segment_len, steps, source, batch, seed=0):
  cfg = get_config('tiny')
  cfg.seed = seed
  m, t = cfg.model, cfg.train
  m.segment_len, cfg.data.seq_len, cfg.data.source = segment_len, seq_len, source
  t.steps, t.batch_size = steps, batch
  t.warmup_steps, t.log_every = max(steps // 10, 1), 25
  t.eval_every = t.ckpt_every = steps
  t.async_ckpt = False
  cfg.data.eval_batches = 4
  if name == 'infini_delta':
    m.infini.update_rule = 'delta'
  elif name == 'local':
    m.infini.memory = False
  elif name == 'full':
    m.mixer = 'attention'             # the LM carries every earlier segment's K/V: full attention
  cfg = resolve(cfg)
  validate(cfg, jax.device_count())
  return cfg


def train_variant(cfg, workdir):
  from training.loop import train
  from training.metrics import read_metrics
  t0 = time.time()
  train(cfg, workdir)
  rows = read_metrics(workdir)
  return dict(seconds=time.time() - t0,
              losses={int(s): r['loss'] for s, r in rows.items() if 'loss' in r})


def evaluator(workdir, **overrides):
  from training.evaluation import load
  return load(workdir, overrides=overrides)[0]


def part_lm(args, root):
  """{variant: [one run per seed]}: eval loss and held-out loss per segment."""
  S, N = args.lm_segments, args.segment_len
  res = {}
  for name in args.variants:
    for seed in args.seeds:
      cfg = variant_config(name, seq_len=S * N, segment_len=N, steps=args.lm_steps,
                           source='stdlib', batch=args.batch, seed=seed)
      wd = os.path.join(root, f'lm_{name}' + (f'_s{seed}' if seed else ''))
      run = train_variant(cfg, wd)
      ev = evaluator(wd, **{'eval.buckets': S})
      loss = ev.loss()
      res.setdefault(name, []).append(dict(
          run, seed=seed, eval_loss=loss['loss'], gates=infini_gates(ev.state, ev.cfg.model),
          segment_loss=[b['loss'] for b in loss['buckets']]))
      print(name, seed, 'segment loss', np.round(res[name][-1]['segment_loss'], 4), flush=True)
  return res


def part_decode(args, root):
  """Prefill up to 1M tokens (random bytes) into the trained Infini model's state."""
  from training.evaluation import load
  wd = os.path.join(root, 'lm_infini')
  ev, _ = load(wd)
  model = nnx.merge(ev.graphdef, ev.state)
  m = ev.cfg.model
  chunk = 64 * m.segment_len

  @nnx.jit
  def feed(model, state, tokens_1xC, start):
    pos = start + jnp.arange(chunk, dtype=jnp.int32)[None]
    return model(tokens_1xC, state, pos)[1]

  state = model.init_state(1, chunk)
  rng = np.random.default_rng(0)
  marks = [4096, 16384, 65536, 262144, 1048576][:args.decode_marks]
  rows, done, t0 = [], 0, time.time()
  for mark in marks:
    while done < mark:
      toks = jnp.asarray(rng.integers(0, 256, (1, chunk)), jnp.int32)
      state = feed(model, state, toks, done)
      done += chunk
    jax.block_until_ready(state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    kv_bytes = 2 * m.n_layers * m.n_kv_heads * m.head_dim * 4 * mark
    rows.append(dict(tokens=mark, state_bytes=int(state_bytes), full_kv_bytes=int(kv_bytes),
                     max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     seconds=time.time() - t0,
                     finite=bool(all(np.isfinite(np.asarray(x)).all()
                                     for x in jax.tree.leaves(state)))))
    print(rows[-1], flush=True)
  return rows


def gate_runs(results):
  """{'part:variant[ sSEED]': sigmoid(beta) of every head} of the runs that have gates."""
  out = {}
  for part, by_name in results.items():
    if part in ('decode', 'commands'):
      continue
    for name, runs in by_name.items():
      for r in runs:
        if r.get('gates'):
          out[f"{part}:{name}" + (f" s{r['seed']}" if r.get('seed') else '')] = np.ravel(r['gates'])
  return out


def plot(results, out):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if 'lm' in results:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, runs in results['lm'].items():
      seg = np.mean([r['segment_loss'] for r in runs], 0)
      n = len(runs)
      ax.plot(range(1, len(seg) + 1), seg, 'o-', label=f"{name} ({n} seed{'s' * (n > 1)})")
    ax.set_xlabel('segment'), ax.set_ylabel('held-out loss (nats/token)'), ax.legend()
    ax.set_title('stdlib: loss per segment')
    fig.tight_layout(), fig.savefig(os.path.join(out, 'infini_segments.png'), dpi=120)
  pooled = {}                            # seeds pooled: one stacked bar colour per model
  for k, v in gate_runs(results).items():
    pooled.setdefault(k.split(' ')[0], []).extend(v)
  if pooled:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(list(pooled.values()), bins=np.linspace(0, 1, 21), label=list(pooled),
            histtype='barstacked')
    ax.axvline(0.5, color='k', ls=':')
    ax.set_xlabel('sigmoid(beta) (1 = memory only)'), ax.set_ylabel('heads (all seeds)')
    ax.legend(fontsize=7)
    ax.set_title('gates after training (init 0.5)')
    fig.tight_layout(), fig.savefig(os.path.join(out, 'infini_gates.png'), dpi=120)


def lm_tables(lm, args):
  """Per-seed and mean held-out loss per segment, and each variant minus segment-local
  attention paired by seed, per segment (the segments' own difficulty cancels). Spec C1's
  target: lower loss on segments >= 2 by more than the seed spread."""
  S = args.lm_segments
  seeds = sorted({r['seed'] for runs in lm.values() for r in runs})
  later = lambda r: float(np.mean(r['segment_loss'][1:]))
  segs = ' | '.join(f'seg {i + 1}' for i in range(S))
  lines = [f'## Language modelling (stdlib, {S} segments x {args.segment_len}, '
           f'{args.lm_steps} steps, seeds {", ".join(map(str, seeds))})', '',
           f'| variant | seed | eval loss | {segs} | mean seg >= 2 | train s |',
           '|---' * (S + 5) + '|']
  for name, runs in lm.items():
    rows = [(r['seed'], r['eval_loss'], r['segment_loss'], f"{r['seconds']:.0f}") for r in runs]
    if len(runs) > 1:
      rows.append(('mean', np.mean([r['eval_loss'] for r in runs]),
                   np.mean([r['segment_loss'] for r in runs], 0), ''))
    for seed, loss, seg, secs in rows:
      lines.append(f'| {name} | {seed} | {loss:.4f} | ' + ' | '.join(f'{x:.4f}' for x in seg) +
                   f' | {np.mean(seg[1:]):.4f} | {secs} |')
  base = {r['seed']: r for r in lm.get('local', [])}
  others = [n for n in lm if n != 'local']
  if base and others:
    spread = float(np.std([later(r) for r in base.values()])) if len(base) > 1 else float('nan')
    lines += ['', 'Each variant minus segment-local, paired by seed: per segment (mean over the '
              'paired seeds) and on the mean of segments >= 2 (per seed). Target: lower on '
              f'segments >= 2 in every seed, by more than the seed spread (the std of local '
              f'over its seeds: {spread:.4f}).', '',
              f'| variant | seeds | {segs} | mean seg >= 2 | per seed | target |',
              '|---' * (S + 5) + '|']
    for name in others:
      pairs = [(r, base[r['seed']]) for r in lm[name] if r['seed'] in base]
      diff = np.mean([np.subtract(r['segment_loss'], b['segment_loss']) for r, b in pairs], 0)
      d = [later(r) - later(b) for r, b in pairs]
      met = len(d) > 1 and max(d) < 0 and -np.mean(d) > spread
      lines.append(f'| {name} | {len(d)} | ' + ' | '.join(f'{x:+.4f}' for x in diff) +
                   f' | {np.mean(d):+.4f} | ' + ', '.join(f'{x:+.4f}' for x in d) +
                   ' | ' + ('- (upper bound)' if not name.startswith('infini') else
                            'met' if met else 'missed' if len(d) > 1 else 'one seed') + ' |')
  return lines + ['']


def passkey_table(runs_by_name, args, local=None):
  """Accuracy by evaluation length (in segments) per variant and seed; the target (>= 90% at
  8 segments where segment-local attention is at chance)."""
  first = next(iter(runs_by_name.values()))[0]
  L, N, chance = first['length'], args.segment_len, 1 / first['values']
  lengths = sorted(int(k[4:]) for k in first if k.startswith('acc_') and k[4:].isdigit())
  lines = [f"## Passkey beyond the attention reach (train {L // N} segments x {N}, "
           f"{first['steps']} steps, curriculum {first['curriculum'] or 'none'}, lr {first['lr']})",
           '', 'bench/titans_recall.py\'s task with one key/value pair: a key token and its value '
           f"(one of {first['values']}) at a random depth before the last 2 segments, random "
           'filler tokens, then the key again; loss and accuracy on the value only, 256 '
           'held-out prompts per length. '
           f'Model: d_model 64, 2 layers, 4 heads (2 KV heads) x 16. Chance = {chance:.3f}.', '',
           '| variant | seed | ' + ' | '.join(f'{n // N} segments ({n})' for n in lengths) +
           ' | train s |', '|---' * (len(lengths) + 3) + '|']
  for name, runs in runs_by_name.items():
    for r in runs:
      lines.append(f"| {name} | {r['seed']} | " + ' | '.join(
          f"{r[f'acc_{n}']:.3f}" for n in lengths) + f" | {r['train_seconds']:.0f} |")
  at8 = lambda runs: np.mean([r[f'acc_{8 * N}'] for r in runs])
  local = runs_by_name.get('local', local)       # else the main passkey section's
  if 8 * N in lengths and local:
    base = at8(local)
    lines += ['', f'Target: >= 0.90 at 8 segments while segment-local is at chance '
              f'(local: {base:.3f}, {"at" if base < 2 * chance else "above"} chance).']
    for name in [n for n in runs_by_name if n.startswith('infini')]:
      runs = runs_by_name[name]
      lines.append(f"- {name}: {at8(runs):.3f} (mean of {len(runs)} seed"
                   f"{'s' * (len(runs) > 1)}): "
                   f"{'met' if at8(runs) >= 0.9 and base < 2 * chance else 'missed'}")
  return lines + ['']


def markdown(results, args):
  cmds = results.get('commands', ['python bench/infini.py ' + ' '.join(sys.argv[1:])])
  lines = ['# Infini-attention benchmark (CPU)', '', f'{machine()}. Runs shared the 2 cores '
           'with one or two other jobs, so train seconds are indicative. Commands:', '', '```',
           *cmds, '```', '',
           f'Segments of N = {args.segment_len} tokens, batch {args.batch}, gate lr x10 '
           'without weight decay. LM and decode model: configs/infini.py:tiny (d_model 128, '
           '2 layers, 4 heads x 32).', '']
  if 'lm' in results:
    lines += lm_tables(results['lm'], args)
    lines += ['![held-out loss per segment](bench/results/infini_segments.png)', '']
  for key in [k for k in results if k.startswith('passkey')]:
    lines += passkey_table(results[key], args, results.get('passkey', {}).get('local'))
  g = gate_runs(results)
  if g:
    lines += ['## Gates sigmoid(beta) after training (init 0.5 for every head)', '',
              '| model | min | mean | max | mean abs(g - 0.5) |', '|---|---|---|---|---|']
    for k, v in g.items():
      lines.append(f'| {k} | {v.min():.3f} | {v.mean():.3f} | {v.max():.3f} | '
                   f'{np.abs(v - 0.5).mean():.3f} |')
    lines += ['', '![gates after training](bench/results/infini_gates.png)']
    v = np.concatenate(list(g.values()))
    lines += ['', f'Target: the gates move away from 0.5: {np.mean(np.abs(v - 0.5) > 0.1):.0%} '
              f'of the {len(v)} heads are more than 0.1 away; {np.sum(v >= 0.9)} read mostly '
              f'memory (>= 0.9), {np.sum(v <= 0.1)} mostly local attention (<= 0.1); mean '
              'abs(g - 0.5) >= 0.1 in every model: '
              f"{'met' if all(np.abs(x - 0.5).mean() >= 0.1 for x in g.values()) else 'missed'}."]
    lines.append('')
  if 'decode' in results:
    lines += ['## Decode state while reading a long input (lm_infini model, batch 1)', '',
              '| tokens | Infini state bytes | full-attention KV bytes | max RSS MiB | s | finite |',
              '|---|---|---|---|---|---|']
    for d in results['decode']:
      lines.append(f"| {d['tokens']} | {d['state_bytes']} | {d['full_kv_bytes']} | "
                   f"{d['max_rss_mib']:.0f} | {d['seconds']:.0f} | {d['finite']} |")
    d0, d1 = results['decode'][0], results['decode'][-1]
    flat = d0['state_bytes'] == d1['state_bytes'] and d1['finite']
    lines += ['', f"Target: decode memory flat from {d0['tokens']} to {d1['tokens']} tokens: "
              f"state {d0['state_bytes']} -> {d1['state_bytes']} bytes, peak RSS "
              f"{d1['max_rss_mib'] - d0['max_rss_mib']:+.0f} MiB: "
              f"{'met' if flat else 'missed'}.", '']
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--parts', default='lm,decode')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--segment_len', type=int, default=32)
  p.add_argument('--lm_segments', type=int, default=8)
  p.add_argument('--lm_steps', type=int, default=1000)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--decode_marks', type=int, default=5)
  p.add_argument('--workdir', default='/tmp/infini_bench')
  p.add_argument('--out', default='bench/results')
  p.add_argument('--seeds', default='0,1,2', help='comma list: the lm part trains each variant '
                 'once per seed (init and data order)')
  p.add_argument('--merge', default='', help='infini.json files to merge into OUT')
  p.add_argument('--tag', default='', help='suffix of the result key and workdir')
  args = p.parse_args()
  args.variants = args.variants.split(',')
  args.seeds = [int(x) for x in args.seeds.split(',')]
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, 'infini.json')
  results = {}
  if os.path.exists(json_path):          # parts run separately accumulate in one report
    with open(json_path) as f:
      results = json.load(f).get('results', {})
  for path in filter(None, args.merge.split(',')):   # results of runs with other --out
    with open(path) as f:
      for key, value in json.load(f)['results'].items():
        if key == 'commands':
          results['commands'] = results.get('commands', []) + value
        elif key == 'provenance':
          results.setdefault('provenance', {}).update(value)
        elif key == 'decode':
          results[key] = value
        else:                            # {variant: [runs]}: a merged seed replaces its own
          for name, runs in value.items():
            seeds = {r['seed'] for r in runs}
            kept = [r for r in results.setdefault(key, {}).get(name, []) if r['seed'] not in seeds]
            results[key][name] = sorted(kept + runs, key=lambda r: r['seed'])
  results['commands'] = results.get('commands', []) + [
      'python bench/infini.py ' + ' '.join(sys.argv[1:])]
  parts = [p for p in args.parts.split(',') if p]
  fns = dict(lm=part_lm, decode=part_decode)
  def save():
    with open(json_path, 'w') as f:
      json.dump(dict(args=vars(args), results=results), f, indent=1)
  for part in parts:                     # in the order given; saved after each
    results[part + args.tag] = fns[part](args, args.workdir + args.tag)
    results.setdefault('provenance', {})[part + args.tag] = provenance.record(
        MEASURES, args.seeds)
    save()
  save()                                 # merged runs and this command
  plot(results, args.out)
  md = markdown(results, args)
  with open(os.path.join(args.out, 'infini.md'), 'w') as f:
    f.write(md + '\n')
  print(md)


if __name__ == '__main__':
  main()
