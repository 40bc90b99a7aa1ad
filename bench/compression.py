"""KV-cache compression on kvpress's protocol: score against compression ratio for every policy,
with paired bootstrap confidence intervals.

  python -m bench.compression --base=runs/base_tasks --namm_run=runs/namm_tasks_s0 \
      [--tasks=kv,kv4,kvlocal] [--length=320] [--prompts=512] [--out=compression]
  python -m bench.compression --base=hf:runs/standin/hf --length=1024 --out=compression_ruler \
      --tasks=ruler:niah_single_1,ruler:niah_multikey_1,ruler:vt
  python -m bench.compression --speed --base=... [--namm_run=...]   # decode speed, memory
  python -m bench.compression --render [--out=compression]     # only rewrite the page

Protocol (NVIDIA kvpress's leaderboard): each policy keeps (1 - ratio) of the context's KV
(decode.compression_ratio, training/policy.py ratio_budget) for ratios 0.25, 0.5, 0.75 and
0.875 (0: the full cache); the question is not visible when the cache is compressed: the
prompt's question (task_examples' Q tokens) and the answer follow the compression, without
eviction. Two settings:
  prefill   the context is read at once and compressed once (kvpress's presses);
  streamed  the context is read in chunks of --interval tokens and compressed after each to the
            same budget (a decoding press: the cache never holds more than budget + interval).
Score: the base's teacher-forced answer accuracy per prompt (training/evolve.py make_scorer, as
NAMM's fitness), on --prompts held-out prompts per task (eval split, --seed). The mean over tasks
and its 95% interval come from a bootstrap stratified by task (prompts resampled within each
task), and so do the paired differences (the same resampled prompts for both policies).

Each (setting, policy, ratio) cell is recorded in bench/results/OUT.json as soon as it is
measured, so a stopped run keeps its cells and a rerun skips them.
"""
import argparse
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import numpy as np

from bench import provenance
from bench.common import ROOT, apply_overrides, load_json, save_json
from bench.compression_page import RATIOS, encode, key, write

MEASURES = provenance.CORE + ('models/eviction.py', 'models/presses.py', 'models/namm.py',
                              'training/policy.py', 'training/evolve.py')
POLICIES = ('streaming_llm', 'recency', 'tova', 'snapkv', 'pyramidkv', 'adakv', 'h2o', 'l2',
            'keydiff', 'random', 'namm')
SETTINGS = ('prefill', 'streamed')


def namm_runs(arg):
  """--namm_run 'PATH' or 'LABEL=PATH,...' -> {label: path} (an unlabelled run: 'namm'). A path
  'A+B+...' joins runs each evolved at one ratio (evolve.compression_ratio): one NAMM per ratio,
  the label's cell at a ratio from the run evolved there (run_at)."""
  runs = {}
  for item in filter(None, arg.split(',')):
    label, _, path = item.rpartition('=')
    runs[label or 'namm'] = path
  return runs


def expand(policies, runs):
  """The row names: 'namm' stands for every NAMM run's label (none without runs)."""
  return [q for p in policies.split(',') for q in (list(runs) if p == 'namm' else [p])]


def evolve_settings(run):
  """How an evolve.py run searched (its saved config): the command line's evolve keys."""
  from training.checkpoint import Checkpointer
  saved = Checkpointer.saved_config(run)
  ev = saved['evolve']
  keys = ('strategy', 'population', 'stages', 'generations', 'prompts', 'length',
          'cache_weight', 'query_agnostic', 'compression_ratio')
  return dict(seed=saved['seed'], update_interval=saved['namm']['update_interval'],
              **{k: ev.get(k) for k in keys})


def run_at(path, ratio):
  """The run behind a label's cell at `ratio`: `path`, or of joined runs the one evolved at
  `ratio` (None: the label has no cell there)."""
  paths = path.split('+')
  if len(paths) == 1:
    return path
  return next((p for p in paths if evolve_settings(p)['compression_ratio'] == ratio), None)


