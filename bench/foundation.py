"""The default run, measured: train the tiny preset on the embedded corpus, evaluate it,
and compile the paper-size preset on CPU. Writes bench/results/foundation.{md,json}.

  python -m bench.foundation

The README's commands run as a user runs them (a process each, timed whole); their results
are read from the files they write (metrics.jsonl, eval/eval_stepN.json, compile.json).
"""
import json
import os
import platform
import subprocess
import tempfile
import time

from bench import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURES = provenance.CORE + ('training/evaluation.py', 'data/sources.py',
                              'configs/transformer.py')
TRAIN = 'python train.py --config=configs/transformer.py:tiny --workdir={w}'
EVAL = 'python evaluate.py --workdir={w}'
COMPILE = ('XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py '
           '--config=configs/transformer.py:1b --workdir={w} --compile_only '
           '--config.mesh.data=1 --config.mesh.fsdp=8')


def run(cmd):
  """Seconds `cmd` took (SystemExit with its error output if it failed)."""
  t0 = time.time()
  proc = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f'{cmd} failed:\n{proc.stderr[-3000:]}')
  return time.time() - t0


def main():
  import jax
  from training.metrics import read_metrics
  work = tempfile.mkdtemp(prefix='mnemax-foundation-')
  train_s = run(TRAIN.format(w=work + '/tiny'))
  rows = read_metrics(work + '/tiny')
  last = rows[max(rows)]
  eval_s = run(EVAL.format(w=work + '/tiny'))
  with open(f'{work}/tiny/eval/eval_step{max(rows)}.json') as f:
    ev = json.load(f)
  compile_s = run(COMPILE.format(w=work + '/c'))
  with open(f'{work}/c/compile.json') as f:
    report = json.load(f)
  result = dict(machine=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
                jax=jax.__version__, seed=0, train_seconds=train_s, eval_seconds=eval_s,
                unigram_loss=rows[0]['unigram_loss'], eval_loss=last['eval_loss'],
                tokens_per_s=last['tokens_per_s'], mfu=last['mfu'], steps=max(rows),
                eval=ev, compile_1b=report, compile_seconds=compile_s,
                provenance=provenance.record(MEASURES, 0))
  os.makedirs(os.path.join(ROOT, 'bench/results'), exist_ok=True)
  with open(os.path.join(ROOT, 'bench/results/foundation.json'), 'w') as f:
    json.dump(result, f, indent=1, default=str)
  mem = report['per_device_bytes']
  md = f"""### Foundation: the default run

`python bench/foundation.py` ({result['machine']}, jax {result['jax']}, seed 0) runs:
`{TRAIN.format(w='W')}`, then `{EVAL.format(w='W')}`.

| steps | train wall time | held-out loss | unigram baseline | perplexity | tokens/s (last) | MFU (last) |
|---|---|---|---|---|---|---|
| {result['steps']} | {train_s:.0f} s | {result['eval_loss']:.3f} nats/byte | {result['unigram_loss']:.3f} nats/byte | {ev['loss']['perplexity']:.2f} | {result['tokens_per_s']:.0f} | {100 * result['mfu']:.1f}% |

Paper-size preset compiled on CPU (`{COMPILE.format(w='W')}`): {report['params'] / 1e9:.2f}B
parameters, {report['model_flops_per_step'] / 1e15:.1f} PFLOP per step, per-device buffers:
arguments {mem['arguments'] / 2**30:.2f} GiB, temporaries {mem['temp'] / 2**30:.1f} GiB
(compiled in {compile_s:.0f} s).
"""
  with open(os.path.join(ROOT, 'bench/results/foundation.md'), 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  main()
