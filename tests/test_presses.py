"""models/presses.py: each policy's keep mask against a slow NumPy reference on random caches
(ties, empty slots, GQA groups), budgets met exactly, and decode with a budget that holds
everything equal to the full forward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import decode, presses


def random_cache(rng, B=2, K=2, S=16, same_heads=False):
  """valid [B, K, S] (some empty slots), positions (-1 where empty) as permutations."""
  valid = rng.random((B, 1 if same_heads else K, S)) < 0.8
  valid = np.broadcast_to(valid, (B, K, S)).copy()
  pos = np.stack([[rng.permutation(S) for _ in range(K)] for _ in range(B)])
  if same_heads:
    pos = np.broadcast_to(pos[:, :1], (B, K, S)).copy()
  pos = np.where(valid, pos, -1)
  return valid, pos


class Cache:            # the fields a policy reads (models/attention.py KVCache)
  def __init__(self, valid, pos, k=None):
    self.valid_BxKxS, self.pos_BxKxS = jnp.asarray(valid), jnp.asarray(pos)
    self.k_BxKxSxH = None if k is None else jnp.asarray(k)


def test_streaming_llm_keeps_sinks_and_the_window():
  rng = np.random.default_rng(0)
  for _ in range(50):
    valid, pos = random_cache(rng)
    newest = pos.max((1, 2))
    sinks, window = int(rng.integers(0, 4)), int(rng.integers(1, 8))
    keep, _ = presses.StreamingLLM(sinks, window).keep(Cache(valid, pos), None,
                                                       jnp.asarray(newest)[:, None])
    want = np.zeros_like(valid)
    for b, k, s in np.ndindex(valid.shape):
      p = pos[b, k, s]
      want[b, k, s] = valid[b, k, s] and (p < sinks or p > newest[b] - window)
    np.testing.assert_array_equal(keep, want)


def np_top(score, valid, budget):
  """Indices kept: the `budget` highest scores of the valid slots, ties to the lower slot."""
  order = sorted((s for s in range(len(score)) if valid[s]), key=lambda s: (-score[s], s))
  return set(order[:budget])


def test_tova_keeps_the_top_of_the_last_querys_attention_averaged_over_heads():
  rng = np.random.default_rng(1)
  for _ in range(50):
    B, K, T, S = 2, 2, 3, 16                     # K KV heads (each a GQA group's average)
    valid, pos = random_cache(rng, B, K, S, same_heads=True)
    probs = rng.integers(0, 3, (B, K, T, S)).astype(np.float32)       # many ties
    budget = int(rng.integers(1, S))
    keep, _ = presses.TOVA(budget).keep(Cache(valid, pos), jnp.asarray(probs),
                                        jnp.asarray(pos.max((1, 2)))[:, None])
    keep = np.asarray(keep)
    for b in range(B):
      score = probs[b, :, -1].mean(0)             # the last query, averaged over heads
      kept = np_top(score, valid[b, 0], budget)
      for k in range(K):
        assert set(np.flatnonzero(keep[b, k])) == kept
      assert keep[b, 0].sum() == min(budget, valid[b, 0].sum())       # the budget, exactly


def test_snapkv_keeps_the_window_and_the_pooled_window_attention_top():
  rng = np.random.default_rng(4)
  for _ in range(30):
    B, K, T, S, w, kernel = 2, 2, 6, 16, 3, 5
    valid, pos = random_cache(rng, B, K, S)
    probs = rng.random((B, K, T, S)).astype(np.float32)
    budget = int(rng.integers(w, S))
    newest = pos.max((1, 2))
    policy = presses.SnapKV(budget, w, kernel)
    keep = np.asarray(policy.keep(Cache(valid, pos), jnp.asarray(probs),
                                  jnp.asarray(newest)[:, None])[0])
    for b, h in np.ndindex(B, K):
      slots = sorted((s for s in range(S) if valid[b, h, s]), key=lambda s: pos[b, h, s])
      raw = [probs[b, h, -w:, s].sum() for s in slots]                 # position order
      padded = [0.] * (kernel // 2) + raw + [0.] * (kernel // 2) + [0.] * (S - len(raw))
      pooled = {s: sum(padded[i:i + kernel]) / kernel for i, s in enumerate(slots)}
      win = {s for s in slots if pos[b, h, s] > newest[b] - w}
      others = sorted((s for s in slots if s not in win), key=lambda s: (-pooled[s], s))
      want = win | set(others[:max(budget - len(win), 0)])
      assert set(np.flatnonzero(keep[b, h])) == want, (b, h)
  one = presses.SnapKV(4, 3).keep(Cache(valid, pos), jnp.ones((B, K, 1, S)), jnp.zeros((B, 1)))
  assert np.asarray(one[0]).all()                                  # a decode step keeps all


def test_pyramidkv_gives_each_layer_snapkv_with_falling_budgets_that_average_the_budget():
  p = presses.PyramidKV(budget=400, window=16, kernel=5, beta=20)
  b = p.layer_budgets(8)
  assert list(b) == sorted(b, reverse=True) and b[-1] == 20 and abs(np.mean(b) - 400) <= 1
  assert p.for_layer(3, 8) == presses.SnapKV(b[3], 16, 5)
  assert presses.PyramidKV(budget=16, window=16).layer_budgets(4) == (16,) * 4  # window floor


def test_keydiff_keeps_the_keys_least_like_the_mean_key_and_the_recent_ones():
  rng = np.random.default_rng(3)
  for _ in range(30):
    B, K, S, H = 2, 2, 16, 4
    valid, pos = random_cache(rng, B, K, S)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    recent, budget = int(rng.integers(0, 3)), int(rng.integers(3, S))
    newest = pos.max((1, 2))
    keep = np.asarray(presses.KeyDiff(budget, recent).keep(
        Cache(valid, pos, k), None, jnp.asarray(newest)[:, None])[0])
    for b, h in np.ndindex(B, K):
      unit = k[b, h] / np.linalg.norm(k[b, h], axis=-1, keepdims=True)
      mean = unit[valid[b, h]].mean(0)
      cos = unit @ (mean / np.linalg.norm(mean))
      rec = {s for s in range(S) if valid[b, h, s] and pos[b, h, s] > newest[b] - recent}
      others = [s for s in range(S) if valid[b, h, s] and s not in rec]
      n = max(budget - len(rec), 0)
      want = rec | set(sorted(others, key=lambda s: (cos[s], s))[:n])
      assert set(np.flatnonzero(keep[b, h])) == want


def test_random_keeps_budget_valid_tokens_and_redraws_per_eviction():
  rng = np.random.default_rng(2)
  valid, pos = random_cache(rng, B=2, K=3, S=32)
  newest = jnp.asarray(pos.max((1, 2)))[:, None]
  keep = np.asarray(presses.Random(7).keep(Cache(valid, pos), None, newest)[0])
  assert (keep <= valid).all()
  np.testing.assert_array_equal(keep.sum(-1), np.minimum(7, valid.sum(-1)))
  again = np.asarray(presses.Random(7).keep(Cache(valid, pos), None, newest)[0])
  later = np.asarray(presses.Random(7).keep(Cache(valid, pos), None, newest + 1)[0])
  assert (again == keep).all() and (later != keep).any()
  u = np.asarray(presses.uniform_hash(jnp.arange(4096).reshape(1, 1, -1), jnp.arange(1),
                                      jnp.zeros(1, jnp.int32)))
  u = u.ravel()
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02 and len(set(u)) > 4000


@pytest.mark.parametrize('policy', [presses.StreamingLLM(4, 256), presses.TOVA(256),
                                    presses.Random(256), presses.KeyDiff(256, 32),
                                    presses.SnapKV(256, 16), presses.PyramidKV(4096, 16),
                                    presses.AdaKV(presses.SnapKV(256, 16))],
                         ids=lambda p: type(p).__name__)
def test_a_budget_that_holds_everything_decodes_as_the_full_forward(policy):
  from conftest import tiny_config
  from models.lm import LM
  model = LM(tiny_config().model, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(1), (2, 96), 0, 256)

  @jax.jit
  def run(tokens):
    st = decode.init_state(model, 2, 97, policy)
    logits, st = decode.prefill(model, tokens, st, policy, 32)
    return logits, [s.size_BxK() for s in st]

  logits, sizes = run(tok)
  full = nnx.jit(lambda m, t: m(t)[0][:, -1])(model, tok)
  assert float(jnp.abs(logits - full).max()) < 1e-5
  assert all(int(s.min()) == 96 for s in sizes)


def test_adakv_spends_the_layers_budget_across_heads_after_each_heads_safeguard():
  """AdaKV against a NumPy reference: each head's `recent` newest and top alpha x budget
  are kept, then the best scores over all heads up to K x budget (ties: the lower head, then
  the lower slot); the layer's total is met exactly (or the protected, when more)."""
  from models.namm import L2Norm
  rng = np.random.default_rng(7)
  for _ in range(40):
    B, K, S, H = 2, 4, 16, 3
    valid, pos = random_cache(rng, B, K, S)
    k = rng.integers(0, 3, (B, K, S, H)).astype(np.float32)          # norms with ties
    budget, recent = int(rng.integers(1, S)), int(rng.integers(0, 3))
    alpha = float(rng.choice([0., 0.2, 0.5]))
    newest = pos.max((1, 2))
    keep, _ = presses.AdaKV(L2Norm(budget, recent), alpha).keep(
        Cache(valid, pos, k), None, jnp.asarray(newest)[:, None])
    keep = np.asarray(keep)
    score = -np.linalg.norm(k, axis=-1)
    for b in range(B):
      protected = set()
      for h in range(K):
        mine = [s for s in range(S) if valid[b, h, s]]
        protected |= {(h, s) for s in mine if pos[b, h, s] > newest[b] - recent}
        protected |= {(h, s) for s in np_top(score[b, h], valid[b, h], int(alpha * budget))}
      order = sorted(((h, s) for h in range(K) for s in range(S) if valid[b, h, s]),
                     key=lambda hs: (hs not in protected, -score[b][hs], hs))
      want = set(order[:K * budget]) | protected
      assert {(h, s) for h, s in zip(*np.nonzero(keep[b]))} == want
      assert keep[b].sum() == min(max(K * budget, len(protected)), valid[b].sum())


