"""The command line: every user error is one `error:` line naming the problem (no
traceback, nothing written), and --help lists the config files and their presets."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env

TINY = os.path.join(ROOT, 'configs', 'transformer.py') + ':tiny'


def _run(script, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                        env=cpu_env(), capture_output=True, text=True, timeout=300)


def _binary_glob(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'a.txt').write_text('some text\n' * 100)
  (tmp_path / 'corpus' / 'b.bin').write_bytes(bytes(range(256)) * 8)
  return f'--config.data.source=glob:{tmp_path}/corpus/*'


@pytest.mark.parametrize('script,args,message', [
    ('train.py', ['--config.train.bogus=1'],
     "--config.train.bogus=1: config.train has no key 'bogus' (every key and its default: "
     "configs/base.py)"),
    ('train.py', ['--config=configs/nosuch.py'], '--config: no such config file'),
    ('train.py', ['--config=configs/transformer.py:huge'],
     "--config preset 'huge' unknown; one of ['1b', 'small', 'tiny']"),
    ('train.py', ['--config.train.lr=fast'], "--config.train.lr=fast: could not convert"),
    ('train.py', ['--config.model.n_heads=3'], 'config.model.n_heads: n_heads=3 does not divide'),
    ('train.py', ['--config.data.source=glob:/no/such/dir/*.txt'],
     "data.source: glob '/no/such/dir/*.txt' matched no files"),
    ('train.py', [_binary_glob], 'b.bin is not a text file (it has NUL bytes)'),
    ('evaluate.py', ['--workdir={tmp}/none'], 'no checkpoint directory at {tmp}/none'),
    ('evaluate.py', ['--workdir={tmp}/none', '--config.decode.polic=x'],
     "config.decode has no key 'polic'"),
    ('evolve.py', ['--config=configs/namm.py:tiny', '--config.evolve.base={tmp}/none'],
     'no checkpoint directory at {tmp}/none'),
])
def test_user_errors_are_one_line(tmp_path, script, args, message):
  args = [a(tmp_path) if callable(a) else a.format(tmp=tmp_path) for a in args]
  if script == 'train.py':
    args = [f'--workdir={tmp_path}/run', f'--config={TINY}', *args]
  elif script == 'evolve.py':
    args = [f'--workdir={tmp_path}/run', *args]
  out = _run(script, *args)
  assert out.returncode == 1, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message.format(tmp=tmp_path) in last, last
  assert not os.path.exists(tmp_path / 'run')


def test_help_lists_configs_and_presets():
  out = _run('train.py', '--help')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'python train.py --config=configs/transformer.py:tiny' in out.stdout   # the docstring
  assert '--workdir: Run directory' in out.stdout
  assert 'every key and its default: configs/base.py' in out.stdout
  assert 'configs/transformer.py:1b|small|tiny' in out.stdout
  assert 'configs/titans_mag.py:340m|760m|small|tiny' in out.stdout      # titans_mac.py's presets


def test_a_damaged_checkpoint_is_one_error_line(tmp_path):
  """Every step unreadable: train.py and evaluate.py say which, in one line (the failed
  restore's pending TensorStore reads print nothing after it)."""
  from conftest import cli_overrides, tiny_config
  from training.loop import train
  cfg = tiny_config(**{'train.steps': 3})
  train(cfg, tmp_path / 'run')
  for f in (tmp_path / 'run' / 'checkpoints').glob('3/state/ocdbt.process_*/d/*'):
    data = bytearray(f.read_bytes())
    for i in range(128, len(data), 256):
      data[i] ^= 0x10
    f.write_bytes(bytes(data))
  for out in (_run('evaluate.py', f'--workdir={tmp_path}/run'),
              _run('train.py', f'--config={TINY}', f'--workdir={tmp_path}/run',
                   *cli_overrides(cfg))):
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: checkpoint step 3 in {tmp_path}/run/checkpoints is '
                           'unreadable'), last
