"""Titans in few large ops: XLA ops per layer and segment, the short-shape train step head to
head with attention, and the floor the fast weights' traffic sets.

  python -m bench.titans_ops [--rounds=7] [--out=titans_ops]
  (bench/accelerator.sh runs it on a GPU / TPU host: --out=titans_ops_PLATFORM)

ops        XLA ops one train step runs (a profiler trace, bench.common.op_trace: a
           hardware-independent count; on a GPU each is a kernel launch), per layer and segment:
           the difference between the step at 2L and at L tokens over the added layer-segments
           (what a longer context costs, without the step's fixed part), at the tiny shape
           (d 128, 2 layers, 2 heads, batch 4, segments of 64). Rows: titans_mac at the paper's
           chunk b = 16 and at b = 64 (one chunk per segment); the floor of a segment of a
           transformer layer in this LM (sliding, window = segment: attention + MLP, state
           carried); infini; and the neural memory alone (forward + backward of one segment).
short      the train step at batch 32 x 64 tokens, width 128, 2 layers, 1 head: attention vs
           infini (segment 16) vs titans_mac (segment 16, chunk 8), alternated rounds, medians.
floor      at the short shape, the time the fast weights' traffic alone needs: every chunk reads
           M and S and writes both (4 passes over the per-sequence fast weights), the backward
           pass at least twice that, and block remat once more: >= 16 passes per chunk, at the
           bandwidth of a large elementwise op measured in the same run; and the step's
           arithmetic (XLA's cost analysis) at the matmul peak measured in the same run.
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import provenance
from bench.common import (ROOT, alternate, load_config, op_trace, save_json, time_calls,
                          train_program)
from training import flops
from training.config import resolve

MEASURES = provenance.CORE + ('models/titans.py', 'models/lm.py', 'models/infini.py')
TINY = {'model.d_model': 128, 'model.n_layers': 2, 'model.n_heads': 2, 'model.n_kv_heads': 2,
        'train.batch_size': 4, 'model.segment_len': 64}
OPS_ROWS = {   # name -> (config, overrides)
    'titans_mac, b = 16': ('configs/titans_mac.py:tiny', {'model.titans.chunk': 16}),
    'titans_mac, b = 64 (one chunk)': ('configs/titans_mac.py:tiny', {'model.titans.chunk': 64}),
    'sliding (window 64): the layer floor': ('configs/sliding.py', {'model.window': 64}),
    'infini': ('configs/infini.py', {}),
}
SHORT = {'model.d_model': 128, 'model.n_layers': 2, 'model.n_heads': 1, 'model.n_kv_heads': 1,
         'data.seq_len': 64, 'train.batch_size': 32}
SHORT_KINDS = {'attention': ('configs/transformer.py', {}),
               'infini': ('configs/infini.py', {'model.segment_len': 16}),
               'titans_mac': ('configs/titans_mac.py:tiny',
                              {'model.segment_len': 16, 'model.titans.chunk': 8})}
PASSES = 16          # fast-weight passes per chunk: forward 4, backward >= 8, block remat 4


def config(spec, overrides):
  return resolve(load_config(spec, overrides))


def step_ops(cfg):
  one = train_program(cfg)[0]
  jax.block_until_ready(one())            # the warm-up's ops must not run into the trace
  return op_trace(one)['ops']


def ops_per_layer_segment(spec, overrides, L=256):
  """(ops at L, ops at 2L, per added layer-segment)."""
  got = [step_ops(config(spec, {**TINY, **overrides, 'data.seq_len': n})) for n in (L, 2 * L)]
  cfg = config(spec, {**TINY, **overrides})
  added = cfg.model.n_layers * L // cfg.model.segment_len
  return dict(ops=got, per_layer_segment=(got[1] - got[0]) / added)


def memory_ops(C=64, b=16):
  """XLA ops of the neural memory alone: forward + backward of one segment (reads, writes)."""
  from models import titans
  cfg = config('configs/titans_mac.py:tiny', {**TINY, 'model.titans.chunk': b})
  mem = titans.NeuralMemory(cfg.model, rngs=nnx.Rngs(0))
  graph, params = nnx.split(mem)
  x = jax.random.normal(jax.random.key(1), (TINY['train.batch_size'], C, cfg.model.d_model))

  def loss(params, x):
    m = nnx.merge(graph, params)
    reads, state = m.forward(x, m.init_state(x.shape[0]))
    return (reads ** 2).sum() + sum((w ** 2).sum() for w in jax.tree.leaves(state.w))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(params, x))
  return op_trace(lambda: grad(params, x))['ops']


def bandwidth(n=2 ** 26, rounds=5):
  """Bytes/s of a large elementwise op (read n floats, write n): the memory bandwidth."""
  f = jax.jit(lambda a: a * 1.0001)
  a = jnp.ones((n,), jnp.float32)
  return 2 * 4 * n / time_calls(lambda: f(a), 1, best_of=rounds)


def short_shape(rounds):
  """The short-shape steps head to head, and titans_mac's floor."""
  steps, cfgs = {}, {}
  for k, (spec, o) in SHORT_KINDS.items():
    cfgs[k] = config(spec, {**SHORT, **o})
    one, compiled, _ = train_program(cfgs[k])
    jax.block_until_ready(one())
    steps[k] = (one, compiled)
  times = alternate([one for one, _ in steps.values()], rounds)
  rows = {k: dict(median_s=float(np.median(t)), spread_s=[min(t), max(t)])
          for k, t in zip(steps, times)}
  cfg, compiled = cfgs['titans_mac'], steps['titans_mac'][1]
  from models import titans
  m = cfg.model
  P = m.n_heads * titans.NeuralMemory(m, rngs=nnx.Rngs(0)).fast_weight_size()
  chunks = m.n_layers * cfg.data.seq_len // m.titans.chunk
  traffic = PASSES * 4 * P * cfg.train.batch_size * chunks
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  bw, peak = bandwidth(), flops.measure_peak_flops()
  floor = dict(fast_weights=P, chunks=chunks, traffic_bytes=traffic, bandwidth=bw,
               traffic_s=traffic / bw, flops=float(cost.get('flops', 0.0)), peak=peak,
               flops_s=float(cost.get('flops', 0.0)) / peak)
  return rows, floor


