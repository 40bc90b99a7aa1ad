"""Zoology MQAR for every mixer: a resumable grid of (mixer, T, pairs, d_model, lr) cells.

  python -m bench.zoology --mixers=attention --cells=64:4,128:8 --d_models=64,128 \
      [--lrs=1e-2,2.15e-3,4.64e-4,1e-4] [--examples=192000] [--work=/tmp/zoology]
  python -m bench.zoology --render          # only rewrite the page from the results file

Protocol (Arora, Eyuboglu et al. 2023, section 3; the data: data/zoology.py, source
zoology:mqar): vocabulary 8192, keys from the first half and values from the second, the pairs
first and the queries at power-law gaps (a = 0.01), loss and accuracy on the queried values
only; 2 layers; learning rates logspace(-4, -2, 4), the best one reported; early stop at 0.99
held-out accuracy (train.stop_at_accuracy). The output head runs at the P queried values
only (train.loss_positions = P: the same loss and gradient, 2-3x faster at vocabulary 8192
and d_model 64, where the head is most of a step). Each cell is a train.py run in this process
(bench.common.train_command: the real loop, its checkpoints, its held-out accuracy) with a
fixed budget of training examples (--examples, cycled over --train_examples distinct ones)
and --test_examples held-out ones.

The grid runs cell by cell, each recorded in bench/results/OUT.json as soon as it finishes
(with its command and provenance), so a run stopped at any point keeps every finished cell and
a rerun skips them; an interrupted cell resumes from its checkpoints. Grids of other cells
can run at the same time (one per core): each re-reads the file before recording. Within a
(mixer, T, pairs, d_model) group the learning rates run from the largest down and stop at the
first that reaches the early-stop accuracy (a smaller one could only tie it: the runs stop at 0.99).
Where the page's protocol differs from Zoology's, it says so.
"""
import argparse
import json
import os
import shutil
import time

from bench import provenance
from bench.common import ROOT, load_json, save_json, run_study, train_command

