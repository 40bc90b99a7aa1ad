"""KV-cache eviction policies behind one interface.

A policy is a pytree (flax.struct dataclass): its hyper-parameters are static fields, its
learned parameters (NAMM's scorer and normalisation) ordinary array fields, so one compiled
program serves any parameter values and evolve.py vmaps over them. It is passed to the
model like any argument (`model(tokens, state, pos, policy=policy)`) and has

    init(cache) -> cache                 adds the policy's per-slot state (token_state)
    keep(cache, probs_BxKxTxS, pos_BxT) -> (keep_BxKxS, cache)

`keep` gets the cache after the new tokens were written and the attention probabilities
of the new queries over the cache slots (averaged per KV group), and returns which slots to
keep (it may update its state in `cache.token_state` / `cache.policy_state`). Attention
applies `valid &= keep`. Policies register in models/registry.py with their config keys.
"""
import jax
import jax.numpy as jnp
from flax import struct

from models import registry

INF = 1e30                       # a score no token reaches (finite: argsort, argmin)


@struct.dataclass
class KeepAll:
  """Keeps every token: decoding with it equals the full forward."""

  def init(self, cache):
    return cache

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    return jnp.ones_like(cache.valid_BxKxS), cache


@struct.dataclass
class Recency(KeepAll):
  """Keeps the `window` most recent positions (a sliding window over the cache)."""
  window: int = struct.field(pytree_node=False, default=256)

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    newest_Bx1x1 = pos_BxT.max(-1)[:, None, None]
    return cache.pos_BxKxS > newest_Bx1x1 - self.window, cache


def ratio_keep(ratio, tokens):
  """Tokens kept of `tokens` at compression ratio `ratio` (kvpress's: the fraction removed)."""
  return max(1, round((1 - ratio) * tokens))


def top_budget(score_BxKxS, valid_BxKxS, pos_BxKxS, newest_B, budget, recent):
  """Keep the `recent` newest positions plus the best-scoring others up to `budget` in all
  (ties: the lower slot). When at most one token per head is over budget (every decode step
  after the first eviction) that is the worst-scoring other, found without a sort."""
  recent_BxKxS = valid_BxKxS & (pos_BxKxS > newest_B[:, None, None] - recent)
  other_BxKxS = valid_BxKxS & ~recent_BxKxS
  s = jnp.where(other_BxKxS, score_BxKxS, -INF)
  n_other = jnp.maximum(budget - recent_BxKxS.sum(-1, keepdims=True), 0)
  over_BxKx1 = other_BxKxS.sum(-1, keepdims=True) - n_other

  def one_over():
    S = s.shape[-1]
    worst = S - 1 - jnp.argmin(jnp.where(other_BxKxS, s, INF)[..., ::-1], -1)   # last of ties
    drop = (jnp.arange(S) == worst[..., None]) & (over_BxKx1 > 0)
    return valid_BxKxS & ~drop

  def sorted_keep():
    return recent_BxKxS | ((rank_desc(s) < n_other) & other_BxKxS)

  return jax.lax.cond(over_BxKx1.max() <= 1, one_over, sorted_keep)


def rank_desc(score_BxKxS):
  """Each slot's rank by descending score within its row (ties: the lower slot first)."""
  return jnp.argsort(jnp.argsort(-score_BxKxS, axis=-1, stable=True), axis=-1, stable=True)


def head_adaptive_budget(score_BxKxS, valid_BxKxS, pos_BxKxS, newest_B, budget, recent,
                         alpha):
  """AdaKV's selection (Feng et al. 2024; kvpress AdaKVPress): the layer keeps K x `budget`
  slots over its K heads, chosen by score across heads, after each head's `recent` newest and
  its top `alpha` x `budget` (the safeguard), which are always kept (as top_budget keeps
  `recent` even above the budget)."""
  B, K, S = score_BxKxS.shape
  s = jnp.where(valid_BxKxS, score_BxKxS, -INF)
  protected = valid_BxKxS & ((pos_BxKxS > newest_B[:, None, None] - recent)
                             | (rank_desc(s) < int(alpha * budget)))
  s = jnp.where(protected, INF, s)
  rank_BxKS = rank_desc(s.reshape(B, K * S))
  return protected | ((rank_BxKS < K * budget).reshape(B, K, S) & valid_BxKxS)


@struct.dataclass
class ScorerPress(KeepAll):
  """A policy that scores every slot (higher: keep) and keeps the `recent` newest plus the
  best others up to `budget` per head (kvpress's ScorerPress). Subclasses define `score`,
  fields `budget` and `recent` (or properties), and may act only on some updates (`acts`)."""

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    """(score_BxKxS, cache): the slots' scores and the cache with the policy's state."""
    raise NotImplementedError

  def acts(self, probs_BxKxTxS):
    return True

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    if not self.acts(probs_BxKxTxS):
      return jnp.ones_like(cache.valid_BxKxS), cache
    score, cache = self.score(cache, probs_BxKxTxS, pos_BxT)
    return top_budget(score, cache.valid_BxKxS, cache.pos_BxKxS, pos_BxT.max(-1), self.budget,
                      self.recent), cache


@struct.dataclass
class AdaKV(KeepAll):
  """Head-adaptive budgets around any ScorerPress: its scores, selected across the layer's
  heads (head_adaptive_budget), so a head with concentrated attention gives budget to one
  with spread attention; the mean over heads is the press's budget."""
  press: ScorerPress
  alpha: float = struct.field(pytree_node=False, default=0.2)

  def init(self, cache):
    return self.press.init(cache)

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    p = self.press
    if not p.acts(probs_BxKxTxS):
      return jnp.ones_like(cache.valid_BxKxS), cache
    score, cache = p.score(cache, probs_BxKxTxS, pos_BxT)
    return head_adaptive_budget(score, cache.valid_BxKxS, cache.pos_BxKxS, pos_BxT.max(-1),
                                p.budget, p.recent, self.alpha), cache


registry.register_policy('none', lambda cfg: None)
registry.register_policy('keep_all', lambda cfg: KeepAll())
registry.register_policy('recency', lambda cfg: Recency(int(cfg.decode.window)),
                         config={'decode.window': 256})   # recency window