def label_settings(path):
  """evolve_settings of a label; of joined runs, the first's with every run's ratio listed
  (seeds and searches are the same by construction of the command line)."""
  got = [evolve_settings(p) for p in path.split('+')]
  if len(got) > 1:
    got[0]['compression_ratio'] = [g['compression_ratio'] for g in got]
  return got[0]


def has_cell(name, ratio, runs):
  return name not in runs or run_at(runs[name], ratio) is not None


def cell_cfg(base_cfg, name, ratio, runs):
  cfg = base_cfg.copy_and_resolve_references()
  policy = 'namm' if name in runs else name
  return apply_overrides(cfg, {'decode.policy': policy, 'decode.compression_ratio': ratio,
                               'decode.namm_run': run_at(runs[name], ratio) if name in runs
                                                  else ''})


def measure(base, sets, policy, chunk, batch):
  """{task: (scores [n], cache fraction)} of `policy` (a pytree) on the task sets."""
  from training import evolve as evo
  out = {}
  for t, s in sets.items():
    score = jax.jit(evo.make_scorer(base.graphdef, {t: s['context']}, chunk,
                                    {t: s['question']}))
    scores, fracs = [], []
    for i in range(0, len(s['tokens']), batch):
      got, frac_L, _ = score(base.state, policy, {t: s['tokens'][i:i + batch]})
      scores.append(np.asarray(got[t]))
      fracs.append(float(np.mean(frac_L)))
    out[t] = (np.concatenate(scores), float(np.mean(fracs)))
  return out


def run(args):
  from models.eviction import KeepAll
  from training import evolve as evo
  from training.policy import make_policy
  prefix = os.path.join(ROOT, 'bench', 'results', args.out)
  results = load_json(prefix + '.json', {'cells': {}})
  base = evo.load_base(args.base)
  tasks = args.tasks.split(',')
  sets = {t: evo.task_examples(t, args.prompts, args.length, args.seed, 'eval',
                               evo.corpus_source(base.cfg), base.cfg.data.tokenizer)
          for t in tasks}
  read = {t: int(evo.read_under_policy(s['context'], s['question'])) for t, s in sets.items()}
  assert len(set(read.values())) == 1, 'one context length per run (the budget is static)'
  runs, old = namm_runs(args.namm_run), results.get('protocol', {})
  results['protocol'] = dict(
      base=args.base, tasks=tasks, length=args.length, prompts=args.prompts, seed=args.seed,
      interval=args.interval, namm_runs={**old.get('namm_runs', {}), **runs},
      namm_settings={**old.get('namm_settings', {}),
                     **{label: label_settings(path) for label, path in runs.items()}},
      context=read,
      question={t: int(s['question']) for t, s in sets.items()},
      base_model=dict(layers=base.cfg.model.n_layers, d_model=base.cfg.model.d_model,
                      heads=base.cfg.model.n_heads, kv_heads=base.cfg.model.n_kv_heads,
                      source=base.cfg.data.source, steps=base.cfg.train.steps))
  cells = [('full', 'keep_all', 0.0)] + [
      (setting, p, r) for setting in args.settings.split(',')
      for p in expand(args.policies, runs) for r in (float(x) for x in args.ratios.split(','))
      if has_cell(p, r, runs)]
  for setting, name, ratio in cells:
    k = key(setting, name, ratio)
    if k in results['cells']:
      continue
    t0 = time.time()
    if name == 'keep_all':
      policy, chunk = KeepAll(), 0
    else:
      cfg = cell_cfg(base.cfg, name, ratio, runs)
      policy = make_policy(cfg, read[tasks[0]])
      chunk = args.interval if setting == 'streamed' else 0
    got = measure(base, sets, policy, chunk, args.batch)
    results['cells'][k] = dict(
        setting=setting, policy=name, ratio=ratio, seconds=round(time.time() - t0, 1),
        cache={t: round(c, 4) for t, (_, c) in got.items()},
        scores={t: encode(s) for t, (s, _) in got.items()},
        mean=float(np.mean([s.mean() for s, _ in got.values()])),
        provenance=provenance.record(MEASURES, args.seed))
    save_json(prefix + '.json', results)
    print(f'{k}: {results["cells"][k]["mean"]:.3f} '
          f'({time.time() - t0:.0f} s)', flush=True)
  return results


