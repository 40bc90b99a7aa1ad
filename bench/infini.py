"""Infini-attention benchmark (CPU-sized): Infini vs segment-local vs full attention.

  python bench/infini.py --out=bench/results            # everything (tens of minutes on CPU)
  python bench/infini.py --parts=lm --lm_steps=400      # one part

Parts:
  lm       train each variant on the embedded corpus (stdlib) at seq_len = S x N, report the
           held-out loss per segment (segments >= 2 are where the memory can help).
  passkey  train each variant on synthetic passkey prompts, report exact-match accuracy
           (teacher forcing) by needle depth at the training length and at 2x / 4x.
  gates    histogram of sigmoid(beta) of the trained Infini models (starts at 0.5).
  decode   state bytes and process RSS while prefilling 4K ... 1M tokens into the trained
           Infini model's state in aligned chunks, vs the KV cache full attention would hold.
Writes OUT/infini.json, OUT/infini.md, OUT/infini_gates.png, OUT/infini_segments.png.
"""
import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs.infini import get_config  # noqa: E402
from training.config import resolve, validate  # noqa: E402

VARIANTS = ('infini', 'infini_delta', 'local', 'full')


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


def gates(ev):
  """sigmoid(beta) per layer and head of a restored Infini model (None for others)."""
  state = ev.state
  if 'infini' not in ev.cfg.model.mixer or not ev.cfg.model.infini.memory:
    return None                          # no gates, or unused ones (segment-local baseline)
  out = []
  for i in sorted(state['blocks'].keys()):
    mixer = state['blocks'][i]['mixer']
    if 'beta' in mixer:
      out.append(np.asarray(jax.nn.sigmoid(mixer['beta'][...])).tolist())
  return out or None


def part_lm(args, root):
  S, N = args.lm_segments, args.segment_len
  res = {}
  for name in args.variants:
    cfg = variant_config(name, seq_len=S * N, segment_len=N, steps=args.lm_steps,
                         source='stdlib', batch=args.batch, seed=args.seed)
    wd = os.path.join(root, f'lm_{name}')
    run = train_variant(cfg, wd)
    ev = evaluator(wd, **{'eval.buckets': S})
    loss = ev.loss()
    res[name] = dict(run, eval_loss=loss['loss'], segment_loss=[b['loss'] for b in loss['buckets']],
                     gates=gates(ev))
    print(name, 'segment loss', np.round(res[name]['segment_loss'], 4), flush=True)
  return res


def answer_nll(ev, length, depth, n):
  """Mean teacher-forced nll (nats) of the answer digits: graded where exact match is 0."""
  from data import synthetic
  from training.step import token_nll
  batch = synthetic.make_task_batch('passkey', n, length, depth, seed=ev.cfg.seed, split='eval')
  tokens_BxL = jnp.asarray(batch['tokens_BxL'])
  mask_BxL = jnp.asarray(batch['answer_mask_BxL'][:, :-1])
  nll_BxL, _ = jax.jit(lambda st, t: token_nll(nnx.merge(ev.graphdef, st), t))(ev.state, tokens_BxL)
  return float((nll_BxL * mask_BxL).sum() / mask_BxL.sum())


def part_passkey(args, root):
  S, N = args.passkey_segments, args.segment_len
  L = S * N
  depths = tuple(round((i + 0.5) / S, 3) for i in range(S))     # the needle in segment i
  res = {}
  for name in args.variants:
    cfg = variant_config(name, seq_len=L, segment_len=N, steps=args.passkey_steps,
                         source='synthetic:passkey', batch=args.batch, seed=args.seed)
    wd = os.path.join(root, f'passkey_{name}')
    run = train_variant(cfg, wd)
    ev = evaluator(wd, **{'eval.tasks': ('passkey',), 'eval.examples': args.examples,
                          'eval.lengths': (L + 1, 2 * L + 1, 4 * L + 1), 'eval.depths': depths})
    cells = ev.tasks()
    for c in cells:
      c['answer_nll'] = answer_nll(ev, c['length'], c['depth'], args.examples)
    res[name] = dict(run, cells=cells, gates=gates(ev), steps=args.passkey_steps, length=L)
    for c in cells:
      print(name, c['length'], c['depth'], c.get('accuracy'), flush=True)
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


def plot(results, out):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if 'lm' in results:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results['lm'].items():
      ax.plot(range(1, len(r['segment_loss']) + 1), r['segment_loss'], 'o-', label=name)
    ax.set_xlabel('segment'), ax.set_ylabel('held-out loss (nats/token)'), ax.legend()
    ax.set_title('stdlib: loss per segment')
    fig.tight_layout(), fig.savefig(os.path.join(out, 'infini_segments.png'), dpi=120)
  skip = ('decode', 'commands')
  g = [(f'{part}:{name}', np.ravel(r['gates'])) for part in results if part not in skip
       for name, r in results[part].items() if r.get('gates')]
  if g:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist([v for _, v in g], bins=np.linspace(0, 1, 21), label=[k for k, _ in g])
    ax.axvline(0.5, color='k', ls=':')
    ax.set_xlabel('sigmoid(beta) (1 = memory only)'), ax.set_ylabel('heads'), ax.legend()
    ax.set_title('gates after training (init 0.5)')
    fig.tight_layout(), fig.savefig(os.path.join(out, 'infini_gates.png'), dpi=120)


