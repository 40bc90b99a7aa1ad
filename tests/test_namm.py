"""NAMM (models/namm.py) and its evolution loop (training/evolve.py, evolve.py)."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, cpu_env, tiny_config
from models import decode, eviction, namm
from models.attention import KVCache, write
from models.lm import LM


# --- NumPy reference of the official feature semantics ------------------------------------

def np_hann(n):
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)          # torch periodic Hann


def np_features(updates, n_fft=32, hop=16, gamma=0.99):
  """updates: list of (A [n queries, N keys] attention, key offsets [N] from the update's
  first query). Per key: left-pad with that key's previous last `hop` rows, frame
  x[hop t: hop t + n_fft] (torch.stft center=False), |rfft(hann * frame)|, masked EMA."""
  N = updates[0][0].shape[1]
  E = np.zeros((N, n_fft // 2 + 1))
  prev = np.zeros((N, hop))
  for A, offset in updates:
    n = A.shape[0]
    T = n // hop
    g = gamma ** hop
    new_E = np.zeros_like(E)
    for i in range(N):
      x = np.concatenate([prev[i], A[:, i]])
      acc = gamma ** n * E[i]
      for t in range(T):
        mag = np.abs(np.fft.rfft(np_hann(n_fft) * x[hop * t: hop * t + n_fft]))
        if offset[i] < 0 or offset[i] < hop * (t + 1):
          acc = acc + (1 - g) * g ** (T - 1 - t) * mag
      new_E[i] = acc
    E, prev = new_E, A[-hop:].T
  return E


def test_stft_ema_features_match_numpy_reference():
  n, S = 32, 64
  pol = namm.NAMM.make(update_interval=n)
  cache = pol.init(KVCache.empty(1, 2, S, 4))
  rng = np.random.default_rng(0)
  updates = {0: [], 1: []}
  for chunk in range(2):
    pos = np.arange(chunk * n, (chunk + 1) * n)
    k = jnp.asarray(rng.normal(size=(1, 2, n, 4)), jnp.float32)
    cache, _ = write(cache, k, k, jnp.asarray(pos)[None])
    probs_BxKxTxS = rng.random((1, 2, n, S)).astype(np.float32)
    probs_BxKxTxS *= np.asarray(cache.valid_BxKxS)[:, :, None]
    _, cache = pol.keep(cache, jnp.asarray(probs_BxKxTxS), jnp.asarray(pos)[None])
    slot_pos = np.asarray(cache.pos_BxKxS[0])
    for h in range(2):
      updates[h].append((probs_BxKxTxS[0, h], slot_pos[h] - chunk * n))
  assert int(cache.size_BxK().min()) == 2 * n                # zero params keep everything
  for h in range(2):
    valid = np.asarray(cache.valid_BxKxS[0, h])
    ref = np_features(updates[h])
    got = np.asarray(cache.token_state['ema'][0, h])
    np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-4, atol=1e-6)


def test_recency_features_and_param_count():
  assert namm.n_params() == 4172                              # the official BAM size
  r = np.asarray(namm.recency_features(jnp.array([0, 7]), 8, 50000.0))
  f = 50000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(r[1], np.concatenate([np.sin(7 * f), np.cos(7 * f)]), rtol=1e-5)
  np.testing.assert_allclose(r[0], [0, 0, 0, 0, 1, 1, 1, 1])


def test_bam_backward_mask_direction():
  N, Z = 6, 25
  rng = np.random.default_rng(1)
  p = namm.unflatten(jnp.asarray(0.05 * rng.normal(size=namm.n_params()), jnp.float32))
  pos, valid = jnp.array([3, 0, 5, 1, 4, 2]), jnp.ones(N, bool)
  z = jnp.asarray(rng.normal(size=(N, Z)), jnp.float32)
  base = namm.bam_scores(z, pos, valid, p)
  oldest, newest = int(jnp.argmin(pos)), int(jnp.argmax(pos))
  # The oldest token is seen by no other token; the newest by every token.
  moved = namm.bam_scores(z.at[oldest].add(1.0), pos, valid, p)
  others = np.arange(N) != oldest
  np.testing.assert_allclose(moved[others], base[others], rtol=1e-6)
  assert abs(float(moved[oldest] - base[oldest])) > 1e-3
  moved = namm.bam_scores(z.at[newest].add(1.0), pos, valid, p)
  assert (np.abs(np.asarray(moved - base)) > 1e-6).all()


def test_bam_blockwise_equals_dense():
  """The policy's blockwise BAM (sorted by position, key blocks b >= a only, online softmax)
  == the dense [N, N] form, with shuffled positions, empty slots and a ragged last block."""
  N, rng = 37, np.random.default_rng(3)
  p = namm.unflatten(jnp.asarray(0.3 * rng.normal(size=namm.n_params()), jnp.float32))
  z = jnp.asarray(rng.normal(size=(N, 25)), jnp.float32)
  pos, valid = jnp.asarray(rng.permutation(N)), jnp.asarray(rng.random(N) > 0.3)
  dense = namm.bam_scores(z, pos, valid, p)
  for block in (1, 8, 16):
    np.testing.assert_allclose(namm.bam_scores(z, pos, valid, p, block=block), dense,
                               rtol=1e-5, atol=1e-5)
    # skipping the key blocks past the valid tokens (one or more blocks of empty slots)
    skipped = jax.jit(namm.bam_scores, static_argnums=(4, 5))(z, pos, valid, p, 32, block,
                                                              valid.sum())
    np.testing.assert_allclose(skipped, dense, rtol=1e-5, atol=1e-5)


def test_compacted_update_equals_all_slots():
  """An update on the valid slots gathered into a smaller bucket (buckets > 1) keeps the same
  tokens, with the same EMA on them and the same statistics, as one over every slot; each
  bucket size is taken (few valid slots, about half, all)."""
  rng = np.random.default_rng(5)
  B, K, S, n = 2, 2, 64, 32
  full, compact = namm.NAMM.make(update_interval=n, block=16, buckets=1), namm.NAMM.make(
      update_interval=n, block=16, buckets=3)
  theta = jnp.asarray(0.1 * rng.normal(size=full.n_params), jnp.float32)
  full, compact = full.replace(theta=theta), compact.replace(theta=theta)
  for frac in (0.1, 0.4, 1.0):
    valid = jnp.asarray(rng.random((B, K, S)) < frac).at[:, :, -1].set(True)
    pos = jnp.asarray(np.stack([[rng.permutation(S) for _ in range(K)] for _ in range(B)]))
    cache = full.init(KVCache.empty(B, K, S, 4).replace(pos_BxKxS=pos, valid_BxKxS=valid))
    cache = cache.replace(token_state=dict(
        ema=jnp.asarray(rng.random((B, K, S, full.n_feat)), jnp.float32),
        rows=jnp.asarray(rng.random((B, K, S, full.hop + n)) / S, jnp.float32)))
    newest = jnp.where(valid, pos, -1).max((1, 2))
    (k1, e1, s1), (k2, e2, s2) = (jax.jit(p._update)(cache, newest) for p in (full, compact))
    np.testing.assert_array_equal(k2, k1)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(e2)[v], np.asarray(e1)[v], rtol=1e-6)
    np.testing.assert_allclose(s2, s1, rtol=1e-5)
    M = {0.1: 16, 0.4: 32, 1.0: 64}[frac]              # the bucket this update takes
    assert int(valid.sum(-1).max()) <= M and (M == 16 or int(valid.sum(-1).max()) > M // 2)


def test_budget_rule_fast_path_equals_sorted_rule():
  """H2O / L2 keep rule: the sort-free path (at most one token per head over budget) keeps
  the same tokens as ranking all of them, ties included."""
  rng, hits = np.random.default_rng(4), 0
  for _ in range(200):
    B, K, S = 2, 3, 12
    valid = jnp.asarray(rng.random((B, K, S)) < rng.random())
    pos = jnp.asarray(np.stack([[rng.permutation(S) for _ in range(K)] for _ in range(B)]))
    score = jnp.asarray(rng.integers(0, 4, (B, K, S)).astype(np.float32))     # many ties
    newest = jnp.where(valid, pos, -1).max((1, 2))
    recent = int(rng.integers(0, 4))
    budget = int(rng.integers(recent, S))
    recent_m = valid & (pos > newest[:, None, None] - recent)
    s = jnp.where(valid & ~recent_m, score, -namm.INF)
    rank = np.argsort(np.argsort(-np.asarray(s), -1, kind='stable'), -1, kind='stable')
    n_other = np.maximum(budget - np.asarray(recent_m).sum(-1, keepdims=True), 0)
    want = np.asarray(recent_m) | ((rank < n_other) & np.asarray(valid & ~recent_m))
    got = eviction.top_budget(score, valid, pos, newest, budget, recent)
    np.testing.assert_array_equal(got, want)
    hits += int((np.asarray(valid & ~recent_m).sum(-1) - n_other[..., 0]).max() == 1)
  assert hits > 10                                  # the fast path was taken with one to drop


def test_keep_rule_max_over_heads_own_topk_newest_kept():
  pos = jnp.broadcast_to(jnp.arange(6), (1, 2, 6))
  valid = jnp.ones((1, 2, 6), bool).at[0, 0, 3].set(False)
  score = jnp.array([[[1.0, -1.0, 2.0, 9.0, 0.5, -2.0],          # slot 3 invalid: ignored
                      [-1.0, -3.0, -0.5, -4.0, -2.0, -5.0]]])    # newest (slot 5) forced in
  keep = np.asarray(namm.keep_rule(score, valid, pos))[0]
  # head 0: 3 tokens with score >= 0 (+ the newest) -> k=4; head 1: only the newest -> k=1.
  # K = 4: head 0 keeps {2, 0, 4, 5}, head 1 its own top 4: {5, 2, 0, 4}.
  assert keep[0].tolist() == [True, False, True, False, True, True]
  assert keep[1].tolist() == [True, False, True, False, True, True]
  keep = np.asarray(namm.keep_rule(-jnp.ones((1, 2, 6)), jnp.ones((1, 2, 6), bool), pos))[0]
  assert keep.sum(-1).tolist() == [1, 1] and keep[:, 5].all()   # all negative: newest only


def small_model():
  cfg = tiny_config()
  return LM(cfg.model, rngs=nnx.Rngs(0))


def test_zero_params_give_the_full_cache_logits_and_positive_params_evict():
  model = small_model()
  tok = jax.random.randint(jax.random.key(1), (2, 96), 0, 256)
  pol = namm.NAMM.make(update_interval=32)

  @functools.partial(jax.jit, static_argnames='policy_is_namm')
  def run(theta, policy_is_namm=True):
    p = pol.replace(theta=theta) if policy_is_namm else eviction.KeepAll()
    st = decode.init_state(model, 2, 97, p)
    logits, st = decode.prefill(model, tok, st, p, 32)
    return logits, [s.size_BxK() for s in st]

  full = nnx.jit(lambda m, t: m(t)[0][:, -1])(model, tok)
  zero, sizes = run(jnp.zeros(pol.n_params))
  keep_all, _ = run(None, policy_is_namm=False)
  # Same cache contents as keep-all (only XLA fusion rounding differs between programs).
  assert float(jnp.abs(zero - keep_all).max()) < 2e-6
  assert float(jnp.abs(zero - full).max()) < 1e-5
  assert all(int(s.min()) == 96 for s in sizes)
  # A negative final bias scores every token < 0: only the newest survives each update.
  theta = jnp.zeros(pol.n_params).at[-1].set(-1.0)
  _, sizes = run(theta)
  assert all(int(s.max()) < 96 for s in sizes)


def test_baselines_respect_budget_and_recent_window():
  B, K, S = 1, 2, 12
  cache = KVCache.empty(B, K, S, 4)
  k = jnp.asarray(np.random.default_rng(2).normal(size=(B, K, 10, 4)), jnp.float32)
  cache, _ = write(cache, k, k, jnp.arange(10)[None])
  probs = jnp.zeros((B, K, 1, S)).at[..., 2].set(1.0)               # slot of position 2
  h2o = namm.H2O(budget=4, recent=2)
  keep, _ = h2o.keep(h2o.init(cache), probs, jnp.array([[9]]))
  kept_pos = np.sort(np.asarray(cache.pos_BxKxS)[keep])
  assert keep.sum(-1).max() == 4 and {2, 8, 9} <= set(kept_pos.tolist())
  l2 = namm.L2Norm(budget=3, recent=1)
  keep = np.asarray(l2.keep(cache, probs, jnp.array([[9]]))[0])[0, 0]
  norms = np.linalg.norm(np.asarray(cache.k_BxKxSxH)[0, 0], axis=-1)
  pos = np.asarray(cache.pos_BxKxS)[0, 0]
  others = [s for s in np.argsort(norms) if pos[s] >= 0 and pos[s] != 9][:2]
  assert sorted(np.flatnonzero(keep).tolist()) == sorted(others + [int(np.argmax(pos))])
  from training.policy import make_policy
  cfg = tiny_config()
  for name in ('h2o', 'l2', 'namm'):
    cfg.decode.policy = name
    policy = make_policy(cfg)                                   # a pytree: a jit argument
    assert jax.tree.structure(jax.jit(lambda p: p)(policy)) == jax.tree.structure(policy)


# --- Evolution ----------------------------------------------------------------------------

def evolve_config(base, **evolve):
  from configs.namm import get_config
  from training.config import resolve, validate
  cfg = get_config('tiny')
  cfg.namm.update_interval = 32
  # sep_cma_es: CMA-ES's full 4172^2 eigendecomposition per generation is slow on 2 cores.
  cfg.evolve.update({**dict(base=str(base), population=8, strategy='sep_cma_es',
                            stages=('passkey', 'passkey,corpus'),
                            generations=(2, 1), length=96, prompts=2, pool=2, eval_prompts=2,
                            eval_every=1, ckpt_every=1, keep_ckpts=10, cache_weight=0.1),
                     **evolve})
  cfg = resolve(cfg)
  validate(cfg, 1, check_mesh=False)
  return cfg


@pytest.fixture(scope='module')
def base_lm(tmp_path_factory):
  from training.loop import train
  path = tmp_path_factory.mktemp('base')
  train(tiny_config(**{'train.steps': 3, 'train.ckpt_every': 3, 'train.eval_every': 3}), path)
  return path


@pytest.fixture(scope='module')
def evolved(base_lm, tmp_path_factory):
  from training.evolve import evolve
  work = tmp_path_factory.mktemp('evo')
  cfg = evolve_config(base_lm)
  final, _ = evolve(cfg, work)
  return cfg, work, final


def read_state(work, gen):
  from training.checkpoint import Checkpointer
  ck = Checkpointer.open(work)
  s = ck.restore(gen, state=None)[1].state
  ck.close()
  return s


@pytest.mark.xdist_group('namm_base_lm')   # one worker trains the fixture
def test_normalisation_frozen_after_keep_all_pass_and_evaluate_loads_run(evolved, base_lm):
  cfg, work, final = evolved
  s0, s1, s3 = read_state(work, 0), read_state(work, 1), read_state(work, 3)
  assert float(np.abs(s0['sigma'] - 1).max()) > 1e-3           # statistics were collected
  for s in (s1, s3):
    np.testing.assert_array_equal(s['mu'], s0['mu'])
    np.testing.assert_array_equal(s['sigma'], s0['sigma'])
  assert float(np.abs(s3['mean']).max()) > 0                    # the strategy moved
  from training.evaluation import run
  report = run(base_lm, overrides={'decode.policy': 'namm', 'decode.namm_run': str(work),
                                   'decode.prefill_chunk': 32, 'eval.tasks': ('passkey',),
                                   'eval.lengths': (96,), 'eval.depths': (0.5,),
                                   'eval.examples': 2}, output=str(work / 'eval'))
  assert report['tasks'][0]['accuracy'] is not None and report['kv_cache']['kv_layers'] == 2
  rows = [json.loads(l) for l in open(work / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3] and 'heldout_score' in rows[-1]
  # shipped = the mean with the best val fitness within the latest stage (generations 1, 2 are
  # stage 0; generation 3 starts stage 1, so its mean is shipped whatever its val)
  s2 = read_state(work, 2)
  kept = s1 if rows[0]['val_fitness'] >= rows[1]['val_fitness'] else s2
  np.testing.assert_array_equal(s2['best_val'], kept['mean'])
  np.testing.assert_array_equal(s3['best_val'], s3['mean'])
  assert rows[2]['best_val_fitness'] == rows[2]['val_fitness']
  for r in rows:                                                # fitness = score - w * cache
    assert abs(r['best_fitness'] - (r['best_score'] - 0.1 * r['best_cache'])) < 1e-5
  assert os.path.exists(work / 'evolve.png')


@pytest.mark.xdist_group('namm_base_lm')   # one worker trains the fixture
def test_resume_after_kill_continues_identically(evolved, tmp_path):
  from training.evolve import evolve
  cfg, work, final = evolved
  killed = tmp_path / 'killed'
  shutil.copytree(work, killed)
  shutil.rmtree(killed / 'checkpoints' / '3')                   # killed before saving gen 3
  resumed, _ = evolve(cfg, killed)
  np.testing.assert_array_equal(resumed['mean'], final['mean'])
  np.testing.assert_array_equal(resumed['es']['C'], final['es']['C'])


@pytest.mark.xdist_group('namm_base_lm')   # one worker trains the fixture
def test_population_sharded_over_8_devices_matches_one_device(base_lm, tmp_path):
  """evolve.py on 8 devices (one member each) gives the 1-device run's fitness statistics.
  One generation of one task: more add compile time, not sharding."""
  from training.evolve import evolve
  cfg = evolve_config(base_lm, stages=('passkey',), generations=(1,))
  evolve(cfg, tmp_path / 'one')
  env = cpu_env(8)
  flags = [f'--config.evolve.{k}={v}' for k, v in cfg.evolve.items()
           if k not in ('stages', 'generations')]
  flags += ['--config.namm.update_interval=32', '--config.evolve.generations=(1,)',
            "--config.evolve.stages=('passkey',)"]
  proc = subprocess.run([sys.executable, 'evolve.py', '--config=configs/namm.py:tiny',
                         f'--workdir={tmp_path / "eight"}', *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, eight = ([json.loads(l) for l in open(tmp_path / run / 'metrics.jsonl')]
                for run in ('one', 'eight'))
  assert [r['step'] for r in one] == [r['step'] for r in eight] == [1]
  for a, b in zip(one, eight):
    np.testing.assert_allclose([a['best_fitness'], a['mean_fitness'], a['mean_cache']],
                               [b['best_fitness'], b['mean_fitness'], b['mean_cache']], rtol=1e-4)


@pytest.mark.xdist_group('namm_base_lm')   # one worker trains the fixture
def test_sigterm_saves_the_generation_and_the_rerun_matches(evolved, tmp_path):
  """evolve.py preempted (SIGTERM) after generation 1: it saves the generation it finishes
  (periodic saves every 10 here), exits 0 without a traceback, and the rerun ends where the
  uninterrupted run did."""
  import signal
  import time
  from training.checkpoint import Checkpointer
  from training.evolve import evolve
  cfg, work, final = evolved
  flags = [f'--config.evolve.{k}={v}' for k, v in cfg.evolve.items()
           if k not in ('stages', 'generations', 'ckpt_every')]
  flags += ['--config.namm.update_interval=32', '--config.evolve.generations=(2, 1)',
            "--config.evolve.stages=('passkey', 'passkey,corpus')", '--config.evolve.ckpt_every=10']
  stopped = tmp_path / 'stopped'
  proc = subprocess.Popen([sys.executable, 'evolve.py', '--config=configs/namm.py:tiny',
                           f'--workdir={stopped}', *flags], cwd=ROOT, env=cpu_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics, deadline = stopped / 'metrics.jsonl', time.time() + 300
  while proc.poll() is None and time.time() < deadline and not (
      metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0 and 'Traceback' not in stderr, stderr[-2000:]
  saved = Checkpointer.open(stopped).latest_step()
  assert 1 <= saved and f'SIGTERM: stopped at generation {saved}' in stderr
  resumed, _ = evolve(cfg, stopped)
  np.testing.assert_array_equal(resumed['mean'], final['mean'])


def test_evolve_with_no_base_creates_nothing(tmp_path):
  from training.checkpoint import CheckpointError
  from training.evolve import evolve
  with pytest.raises(CheckpointError, match='no checkpoint directory'):
    evolve(evolve_config(tmp_path / 'no_base'), tmp_path / 'evo')
  assert not (tmp_path / 'evo').exists()


@pytest.mark.xdist_group('namm_base_lm')
def test_evolve_at_a_compression_ratio_with_the_question_after_compression(base_lm, tmp_path):
  """evolve.compression_ratio: every member keeps (1 - ratio) of the context read before the
  question (evolve.query_agnostic), in the population and in the held-out checks; the
  keep-all reference keeps everything."""
  from training.evolve import evolve
  from training.metrics import read_metrics
  cfg = evolve_config(base_lm, stages=('passkey',), generations=(2,), query_agnostic=True,
                      compression_ratio=0.5, cache_weight=0.0)
  evolve(cfg, tmp_path)
  rows = read_metrics(tmp_path)
  caches = [r[k] for r in rows.values() for k in ('mean_cache', 'heldout_cache') if k in r]
  assert len(caches) >= 3 and all(abs(c - 0.5) < 0.02 for c in caches), caches
  s0 = read_state(tmp_path, 0)
  assert float(np.mean(s0['held_ref']['passkey'])) >= 0      # the keep-all pass ran