def test_namm_with_a_budget_keeps_exactly_its_best_scored_tokens():
  """NAMM.budget (a compression ratio's): after the prefill every head holds exactly the
  budget (the official rule would keep those scored >= 0: another count per prompt)."""
  from conftest import tiny_config
  from models import namm as nammlib
  from models.lm import LM
  model = LM(tiny_config().model, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(1), (2, 96), 0, 256)
  theta = jax.random.normal(jax.random.key(2), (nammlib.n_params(),))
  sizes = {}
  for budget in (0, 40):
    policy = nammlib.NAMM.make(theta, update_interval=32, budget=budget)
    st = decode.init_state(model, 2, 96, policy)
    _, st = decode.prefill(model, tok, st, policy, 32)
    sizes[budget] = np.stack([np.asarray(s.size_BxK()) for s in st])
  assert (sizes[40] == 40).all()
  assert (sizes[0] != 40).all()                       # the threshold's count: another


def test_compression_ratio_sets_every_budget_from_the_prompt_length():
  """decode.compression_ratio (kvpress's: the fraction of the prompt's KV removed): each
  budget-based policy keeps (1 - ratio) x the prompt's tokens; others are a config error."""
  from conftest import tiny_config
  from training.config import ConfigError, validate
  from training.policy import make_policy
  for policy, field, want in (('h2o', 'budget', 250), ('tova', 'budget', 250),
                              ('snapkv', 'budget', 250), ('recency', 'window', 250),
                              ('streaming_llm', 'window', 246), ('random', 'budget', 250),
                              ('namm', 'budget', 250), ('adakv', 'press', 250)):
    cfg = tiny_config(**{'decode.policy': policy, 'decode.compression_ratio': 0.75})
    validate(cfg, 1)
    got = getattr(make_policy(cfg, 1000), field)
    assert (got.budget if policy == 'adakv' else got) == want, policy
    assert getattr(make_policy(cfg), field) == getattr(make_policy(cfg, None), field)
  assert make_policy(cfg).press.budget == 256            # no prompt: the configured budget
  for policy, bad, message in (('h2o', 1.0, 'must be in'),
                               ('keep_all', 0.5, 'keep_all has no token budget')):
    cfg = tiny_config(**{'decode.policy': policy, 'decode.compression_ratio': bad})
    with pytest.raises(ConfigError, match=f'config.decode.compression_ratio: {message}'):
      validate(cfg, 1)
