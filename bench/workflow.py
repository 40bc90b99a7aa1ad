"""The papers' workflow on the subword stand-in: continued pretraining with each memory method
from the HF base, then RULER through the decode path; and eviction policies on the base's cache.

  python -m bench.workflow --base=runs/standin/hf_retrieval [--steps=150] \
      [--methods=full,infini,anchor_ep,titans_mac] [--lengths=512,1024,2048] \
      [--tasks=niah_single_1,niah_single_2,niah_multikey_1,vt] [--examples=8] \
      [--policies=none,recency,h2o] [--namm_run=runs/namm_standin] [--work=runs/workflow]

1. Each method trains from hf:BASE (train.py --config.train.init_from=hf:BASE: the
   architecture and tokenizer come from BASE) for the same --steps on the same data
   (--source, answers weighted as data.loss=answer), at --train_length; 'full' is the plain
   model continued the same way (the control). Runs train in this process
   (bench.common.train_command) and resume where a killed study left them.
2. RULER (bench/ruler.py's passes, training/ruler_eval.py): every method's run and the base
   with the full cache, and the base under each --policies at --cache of the context (with
   --namm_run, also the evolved NAMM, decode.policy=namm).
Each (run, policy, length) pass is recorded in bench/results/OUT.json as it finishes (with
its command and provenance), so a stopped study keeps its passes and a rerun skips them.
"""
import argparse
import os
import time

import numpy as np

from bench import provenance
from bench.common import ROOT, load_json, save_json, run_study, train_command
from bench.ruler import measure_pass

MEASURES = provenance.CORE + ('data/ruler.py', 'training/ruler_eval.py', 'models')
CONFIGS = {'full': 'configs/transformer.py:tiny', 'infini': 'configs/infini.py:tiny',
           'anchor_ep': 'configs/anchor_ep.py:tiny', 'titans_mac': 'configs/titans_mac.py:tiny'}
SOURCE = 'mix:stdlib+ruler:niah_single_1,niah_single_2,niah_multikey_1,vt'


def train_cmd(method, args):
  """The train.py command of one method's continued pretraining."""
  seg = args.train_length // 4                  # memory methods: 4 segments per sequence
  sets = {'train.init_from': f'hf:{args.base}', 'data.source': args.source,
          'data.loss': 'answer', 'data.seq_len': args.train_length, 'train.steps': args.steps,
          'train.batch_size': 8, 'train.lr': 1e-3, 'train.warmup_steps': 10,
          'train.log_every': 10, 'train.eval_every': args.steps, 'train.ckpt_every': 50,
          'data.eval_batches': 4}
  if method in ('infini', 'titans_mac'):
    sets['model.segment_len'] = seg
  return (f'python train.py --config={CONFIGS[method]} --workdir={args.work}/{method} '
          + ' '.join(f'--config.{k}={v}' for k, v in sets.items()))


def train_method(method, args, results, prefix):
  """Continued pretraining of one method (resumes a killed run); its row recorded."""
  from bench.workflow_page import write
  from training.metrics import read_metrics
  cmd = train_cmd(method, args)
  seconds = train_command(cmd)
  last = read_metrics(f'{args.work}/{method}')[args.steps]
  results['training'][method] = dict(
      eval_loss=last['eval_loss'], eval_accuracy=last['eval_accuracy'], seconds=seconds,
      provenance=provenance.record(MEASURES, 0, cmd))
  save_json(prefix + '.json', results)
  write(results, prefix)


def passes(args):
  """[(run name, run path, policy)]: every method with the full cache, the base under each
  policy."""
  out = [('base', f'hf:{args.base}', p) for p in args.policies.split(',')]
  if args.namm_run:
    out.append(('base', f'hf:{args.base}', 'namm'))
  return out + [(m, f'{args.work}/{m}', 'none') for m in args.methods.split(',')]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--base', default='runs/standin/hf_retrieval', help='an HF Llama directory')
  ap.add_argument('--methods', default='full,infini,anchor_ep,titans_mac')
  ap.add_argument('--steps', type=int, default=150)
  ap.add_argument('--train_length', type=int, default=512)
  ap.add_argument('--source', default=SOURCE)
  ap.add_argument('--lengths', default='512,1024,2048')
  ap.add_argument('--tasks', default='niah_single_1,niah_single_2,niah_multikey_1,vt')
  ap.add_argument('--examples', type=int, default=8)
  ap.add_argument('--policies', default='none,recency,h2o')
  ap.add_argument('--cache', type=float, default=0.5)
  ap.add_argument('--namm_run', default='', help='evolve.py workdir of a NAMM on the base')
  ap.add_argument('--work', default='runs/workflow')
  ap.add_argument('--out', default='workflow')
  ap.add_argument('--render', action='store_true', help='only rewrite the page')
  args = ap.parse_args(argv)
  from bench.workflow_page import write
  prefix = os.path.join(ROOT, 'bench', 'results', args.out)
  results = load_json(prefix + '.json', {'training': {}, 'passes': {}})
  if not args.render:
    results['setup'] = dict(base=args.base, steps=args.steps, train_length=args.train_length,
                            source=args.source, examples=args.examples, cache=args.cache,
                            tasks=args.tasks.split(','))
    for name, run, policy in passes(args):        # the base first: it needs no training
      if name != 'base' and name not in results['training']:
        train_method(name, args, results, prefix)
      for length in (int(n) for n in args.lengths.split(',')):
        key = f'{name}|{policy}|{length}'
        if key in results['passes']:
          continue
        t0 = time.time()
        extra = {'decode.namm_run': args.namm_run} if policy == 'namm' else {}
        rows = measure_pass(run, policy, length, args.tasks.split(','), args.examples,
                            args.cache, **extra)
        results['passes'][key] = dict(
            run=name, policy=policy, length=length, rows=rows, seconds=time.time() - t0,
            provenance=provenance.record(MEASURES, 0, f'python -m bench.workflow '
                                         f'(pass {key}; evaluate.py on {run})'))
        save_json(prefix + '.json', results)
        write(results, prefix)
        print(key, np.mean([r['score'] for r in rows if r['score'] is not None] or [np.nan]),
              flush=True)
  write(results, prefix)


if __name__ == '__main__':
  run_study(main)
