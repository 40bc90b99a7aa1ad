"""Training speed and memory vs context length, for any configs, side by side.

  python bench/speed.py --configs=configs/transformer.py:tiny,configs/sliding.py:tiny \
      --lengths=256,512,1024,2048 --tokens_per_batch=8192

For each (config, context length): the real jitted train step (same code as train.py) on
random tokens, with the batch size set so every row processes the same tokens per step.
Reports tokens/s, ms/step, model FLOP utilisation against the matmul peak measured in the
same run, peak memory (device allocator peak on GPU/TPU; XLA's compiled buffer sizes on
CPU), and the fitted exponents of time/token and memory against length (a constant-memory
model shows ~0 for memory). Writes bench/results/speed.{md,json,png}.
"""
import json
import os

import jax
from absl import app, flags

from bench import provenance
from bench.common import at_length, load_config, measure_train, slope
from training import flops

_CONFIGS = flags.DEFINE_string('configs', 'configs/transformer.py:tiny,configs/sliding.py:tiny',
                               'Comma-separated config files with presets.')
_LENGTHS = flags.DEFINE_string('lengths', '256,512,1024,2048', 'Context lengths.')
_TOKENS = flags.DEFINE_integer('tokens_per_batch', 8192, 'Tokens per step (batch = this / length).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (after one warm-up).')
_OUT = flags.DEFINE_string('out', 'bench/results/speed', 'Output path prefix.')
_SET = flags.DEFINE_multi_string('set', [], 'Overrides for every config: section.key=value.')


def main(argv):
  del argv
  lengths = [int(x) for x in _LENGTHS.value.split(',')]
  peak = flops.measure_peak_flops()
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()}'
  rows = []
  for spec in _CONFIGS.value.split(','):
    base = load_config(spec, dict(item.split('=', 1) for item in _SET.value))
    for L in lengths:
      r = measure_train(at_length(base, L, _TOKENS.value), peak, _STEPS.value)
      r['config'] = spec
      rows.append(r)
      print(f"{spec:40s} L={L:6d} {r['tokens_per_s']:10.0f} tok/s {r['step_ms']:9.1f} ms "
            f"MFU {100 * r['mfu']:5.1f}% mem {r['memory_mib']:9.1f} MiB", flush=True)
  summary = {}
  for spec in _CONFIGS.value.split(','):
    rs = [r for r in rows if r['config'] == spec]
    xs = [r['length'] for r in rs]
    summary[spec] = dict(time_per_token_exponent=slope(xs, [1 / r['tokens_per_s'] for r in rs]),
                         memory_per_sequence_exponent=slope(xs, [r['memory_mib'] / r['batch'] for r in rs]))
  lines = [f'Training speed on {device}, jax {jax.__version__}; matmul peak {peak / 1e9:.1f} '
           f'GFLOP/s/device measured in this run; {_TOKENS.value} tokens per step.', '',
           '| config | length | batch | tokens/s | ms/step | MFU | memory (MiB) |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['config']} | {r['length']} | {r['batch']} | {r['tokens_per_s']:.0f} | "
                 f"{r['step_ms']:.1f} | {100 * r['mfu']:.1f}% | {r['memory_mib']:.1f} ({r['memory_kind']}) |")
  lines += ['', '| config | time/token ~ L^a | memory/sequence ~ L^b |', '|---|---|---|']
  for spec, s in summary.items():
    lines.append(f"| {spec} | a = {s['time_per_token_exponent']:.2f} | "
                 f"b = {s['memory_per_sequence_exponent']:.2f} |")
  table = '\n'.join(lines)
  print(table)
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(table + '\n')
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(dict(device=device, jax=jax.__version__, peak_flops=peak, rows=rows,
                   summary=summary, provenance=provenance.record(('models',) + provenance.CORE,
                                                                 0)), f, indent=1)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for spec in _CONFIGS.value.split(','):
    rs = [r for r in rows if r['config'] == spec]
    xs = [r['length'] for r in rs]
    axes[0].plot(xs, [1e6 / r['tokens_per_s'] for r in rs], 'o-', label=spec)
    axes[1].plot(xs, [r['memory_mib'] / r['batch'] for r in rs], 'o-', label=spec)
  for ax, title in zip(axes, ('time per token (us)', 'memory per sequence (MiB)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('context length')
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(_OUT.value + '.png', dpi=100)
  print(f'wrote {_OUT.value}.md/.json/.png')


if __name__ == '__main__':
  app.run(main)
