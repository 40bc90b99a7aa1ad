"""Evaluate a checkpoint: held-out loss and perplexity, loss by position, synthetic-task
accuracy (passkey / S-NIAH / MQAR over length x depth), decode KV-cache size.

  python evaluate.py --workdir=/tmp/tiny
  python evaluate.py --workdir=W --step=200 --config.decode.policy=recency --config.decode.window=64
  python evaluate.py --workdir=W --config=configs/transformer.py:tiny --config.eval.lengths='(256,512)'
  python evaluate.py --workdir=W --sample="def fib(n):"
  python evaluate.py --workdir=W --source='glob:my_corpus/**/*.txt'   # a whole corpus held out

Config: the one saved with the checkpoint (mesh reset to data=-1, i.e. all devices here);
--config=file.py:preset replaces it entirely; --config.x=y overrides either. Model keys that
fix parameter shapes must match the checkpoint. Writes OUTPUT/eval_step{N}.json and
OUTPUT/tasks_step{N}.png (OUTPUT: --output, default WORKDIR/eval) and prints a table.
"""
import os

from absl import flags, logging
from ml_collections import config_flags

from training import cli

# Without --config, this file only types the --config.x=y overrides; they are applied to
# the checkpoint's saved config (every config shares the keys of configs/base.py).
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'base.py')
_CONFIG = cli.define_config(
    'Config file[:preset] replacing the checkpoint\'s saved config (default: the saved '
    'config; --config.x=y overrides apply either way).', _DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (or its checkpoints/ folder).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory (default: WORKDIR/eval).')
_SAMPLE = flags.DEFINE_string('sample', None, 'Also print a continuation of this prompt.')
_SOURCE = flags.DEFINE_string(
    'source', None, 'Score the loss on every window of this data source, all of its files '
    '(e.g. glob:book.txt, a single file), instead of the run\'s held-out split.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  from training.evaluation import format_report, run
  from training.metrics import quiet_libraries
  quiet_libraries()
  given = flags.FLAGS['config'].present
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  if _SOURCE.value:
    overrides.update({'data.source': _SOURCE.value, 'eval.split': 'all', 'data.eval_batches': 0})
  report = run(_WORKDIR.value, step=_STEP.value, config=_CONFIG.value if given else None,
               overrides=overrides, output=_OUTPUT.value, sample=_SAMPLE.value)
  print(format_report(report))
  print('wrote ' + ', '.join(report[k] for k in ('json', 'png', 'ruler_png') if k in report))


if __name__ == '__main__':
  logging.set_verbosity(logging.ERROR)   # orbax warns about read-only mode
  cli.run(main)
