"""What train.py, evaluate.py and evolve.py share on the command line: --help that lists the
config files and their presets (exit 0), and every user error as one `error: ...` line
(exit 1) instead of a traceback, be it in the flags (an unknown --config.key, a missing
config file or preset, a value of the wrong type) or in the run (config, data source,
checkpoint, a non-finite step)."""
import importlib
import inspect
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from data.sources import SourceError
from models.registry import ConfigError
from training.checkpoint import CheckpointError

# Errors a user can fix: printed as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, SourceError, CheckpointError, FloatingPointError)
_HELP = ('-h', '-?', '--help', '--helpshort')
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def run(main):
  """absl's app.run(main) with the flag parsing and error reporting above."""
  def guarded(argv):
    try:
      return main(argv)
    except CheckpointError as e:
      # orbax's failed restores leave asyncio tasks whose errors are printed when the
      # interpreter shuts down; nothing is left to save (the checkpointer is closed): leave now
      print(f'error: {e}', file=sys.stderr)
      sys.stdout.flush(), sys.stderr.flush()
      os._exit(1)
    except USER_ERRORS as e:
      raise SystemExit(f'error: {e}') from None
  sys.unraisablehook = _quiet_failed_reads(sys.unraisablehook)
  app.run(guarded, flags_parser=_parse)


def _quiet_failed_reads(hook):
  """An unraisable-exception hook that drops the tracebacks of a failed orbax restore's
  pending array reads (their coroutines, and TensorStore's callbacks into orbax's closed
  event loop), printed by the dozen around the one line that says which checkpoint step is
  unreadable; anything else goes to `hook`."""
  def quiet(u):
    if not (getattr(u.object, '__qualname__', '') == '_read_array_index_and_device_put' or
            u.exc_type is RuntimeError and str(u.exc_value) == 'Event loop is closed'):
      hook(u)
  return quiet


def define_config(help_text, default=None):
  """The --config flag (config file[:preset], locked). With a default file, ml_collections
  already parses --config.x=y overrides here, at import: their errors are one line too."""
  try:
    return config_flags.DEFINE_config_file('config', default, help_text, lock_config=True)
  except Exception as e:   # pylint: disable=broad-except
    sys.exit(f'error: {_flag_error(e, sys.argv)}')


def config_files():
  """[(path 'configs/X.py', its docstring's first sentence, preset names)]: a file's PRESETS,
  or those of the config file it builds on (titans_mag.py: titans_mac.py's)."""
  out = []
  for name in sorted(os.listdir(_CONFIGS)):
    if not name.endswith('.py') or name in ('__init__.py', 'base.py'):
      continue
    module = importlib.import_module(f'configs.{name[:-3]}')
    presets = getattr(module, 'PRESETS', None) or next(
        (v.PRESETS for v in vars(module).values() if inspect.ismodule(v) and
         hasattr(v, 'PRESETS')), {})
    paragraph = ' '.join((module.__doc__ or '').strip().split('\n\n')[0].split())
    sentence = paragraph.split('. ')[0].rstrip('.')
    out.append((f'configs/{name}', sentence, sorted(presets)))
  return out


def usage():
  """The main module's docstring, its flags, and the config files with their presets."""
  lines = [(sys.modules['__main__'].__doc__ or '').rstrip(), '', 'flags:',
           flags.FLAGS.main_module_help(), '',
           'configs (--config=FILE[:PRESET]; every key and its default: configs/base.py;',
           'override any with --config.SECTION.KEY=VALUE):']
  for path, doc, presets in config_files():
    lines.append(f'  {path}{":" + "|".join(presets) if presets else ""}')
    lines.append(f'      {doc}')
  return '\n'.join(lines)


def _parse(argv):
  if any(a in _HELP for a in argv[1:]):
    try:
      print(usage(), flush=True)
    except BrokenPipeError:            # `--help | head`: the reader left; so do we, quietly
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
      flags.FLAGS.config.get('seed')     # a config file that failed to load raises here
  except Exception as e:   # pylint: disable=broad-except
    sys.exit(f'error: {_flag_error(e, argv)}')
  return rest


def _flag_error(e, argv):
  """One line for an error raised while parsing `argv`."""
  if isinstance(e, (AttributeError, KeyError)):      # ml_collections: an unknown override key
    unknown = _unknown_override(argv)
    if unknown:
      return unknown
  text = [line.strip() for line in str(e).splitlines() if line.strip()]
  if 'No such file or directory' in str(e):
    return f'--config: no such config file ({text[-1]})'
  if len(text) > 1 and 'Traceback' in str(e):  # a config file's own error (an unknown preset)
    return text[-1].split(': ', 1)[-1]          # ends its traceback: 'ValueError: ...'
  return ' '.join(text)


def _unknown_override(argv):
  """'--config.a.b=v: unknown key ...' for the first override whose key configs/base.py lacks."""
  from configs.base import get_base_config
  base = get_base_config()
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=')[0].split('.')
    node = base
    for i, key in enumerate(path):
      if not hasattr(node, 'keys') or key not in node:
        where = '.'.join(['config'] + path[:i])
        return (f'{arg}: {where} has no key {key!r} (every key and its default: '
                'configs/base.py)')
      node = node[key]
  return None
