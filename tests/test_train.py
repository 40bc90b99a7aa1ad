"""The training loop in-process: learns, resumes, refuses to save a non-finite state."""
import numpy as np
import pytest

from conftest import losses, tiny_config
from data import pipeline
from training.checkpoint import Checkpointer
from training.loop import train


def test_microbatches_give_the_one_pass_update():
  """train.microbatches = 4: the same loss, gradient norm and new parameters as one pass,
  with PAD targets and zero weights spread unevenly over the slices."""
  import jax
  from data.tokenizer import ByteTokenizer
  from training import mesh as meshlib
  from training.state import train_state_ctor
  from training.step import make_optimizer, make_train_step
  cfg = tiny_config()
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  tx, schedule = make_optimizer(cfg.train)
  graphdef, state, shardings = meshlib.sharded_init(train_state_ctor(cfg, tx), mesh, rules)
  batch_sh = meshlib.batch_sharding(mesh)
  B, L = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (B, L + 1)).astype(np.int32)
  tokens[1, L // 2:] = ByteTokenizer.PAD                 # a short row
  weights = (rng.random((B, L)) < 0.7).astype(np.float32)
  weights[2:4] = 0.0
  out = []
  for k in (1, 4):
    step = make_train_step(graphdef, schedule, shardings, batch_sh, microbatches=k)
    copy = jax.tree.map(lambda a: a.copy(), state)        # the step donates its input
    out.append(step(copy, jax.device_put(tokens, batch_sh), jax.device_put(weights, batch_sh)))
  (new1, m1), (new4, m4) = out
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new1), jax.tree.leaves(new4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_rerun_resumes_and_matches_uninterrupted(tmp_path):
  full = tiny_config(**{'train.steps': 6})
  train(full, tmp_path / 'full')
  part = tiny_config(**{'train.steps': 3})
  train(part, tmp_path / 'resumed')
  assert Checkpointer.open(tmp_path / 'resumed').latest_step() == 3
  train(full, tmp_path / 'resumed')                       # same workdir: resumes at 3
  a, b = losses(tmp_path / 'full'), losses(tmp_path / 'resumed')
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(4, 7)], [a[s] for s in range(4, 7)], rtol=1e-6)


def test_non_finite_loss_stops_without_saving(tmp_path):
  train(tiny_config(**{'train.steps': 3}), tmp_path)
  bad = tiny_config(**{'train.steps': 9, 'train.lr': 1e30, 'train.warmup_steps': 0})
  with pytest.raises(FloatingPointError, match='not finite.*no checkpoint was written after step'):
    train(bad, tmp_path)
  ckpt = Checkpointer.open(tmp_path)
  latest = ckpt.latest_step()
  assert latest >= 3
  # Whatever was saved holds finite weights only.
  import jax
  from training.run import load_run
  state = load_run(tmp_path).state
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_trains_from_an_offline_tfds_dataset(tmp_path):
  from data.tfds_writer import write_text_dataset
  docs = [f'def f{i}(x):\n    return x * {i}  # line {i}\n' * 20 for i in range(40)]
  write_text_dataset('mnemax_tiny_text', str(tmp_path / 'tfds'), {'train': docs, 'eval': docs[:4]})
  cfg = tiny_config(**{'data.source': 'tfds:mnemax_tiny_text',
                       'data.tfds_data_dir': str(tmp_path / 'tfds'), 'train.steps': 3})
  metrics = train(cfg, tmp_path / 'run')
  assert np.isfinite(metrics['eval_loss'])


def test_init_from_copies_matching_parameters_into_another_mixer(tmp_path):
  import jax
  from training import mesh as meshlib
  from training.init_from import init_model_from, load_source
  train(tiny_config(**{'train.steps': 3}), tmp_path / 'src')
  cfg = tiny_config(**{'train.init_from': str(tmp_path / 'src'), 'model.mixer': 'sliding',
                       'model.window': 16})
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  from training.state import model_ctor
  _, fresh, _ = meshlib.sharded_init(model_ctor(cfg), mesh, rules)
  loaded = init_model_from(cfg, mesh, fresh)
  source = load_source(cfg, mesh)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(source)):
    np.testing.assert_array_equal(a, b)
  metrics = train(cfg, tmp_path / 'dst')                        # and trains on from there
  assert np.isfinite(metrics['loss'])