def speed(args, base):
  """Decode throughput and memory per policy and ratio, head to head in one run: a prompt of
  --speed_prompt corpus tokens read in chunks of --interval, then --interval greedy steps
  (timed), in a cache of budget + interval slots per KV head (full: prompt + new; adakv: the
  same, as its heads' sizes differ: kvpress's AdaKV masks, it does not shrink the cache). The
  model has the base's shape (weights do not change the time)."""
  import jax.numpy as jnp
  from bench.common import alternate
  from bench.side_by_side.decoding import corpus_prompt, decode_program
  from models.eviction import KeepAll
  from training.policy import make_policy, ratio_budget
  P, B, new = args.speed_prompt, args.speed_batch, args.interval
  prompt = jnp.asarray(corpus_prompt(B, P))
  runs = namm_runs(args.namm_run)
  jobs = [('keep_all', 0.0)] + [(p, float(r)) for p in expand(args.policies, runs)
                                for r in args.ratios.split(',') if has_cell(p, float(r), runs)]
  programs = []
  for name, ratio in jobs:
    cfg = apply_overrides(cell_cfg(base.cfg, name, ratio, runs),
                          {'decode.prefill_chunk': new})
    if name == 'keep_all':
      policy, capacity = KeepAll(), 0
    else:
      policy = make_policy(cfg, P)
      capacity = 0 if name == 'adakv' else ratio_budget(cfg, P).decode.budget + new
    programs.append(decode_program(cfg, prompt, new, args.seed, capacity, policy))
    print(f'speed: compiled {name} {ratio:g}', flush=True)
  times = alternate([run for run, _ in programs], args.speed_rounds)
  rows = []
  for (name, ratio), (_, r), ts in zip(jobs, programs, times):
    rows.append(dict(policy=name, ratio=ratio, tokens_per_s=B * new / float(np.median(ts)),
                     spread=[B * new / max(ts), B * new / min(ts)],
                     state_bytes=r['state_bytes'], kv_bytes=r['kv_bytes'][-1]))
  return dict(prompt=P, batch=B, new=new, rounds=args.speed_rounds, rows=rows,
              provenance=provenance.record(MEASURES, args.seed))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--base', help='train.py workdir or hf:DIR of the base LM')
  ap.add_argument('--namm_run', default='',
                  help='evolve.py runs on that base: PATH or LABEL=PATH,... (rows LABEL)')
  ap.add_argument('--tasks', default='kv,kv4,kvlocal')
  ap.add_argument('--length', type=int, default=320, help='tokens per example')
  ap.add_argument('--prompts', type=int, default=512, help='held-out prompts per task')
  ap.add_argument('--seed', type=int, default=1000, help='base seed of the held-out prompts')
  ap.add_argument('--ratios', default=','.join(f'{r:g}' for r in RATIOS))
  ap.add_argument('--policies', default=','.join(POLICIES))
  ap.add_argument('--settings', default=','.join(SETTINGS))
  ap.add_argument('--interval', type=int, default=64, help='streamed: tokens per compression')
  ap.add_argument('--batch', type=int, default=128, help='prompts per call')
  ap.add_argument('--out', default='compression')
  ap.add_argument('--speed', action='store_true',
                  help='only measure decode tokens/s and memory per policy and ratio')
  ap.add_argument('--speed_prompt', type=int, default=1024)
  ap.add_argument('--speed_batch', type=int, default=4)
  ap.add_argument('--speed_rounds', type=int, default=5)
  ap.add_argument('--render', action='store_true', help='only rewrite the page')
  args = ap.parse_args(argv)
  prefix = os.path.join(ROOT, 'bench', 'results', args.out)
  if args.speed:              # its own file: a sweep may be writing the cells meanwhile
    from training import evolve as evo
    save_json(prefix + '_speed.json', speed(args, evo.load_base(args.base)))
    results = load_json(prefix + '.json', None)
  else:
    results = load_json(prefix + '.json', None) if args.render else run(args)
  results['speed'] = load_json(prefix + '_speed.json', None)
  write(results, prefix)


if __name__ == '__main__':
  main()
