"""Shared fixtures. The pytest process uses one CPU device; multi-device and
multi-process checks run train.py in subprocesses with forced host devices."""
import os
import subprocess
import sys

import tempfile

import pytest

# One persistent XLA compilation cache for this test session, shared by in-process tests
# and train.py subprocesses (the same tiny shapes compile many times otherwise).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='mnemax-jcc-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# fp32 matmuls at full precision where the suite is run on a GPU (JAX_PLATFORMS=cuda): by
# default they use TF32 there, and the backends' fp32 comparisons (tolerance 1e-5) then differ
# by ~5e-4 (seen on an H200). No effect on a CPU.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
# The suite is compile-bound (tiny shapes, many programs): with LLVM at -O0 XLA:CPU compiles
# them faster (on 2 cores the tests' summed time fell from 1362 s to 990 s, the wall time from
# 718 s to 537 s). Only rounding differs from the optimised build, which bench/ and the
# README's commands run. Subprocesses get the flag too (cpu_env).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """A seconds-scale config: {'model.d_model': 64, ...} overrides by dotted key."""
  from configs.transformer import get_config
  from training.config import key_node, resolve
  cfg = get_config('tiny')
  base = {'model.d_model': 64, 'model.n_layers': 2, 'data.seq_len': 64, 'data.eval_batches': 2,
          'train.batch_size': 8, 'train.steps': 6, 'train.warmup_steps': 2, 'train.log_every': 1,
          'train.eval_every': 3, 'train.ckpt_every': 3, 'train.peak_flops': 1e9,
          'train.async_ckpt': False}
  for key, value in {**base, **overrides}.items():
    node, name = key_node(cfg, key)
    node[name] = value
  return resolve(cfg)


def cli_overrides(cfg):
  """--config.x.y=v flags reproducing tiny_config's values (for train.py subprocesses)."""
  import ml_collections

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, ml_collections.ConfigDict):   # nested: model.rope_scaling.type=...
        yield from walk(f'{prefix}.{k}', v)
      else:
        yield f'--config.{prefix}.{k}={v}'

  return [f for section in ('model', 'data', 'train', 'mesh') for f in walk(section, cfg[section])]


def cpu_env(devices=1):
  """The environment of a subprocess on `devices` host CPU devices (and TEST_XLA_FLAGS)."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}'}


def run_train(workdir, cfg, *extra, devices=1, env=None, check=True, timeout=300):
  env = {**cpu_env(devices), **(env or {})}
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
         os.path.join(ROOT, 'configs/transformer.py') + ':tiny', f'--workdir={workdir}',
         *cli_overrides(cfg), *extra]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def losses(workdir):
  from training.metrics import read_metrics
  rows = read_metrics(workdir)
  return {s: r['loss'] for s, r in rows.items() if 'loss' in r}


@pytest.fixture
def tiny():
  return tiny_config