def test_run_directories_of_the_old_layout_restore_and_resume(tmp_path):
  """Checkpoints written before the TrainState (items model / opt / data, not state / data)
  still resume training and load for evaluation; a run without a model says so."""
  import grain
  import jax
  import orbax.checkpoint as ocp
  from training import mesh as meshlib
  from training.checkpoint import CheckpointError
  from training.run import load_run
  from training.state import train_state_ctor
  from training.step import make_optimizer
  cfg = tiny_config(**{'train.steps': 3})
  train(cfg, tmp_path / 'new')
  tx, _ = make_optimizer(cfg.train)
  _, state, shardings = meshlib.sharded_init(train_state_ctor(cfg, tx), meshlib.make_mesh(cfg),
                                             meshlib.axis_rules(cfg))
  new = Checkpointer.open(tmp_path / 'new')
  abs_state = meshlib.abstract(state, shardings)
  d = cfg.data
  it = pipeline.make_train_iterator(d.source, 'train', d.seq_len, cfg.train.batch_size, cfg.seed,
                                    0, 1, None, tokenizer=d.tokenizer)
  _, r = new.restore(3, state=abs_state, data=it, config=None)
  old = Checkpointer.for_workdir(tmp_path / 'old', async_save=False)
  old.mngr.save(3, args=ocp.args.Composite(     # as 73911e8 wrote it: no TrainState, no checksums
      model=ocp.args.StandardSave(r.state['model']), opt=ocp.args.StandardSave(r.state['opt']),
      data=grain.checkpoint.CheckpointSave(it), config=ocp.args.JsonSave(r.config)))
  old.close()
  assert Checkpointer.open(tmp_path / 'old').items(3) == {'model', 'opt', 'data', 'config'}
  for a, b in zip(jax.tree.leaves(load_run(tmp_path / 'old').state),
                  jax.tree.leaves(load_run(tmp_path / 'new').state)):
    np.testing.assert_array_equal(a, b)
  full = tiny_config(**{'train.steps': 6})
  train(full, tmp_path / 'old')                                  # resumes at 3
  train(full, tmp_path / 'new')
  a, b = losses(tmp_path / 'new'), losses(tmp_path / 'old')
  np.testing.assert_allclose([b[s] for s in range(4, 7)], [a[s] for s in range(4, 7)], rtol=1e-6)
  evo = Checkpointer.for_workdir(tmp_path / 'evo', async_save=False)   # an evolve.py-like run
  evo.save(1, state={'x': np.ones(2)}, config={})
  evo.close()
  with pytest.raises(CheckpointError, match="item 'state' of step 1 .* has no model"):
    load_run(tmp_path / 'evo')


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')   # 1e39 in float32: meant
def test_an_update_that_overflows_the_state_is_never_saved(tmp_path):
  """lr = 1e39 is finite in the config but inf in float32: step 1's loss and gradient are
  finite, its updated parameters are not. The step is discarded and nothing is saved; an
  infinite lr is refused by validation, naming the key."""
  from training.config import ConfigError, validate
  with pytest.raises(ConfigError, match=r'config.train.lr: must be finite, got inf'):
    validate(tiny_config(**{'train.lr': float('inf')}), 1)
  cfg = tiny_config(**{'train.steps': 3, 'train.lr': 1e39, 'train.warmup_steps': 0,
                       'train.ckpt_every': 1, 'train.log_every': 3})
  with pytest.raises(FloatingPointError, match=r'step 1: the updated parameters or optimizer '
                                               r'state .* is not finite'):
    train(cfg, tmp_path)
  assert Checkpointer.for_workdir(tmp_path).latest_step() is None