def render(r):
  ops, short, floor = r['ops'], r['short'], r['floor']
  att = short['attention']['median_s']
  mac = short['titans_mac']['median_s']
  per = {k: v['per_layer_segment'] for k, v in ops.items()}
  mac16, floor_row = per['titans_mac, b = 16'], per['sliding (window 64): the layer floor']
  out = ['## Titans in few large ops', '',
         'XLA ops one train step runs, per layer and 64-token segment: the difference between '
         'the step at 512 and at 256 tokens over the 8 added layer-segments (tiny shape: d 128, '
         '2 layers, 2 heads, batch 4). A hardware-independent count: on a GPU or TPU each op is '
         'a kernel launch.', '',
         '| model | ops at 256 | ops at 512 | per layer and segment |', '|---|---|---|---|']
  for k, v in ops.items():
    out.append(f'| {k} | {v["ops"][0]:,} | {v["ops"][1]:,} | {v["per_layer_segment"]:,.0f} |')
  out += ['', f'The neural memory alone (forward + backward of one 64-token segment, b = 16): '
          f'{r["memory_ops"]:,} ops.', '',
          f'- Target: titans_mac <= 150 ops per layer and segment: **missed**, '
          f'{mac16:,.0f}. A segment of a plain transformer layer in this LM (sliding) '
          f'already runs {floor_row:,.0f}: the target is below that floor. titans_mac is '
          f'{mac16 / floor_row:.1f}x the floor; its memory is a sequential chain of chunks '
          '(4 per segment at b = 16), each a forward, a backward and the update of the fast '
          'weights; the outer gradient\'s pass through each chunk is written by hand '
          '(models/titans.py chunk_closed), not traced by autodiff.', '',
          '### The short shape', '',
          f'Train step at batch 32 x 64 tokens, width 128, 2 layers, 1 head, {r["rounds"]} '
          'alternated rounds (median; fastest-slowest):', '',
          '| model | step ms | vs attention |', '|---|---|---|']
  for k, v in short.items():
    out.append(f'| {k} | {1e3 * v["median_s"]:,.0f} ({1e3 * v["spread_s"][0]:,.0f}-'
               f'{1e3 * v["spread_s"][1]:,.0f}) | {v["median_s"] / att:.2f}x |')
  need = max(floor['traffic_s'], floor['flops_s'])
  out += ['', f'- Target: titans_mac <= 5x attention\'s step: '
          f'**{"met" if mac / att <= 5 else "missed"}**, {mac / att:.2f}x.',
          f'- The floor: titans_mac\'s fast weights are {floor["fast_weights"]:,} floats per '
          f'sequence and layer, {floor["chunks"]} chunks per step over the layers; at '
          f'{PASSES} passes per chunk over the batch\'s fast weights that is '
          f'{floor["traffic_bytes"] / 2**30:.2f} GiB, {1e3 * floor["traffic_s"]:,.0f} ms at '
          f'the {floor["bandwidth"] / 1e9:.1f} GB/s measured here; the step\'s arithmetic '
          f'({floor["flops"] / 1e9:.1f} GFLOP, XLA\'s cost analysis) needs '
          f'{1e3 * floor["flops_s"]:,.0f} ms at the measured matmul peak '
          f'({floor["peak"] / 1e9:.0f} GFLOP/s). The step takes {mac / need:.1f}x the larger '
          f'of the two; attention\'s whole step is {att / need:.2f}x of it, so at this shape '
          f'5x attention is {5 * att / need:.1f}x the floor.', '']
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--rounds', type=int, default=7)
  ap.add_argument('--out', default='titans_ops')
  ap.add_argument('--render', action='store_true', help='only rewrite the page')
  args = ap.parse_args(argv)
  prefix = os.path.join(ROOT, 'bench', 'results', args.out)
  if args.render:
    from bench.common import load_json
    results = load_json(prefix + '.json', None)
  else:
    ops = {k: ops_per_layer_segment(spec, o) for k, (spec, o) in OPS_ROWS.items()}
    short, floor = short_shape(args.rounds)
    results = dict(ops=ops, memory_ops=memory_ops(), short=short, floor=floor,
                   rounds=args.rounds, provenance=provenance.record(MEASURES, 0))
    save_json(prefix + '.json', results)
  with open(prefix + '.md', 'w') as f:
    f.write(render(results))


if __name__ == '__main__':
  main()
