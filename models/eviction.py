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
    rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1, stable=True)
    return recent_BxKxS | ((rank < n_other) & other_BxKxS)

  return jax.lax.cond(over_BxKx1.max() <= 1, one_over, sorted_keep)


registry.register_policy('none', lambda cfg: None)
registry.register_policy('keep_all', lambda cfg: KeepAll())
registry.register_policy('recency', lambda cfg: Recency(int(cfg.decode.window)),
                         config={'decode.window': 256})   # recency window