def test_a_resumed_run_has_one_metrics_row_per_step(tmp_path):
  """Killed after logging steps 4..6 but saving only step 3: the rerun drops those rows and
  logs them again, once."""
  import json
  import shutil
  cfg = tiny_config(**{'train.steps': 6})
  train(cfg, tmp_path)
  shutil.rmtree(tmp_path / 'checkpoints' / '6')                  # as if killed before saving 6
  train(cfg, tmp_path)
  steps = [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')]
  assert steps == [0, 1, 2, 3, 4, 5, 6]
  train(cfg, tmp_path / 'fresh')
  shutil.rmtree(tmp_path / 'fresh' / 'checkpoints')             # nothing saved: a fresh start
  train(cfg, tmp_path / 'fresh')
  assert [json.loads(l)['step'] for l in open(tmp_path / 'fresh' / 'metrics.jsonl')] == steps


def stop_mid_run(workdir, cfg, sig, after=5):
  """Starts train.py, sends `sig` once step `after` is logged; (returncode, stderr)."""
  import json
  import subprocess
  import sys
  import time
  from conftest import ROOT, cli_overrides, cpu_env
  cmd = [sys.executable, 'train.py', '--config=configs/transformer.py:tiny',
         f'--workdir={workdir}', *cli_overrides(cfg)]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics, deadline = workdir / 'metrics.jsonl', time.time() + 240
  while proc.poll() is None and time.time() < deadline and not (
      metrics.exists() and any(json.loads(l)['step'] >= after for l in open(metrics))):
    time.sleep(0.05)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  return proc.returncode, stderr


def test_a_preempted_run_saves_where_it_stopped_and_resumes_identically(tmp_path):
  """SIGTERM (a cluster's preemption) mid-run: train.py finishes the step, saves it (between
  the periodic saves), exits 0 without a traceback, and the rerun continues as if never
  stopped. SIGINT (Ctrl-C) takes the same path."""
  import signal
  from conftest import run_train
  cfg = tiny_config(**{'train.steps': 40, 'train.ckpt_every': 30, 'train.eval_every': 40,
                       'train.log_every': 1})
  for sig, workdir in ((signal.SIGINT, tmp_path / 'interrupted'),
                       (signal.SIGTERM, tmp_path / 'stopped')):
    rc, stderr = stop_mid_run(workdir, cfg, sig)
    assert rc == 0 and 'Traceback' not in stderr, stderr[-2000:]
    saved = Checkpointer.open(workdir).latest_step()
    assert 5 <= saved < 30 and f'{sig.name}: stopped at step {saved}' in stderr
  run_train(tmp_path / 'stopped', cfg)
  run_train(tmp_path / 'ref', cfg)
  a, b = losses(tmp_path / 'ref'), losses(tmp_path / 'stopped')
  assert sorted(b) == list(range(1, 41))
  np.testing.assert_allclose([b[s] for s in range(1, 41)], [a[s] for s in range(1, 41)],
                             rtol=1e-6)


def test_a_failed_command_leaves_the_run_as_it_was(tmp_path):
  """config.json is written only once the data, the config and any restore are good; resuming
  with another architecture names the keys that differ (train.py: one error line)."""
  from conftest import run_train
  from training.config import ConfigError
  cfg = tiny_config(**{'train.steps': 3})
  train(cfg, tmp_path)
  saved = (tmp_path / 'config.json').read_bytes()
  with pytest.raises(ValueError, match='matched no files'):
    train(tiny_config(**{'train.steps': 6, 'data.source': f'glob:{tmp_path}/*.none'}), tmp_path)
  with pytest.raises(ConfigError, match=r'config.model.d_model: 32 does not match the checkpoint '
                                        r'\(64\) \(nor do model.head_dim, model.mlp_dim\).*'
                                        r'train.init_from='):
    train(tiny_config(**{'train.steps': 6, 'model.d_model': 32}), tmp_path)
  proc = run_train(tmp_path, tiny_config(**{'train.steps': 6, 'model.d_model': 32}), check=False)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('error: config.model.d_model')
  assert (tmp_path / 'config.json').read_bytes() == saved
  assert Checkpointer.open(tmp_path).latest_step() == 3


def test_compile_only_reports_the_step_without_allocating_it(tmp_path):
  """--compile_only: the step compiled from abstract shapes; its report (parameters, FLOPs,
  per-device bytes) is returned and written to WORKDIR/compile.json."""
  import json
  from training.loop import compile_only
  cfg = tiny_config()
  report = compile_only(cfg, str(tmp_path))
  assert json.loads((tmp_path / 'compile.json').read_text()) == json.loads(json.dumps(report))
  d, v, L, f = cfg.model.d_model, cfg.model.vocab_size, cfg.model.n_layers, cfg.model.mlp_dim
  kv = cfg.model.n_kv_heads * cfg.model.head_dim
  per_layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d          # q, o, k, v, SwiGLU, 2 norms
  vocab = -(-v // 128) * 128                                       # padded to a multiple of 128
  assert report['params'] == vocab * d + L * per_layer + d         # tied embedding, final norm
  assert report['model_flops_per_step'] > 6 * report['params'] * cfg.train.batch_size
  assert report['per_device_bytes']['arguments'] > 4 * report['params']


def test_compile_decode_reports_namm_decoding_at_a_ratio(tmp_path):
  """--compile_decode: evaluate.py's decoding (prefill in pieces under the policy, then steps)
  compiled from abstract parameters; the cache holds the ratio's kept tokens plus one piece
  and the new tokens, so it needs fewer bytes than a cache for every token."""
  import json
  from training.loop import decode_compile_only
  over = {'decode.policy': 'namm', 'decode.prefill_chunk': 32, 'decode.max_new_tokens': 4,
          'data.seq_len': 128, 'train.batch_size': 2}
  full = decode_compile_only(tiny_config(**over))          # NAMM's threshold: every slot
  report = decode_compile_only(tiny_config(**over, **{'decode.compression_ratio': 0.75}),
                               str(tmp_path))
  assert json.loads((tmp_path / 'compile.json').read_text()) == json.loads(json.dumps(report))
  assert (report['program'], report['prompt'], report['policy']) == ('decode', 128, 'namm')
  assert (full['capacity'], report['capacity']) == (128 + 4, 32 + 32 + 4)
  assert report['per_device_bytes']['temp'] < full['per_device_bytes']['temp']


def test_compile_only_counts_an_untied_embedding_once():
  """An untied input table is a lookup (free) and the head a matmul: the abstract model's
  FLOPs count the head only (the abstract table once crashed --compile_only)."""
  from flax import nnx
  from training import flops
  from training.state import model_ctor
  tied, untied = (tiny_config(**{'model.tie_embeddings': t}) for t in (True, False))
  f_tied, f_untied = (flops.train_flops_per_token(nnx.eval_shape(model_ctor(c)), 64)
                      for c in (tied, untied))
  assert f_untied == f_tied          # one table for the head either way; the lookup is free
