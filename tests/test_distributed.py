"""Multi-device, multi-process and kill -9 behaviour, through train.py subprocesses."""
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, cli_overrides, cpu_env, losses, run_train, tiny_config
from training.checkpoint import Checkpointer

STEPS = 6


def assert_same_losses(a, b, steps, rtol):
  np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=rtol)


def test_8_devices_data_fsdp_tensor_match_1_device_and_restore_across_meshes(tmp_path):
  cfg = tiny_config(**{'train.steps': STEPS})
  run_train(tmp_path / 'one', cfg)
  mesh = ['--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2']
  run_train(tmp_path / 'eight', cfg, *mesh, devices=8)
  one, eight = losses(tmp_path / 'one'), losses(tmp_path / 'eight')
  assert_same_losses(one, eight, range(1, STEPS + 1), rtol=2e-4)
  # The 1-device checkpoint (step 6) resumes on the (1, 4, 2) mesh of 8 devices, and the
  # continued run matches the 8-device run that saved at step 3 and resumed on (2, 2, 2).
  longer = tiny_config(**{'train.steps': STEPS + 3})
  run_train(tmp_path / 'one', longer, '--config.mesh.data=1', '--config.mesh.fsdp=4',
            '--config.mesh.tensor=2', devices=8)
  run_train(tmp_path / 'eight', longer, *mesh, devices=8)
  assert_same_losses(losses(tmp_path / 'one'), losses(tmp_path / 'eight'),
                     range(STEPS + 1, STEPS + 4), rtol=2e-4)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint(tmp_path):
  cfg = tiny_config(**{'train.steps': STEPS})
  port = free_port()
  env = cpu_env(2)
  procs = [subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/transformer.py:tiny',
       f'--workdir={tmp_path / "two"}', *cli_overrides(cfg), '--config.distributed=True',
       f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'on 4 devices (2 processes)' in outs[0]
  assert Checkpointer.open(tmp_path / 'two').latest_step() == STEPS
  run_train(tmp_path / 'one', cfg)
  assert_same_losses(losses(tmp_path / 'one'), losses(tmp_path / 'two'), range(1, STEPS + 1),
                     rtol=2e-4)


def test_kill_9_then_rerun_continues_identically(tmp_path):
  cfg = tiny_config(**{'train.steps': 16, 'train.ckpt_every': 4, 'train.async_ckpt': True})
  run_train(tmp_path / 'ref', cfg)
  env = cpu_env()
  cmd = [sys.executable, 'train.py', '--config=configs/transformer.py:tiny',
         f'--workdir={tmp_path / "killed"}', *cli_overrides(cfg)]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 240
  while not (ckpt_dir / '8').exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = Checkpointer.open(tmp_path / 'killed').latest_step()
  assert killed_at is not None and killed_at < 16, killed_at
  run_train(tmp_path / 'killed', cfg)
  ref, resumed = losses(tmp_path / 'ref'), losses(tmp_path / 'killed')
  assert sorted(resumed) == list(range(1, 17))
  assert_same_losses(ref, resumed, range(1, 17), rtol=1e-6)