MEASURES = provenance.CORE + ('data/zoology.py', 'models')
# mixer -> (config, overrides given the sequence length T); the memory mixers' segment (and the
# sliding window) is T / 4, so the pairs lie beyond the attention's reach for most queries.
MIXERS = {
    'attention': ('configs/transformer.py:tiny', lambda T: {}),
    'sliding': ('configs/sliding.py:tiny', lambda T: {'model.window': T // 4,
                                                      'model.segment_len': T // 4}),
    'titans_mac': ('configs/titans_mac.py:tiny', lambda T: _titans(T)),
    'titans_mag': ('configs/titans_mag.py:tiny', lambda T: _titans(T)),
    'titans_mal': ('configs/titans_mal.py:tiny', lambda T: _titans(T)),
    'titans_lmm': ('configs/titans_lmm.py:tiny', lambda T: _titans(T)),
    'infini': ('configs/infini.py:tiny', lambda T: {'model.segment_len': T // 4}),
    'infini_delta': ('configs/infini.py:tiny', lambda T: {'model.segment_len': T // 4,
                                                          'model.infini.update_rule': 'delta'}),
}
def _titans(T):
  """Segments of T / 4 in chunks of (at most) 8 tokens: the memory updates twice or more per
  segment."""
  return {'model.segment_len': T // 4, 'model.titans.chunk': max(1, min(8, T // 8))}


LRS = (1e-2, 2.15e-3, 4.64e-4, 1e-4)            # logspace(-4, -2, 4), largest first
SOLVED = 0.99
BATCH = 64


def reach(mixer, T, n_layers=2):
  """Tokens back that a query's attention sees directly (the rest only through a state)."""
  return T if mixer == 'attention' else n_layers * T // 4 if mixer == 'sliding' else T // 4


def command(mixer, T, pairs, d, lr, args, workdir):
  """The train.py command of one cell."""
  spec, extra = MIXERS[mixer]
  heads = max(1, d // 64)
  steps = max(1, args.examples // BATCH)
  source = (f'zoology:mqar:pairs={pairs},vocab=8192,train_examples={args.train_examples},'
            f'test_examples={args.test_examples}')
  sets = {'data.source': source, 'data.seq_len': T, 'model.vocab_size': 8192,
          'model.d_model': d, 'model.n_layers': 2, 'model.n_heads': heads,
          'model.n_kv_heads': heads, 'train.batch_size': BATCH, 'train.steps': steps,
          'train.lr': lr, 'train.warmup_steps': min(100, steps // 10),
          'train.weight_decay': 0.1, 'train.log_every': args.eval_every,
          'train.eval_every': args.eval_every, 'train.ckpt_every': args.eval_every * 4,
          'train.stop_at_accuracy': SOLVED, 'train.loss_positions': pairs,
          'train.peak_flops': 1e11,
          'data.eval_batches': args.test_examples // BATCH, **extra(T)}
  return (f'python train.py --config={spec} --workdir={workdir} '
          + ' '.join(f'--config.{k}={v}' for k, v in sets.items()))


def state_bytes(mixer, T, d, pairs):
  """Bytes of the decode state per sequence after T tokens (KV cache or recurrent state)."""
  import jax
  from bench.common import load_config
  from training.config import resolve
  from training.state import model_ctor
  spec, extra = MIXERS[mixer]
  heads = max(1, d // 64)
  cfg = resolve(load_config(spec, {'model.d_model': d, 'model.n_layers': 2,
                                   'model.n_heads': heads, 'model.n_kv_heads': heads,
                                   'data.seq_len': T, **extra(T)}))
  model = model_ctor(cfg)()
  state = jax.eval_shape(lambda: model.init_state(1, T))
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def workdir(args, cell_key):
  return os.path.join(args.work, cell_key.replace('|', '_'))


def run_cell(mixer, T, pairs, d, lr, args):
  """Trains one cell; returns its row."""
  w = workdir(args, key(mixer, T, pairs, d, lr))
  cmd = command(mixer, T, pairs, d, lr, args, w)
  seconds = train_command(cmd)
  with open(os.path.join(w, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'eval_accuracy' in r]
  last = evals[-1]
  return dict(mixer=mixer, T=T, pairs=pairs, d_model=d, lr=lr, steps=last['step'],
              examples=last['step'] * BATCH, accuracy=last['eval_accuracy'],
              best_accuracy=max(r['eval_accuracy'] for r in evals),
              eval_loss=last['eval_loss'], solved=last['eval_accuracy'] >= SOLVED,
              reach=reach(mixer, T), state_bytes=state_bytes(mixer, T, d, pairs),
              seconds=seconds, curve=[(r['step'], r['eval_accuracy']) for r in evals],
              provenance=provenance.record(MEASURES, 0, cmd))


def key(mixer, T, pairs, d, lr):
  return f'{mixer}|T{T}|P{pairs}|d{d}|lr{lr:g}'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--mixers', default='attention')
  ap.add_argument('--cells', default='64:4,128:8', help='T:pairs,...')
  ap.add_argument('--d_models', default='64,128')
  ap.add_argument('--lrs', default=','.join(f'{lr:g}' for lr in LRS))
  ap.add_argument('--examples', type=int, default=192_000, help='training examples per cell')
  ap.add_argument('--train_examples', type=int, default=100_000)
  ap.add_argument('--test_examples', type=int, default=1_024)
  ap.add_argument('--eval_every', type=int, default=100, help='steps between held-out evals')
  ap.add_argument('--work', default='/tmp/zoology')
  ap.add_argument('--out', default='zoology')
  ap.add_argument('--keep', action='store_true', help='keep finished cells\' workdirs')
  ap.add_argument('--render', action='store_true', help='only rewrite the page')
  args = ap.parse_args(argv)
  from bench.zoology_page import write
  prefix = os.path.join(ROOT, 'bench', 'results', args.out)
  path = prefix + '.json'
  results = load_json(path, {'cells': {}})
  if not args.render:
    results['protocol'] = dict(examples=args.examples, train_examples=args.train_examples,
                               test_examples=args.test_examples, batch=BATCH,
                               eval_every=args.eval_every, vocab=8192, power_a=0.01)
    lrs = sorted((float(x) for x in args.lrs.split(',')), reverse=True)
    for mixer in args.mixers.split(','):
      for cell in args.cells.split(','):
        T, pairs = (int(x) for x in cell.split(':'))
        for d in (int(x) for x in args.d_models.split(',')):
          for lr in lrs:
            k = key(mixer, T, pairs, d, lr)
            if k in results['cells']:
              if results['cells'][k]['solved']:
                break
              continue
            t0 = time.time()
            row = run_cell(mixer, T, pairs, d, lr, args)
            # re-read first: another grid process (other cells) may have recorded its own
            results['cells'] = {**load_json(path, {'cells': {}})['cells'], k: row}
            save_json(path, results)
            write(results, prefix)
            print(f"{k}: accuracy {row['accuracy']:.3f} (best {row['best_accuracy']:.3f}) "
                  f"after {row['examples']} examples, {time.time() - t0:.0f} s", flush=True)
            if not args.keep:
              shutil.rmtree(workdir(args, k), ignore_errors=True)
            if row['solved']:
              break
  write(results, prefix)


if __name__ == '__main__':
  run_study(main)
