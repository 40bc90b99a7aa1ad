"""Evolve a NAMM eviction network for a frozen base LM (a train.py run) with evosax.

  python evolve.py --config=configs/namm.py:tiny --workdir=runs/namm --config.evolve.base=runs/base
  python evolve.py --config=configs/namm.py:tiny --workdir=W --config.evolve.strategy=sep_cma_es

Generation 0 runs the keep-all policy (full-cache reference scores; normalisation statistics
then frozen); each later generation evaluates the population (vmapped, sharded over a 'pop'
mesh axis of all devices) on sampled prompts of the current curriculum stage and tells the
strategy -fitness. Writes WORKDIR/{config.json, checkpoints/, metrics.jsonl, tb/, evolve.png};
re-running the same command resumes. Use the result with
  python evaluate.py --workdir=BASE --config.decode.policy=namm --config.decode.namm_run=WORKDIR
      --config.decode.prefill_chunk=<namm.update_interval>
"""
from absl import flags, logging

from models import registry
from training import cli
from training.config import ConfigError, resolve, validate

_CONFIG = cli.define_config('Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Evolution run directory.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  import jax
  cfg = resolve(_CONFIG.value)
  validate(cfg, jax.device_count(), check_mesh=False)
  registry.policy('namm').validate(cfg)          # the evolved policy's keys
  if not cfg.evolve.base:
    raise ConfigError('config.evolve.base: set it to the train.py workdir of the base LM')
  from training.evolve import evolve
  from training.metrics import quiet_libraries
  quiet_libraries()
  evolve(cfg, _WORKDIR.value)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  cli.run(main)
