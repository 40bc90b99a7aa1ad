"""Train (or resume) a mnemax model.

  python train.py --config=configs/transformer.py:tiny --workdir=/tmp/tiny
  python train.py --config=configs/transformer.py:tiny --workdir=W --config.train.steps=500

Re-running the same command resumes from the latest complete checkpoint in WORKDIR.
Multi-host / multi-process: --config.distributed=True (jax.distributed.initialize reads
the coordinator from the environment, or pass --coordinator/--num_processes/--process_id).
"""
from absl import flags, logging

from training import cli
from training.config import resolve, validate

_CONFIG = cli.define_config('Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, TensorBoard).')
_COORD = flags.DEFINE_string('coordinator', None, 'host:port of process 0 (with distributed).')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Number of processes (with distributed).')
_PID = flags.DEFINE_integer('process_id', None, 'This process (with distributed).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Lower + compile the train step with abstract shapes, print its '
    'parameter count, FLOPs and per-device memory (also to WORKDIR/compile.json), and exit '
    '(paper-size configs on CPU).')
_COMPILE_DECODE = flags.DEFINE_bool(
    'compile_decode', False, 'Like --compile_only, for decoding as evaluate.py runs it: a '
    'data.seq_len-token prompt read in decode.prefill_chunk pieces under decode.policy, then '
    'decode.max_new_tokens steps, batch train.batch_size (training/loop.py decode_compile_only).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  import jax
  cfg = resolve(_CONFIG.value)
  validate(cfg, 0, check_mesh=False)               # all but the mesh, before jax starts
  if cfg.distributed:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')   # CPU-only processes
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value,
                               initialization_timeout=300)
  validate(cfg, jax.device_count())
  from training.loop import compile_only, decode_compile_only, train
  from training.metrics import quiet_libraries
  quiet_libraries()
  if _COMPILE_ONLY.value:
    compile_only(cfg, _WORKDIR.value)
  elif _COMPILE_DECODE.value:
    decode_compile_only(cfg, _WORKDIR.value)
  else:
    train(cfg, _WORKDIR.value)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  cli.run(main)