def markdown(results, args):
  cmds = results.get('commands', ['python bench/infini.py ' + ' '.join(sys.argv[1:])])
  lines = ['# Infini-attention benchmark (CPU)', '', 'Commands:', '', '```',
           *cmds, '```', '',
           f'Model: configs/infini.py:tiny (d_model 128, 2 layers, 4 heads x 32), '
           f'N = {args.segment_len}, batch {args.batch}, gate lr x10 without weight decay.', '']
  if 'lm' in results:
    r = results['lm']
    S = args.lm_segments
    lines += [f'## Language modelling (stdlib, {S} segments x {args.segment_len}, '
              f'{args.lm_steps} steps, 1 seed)', '',
              '| variant | eval loss | ' + ' | '.join(f'seg {i + 1}' for i in range(S)) +
              ' | mean seg >= 2 | train s |', '|---' * (S + 4) + '|']
    for name, v in r.items():
      seg = v['segment_loss']
      lines.append(f'| {name} | {v["eval_loss"]:.4f} | ' + ' | '.join(f'{x:.4f}' for x in seg) +
                   f' | {np.mean(seg[1:]):.4f} | {v["seconds"]:.0f} |')
    lines.append('')
  for key in [k for k in results if k.startswith('passkey')]:
    r = results[key]
    lines += [f'## Passkey ({key}: train {args.passkey_segments} segments x {args.segment_len}; '
              f'exact match of the 5 digits (mean nll of the digits in nats), teacher forcing, '
              f'{args.examples} held-out prompts per cell; needle depth = middle of segment i '
              'of the training length)', '',
              '| variant | train steps | eval length | ' + ' | '.join(
                  f'depth {i + 1}' for i in range(args.passkey_segments)) + ' |',
              '|---' * (args.passkey_segments + 3) + '|']
    for name, v in r.items():
      by_len = {}
      for c in v['cells']:
        by_len.setdefault(c['length'], []).append(c)
      for length, cs in by_len.items():
        lines.append(f'| {name} | {v.get("steps", "?")} | {length} | ' + ' | '.join(
            '-' if c.get('accuracy') is None else
            f"{c['accuracy']:.2f} ({c.get('answer_nll', float('nan')):.2f})" for c in cs) + ' |')
    lines.append('')
  skip = ('decode', 'commands')
  g = {f'{p}:{n}': np.ravel(v['gates']) for p in results if p not in skip
       for n, v in results[p].items() if v.get('gates')}
  if g:
    lines += ['## Gates sigmoid(beta) after training (init 0.5 for every head)', '',
              '| model | min | mean | max | mean abs(g - 0.5) |', '|---|---|---|---|---|']
    for k, v in g.items():
      lines.append(f'| {k} | {v.min():.3f} | {v.mean():.3f} | {v.max():.3f} | '
                   f'{np.abs(v - 0.5).mean():.3f} |')
    lines.append('')
  if 'decode' in results:
    lines += ['## Decode state while reading a long input (lm_infini model, batch 1)', '',
              '| tokens | Infini state bytes | full-attention KV bytes | max RSS MiB | s | finite |',
              '|---|---|---|---|---|---|']
    for d in results['decode']:
      lines.append(f"| {d['tokens']} | {d['state_bytes']} | {d['full_kv_bytes']} | "
                   f"{d['max_rss_mib']:.0f} | {d['seconds']:.0f} | {d['finite']} |")
    lines.append('')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--parts', default='lm,passkey,decode')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--segment_len', type=int, default=64)
  p.add_argument('--lm_segments', type=int, default=4)
  p.add_argument('--lm_steps', type=int, default=400)
  p.add_argument('--passkey_segments', type=int, default=4)
  p.add_argument('--passkey_steps', type=int, default=400)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--examples', type=int, default=16)
  p.add_argument('--decode_marks', type=int, default=5)
  p.add_argument('--workdir', default='/tmp/infini_bench')
  p.add_argument('--out', default='bench/results')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--merge', default='', help='infini.json files to merge into OUT')
  p.add_argument('--tag', default='', help='suffix of the result key and workdir')
  args = p.parse_args()
  args.variants = args.variants.split(',')
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
        else:
          results.setdefault(key, {}).update(value)
  results['commands'] = results.get('commands', []) + [
      'python bench/infini.py ' + ' '.join(sys.argv[1:])]
  parts = [p for p in args.parts.split(',') if p]
  fns = dict(lm=part_lm, passkey=part_passkey, decode=part_decode)
  for part in parts:                     # in the order given
    results[part + args.tag] = fns[part](args, args.workdir + args.tag)
    with open(json_path, 'w') as f:
      json.dump(dict(args=vars(args), results=results), f, indent=1)
  plot(results, args.out)
  md = markdown(results, args)
  with open(os.path.join(args.out, 'infini.md'), 'w') as f:
    f.write(md + '\n')
  print(md)


if __name__ == '__main__':
  main()
