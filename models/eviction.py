"""KV-cache eviction policies behind one interface.

A policy is an object with `keep(cache, probs_BxKxTxS, pos_BxT) -> (keep_BxKxS, cache)`:
given the cache after the new tokens were written and the attention probabilities of
the new queries over the cache slots (averaged per KV group), it returns which slots to
keep (and may update its own per-slot state in `cache.token_state`). `init(cache)`
adds that state when the cache is created. Attention applies `valid &= keep`.
"""
import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)      # hashable by value: a static jit argument
class KeepAll:
  """Keeps every token: decoding with it equals the full forward."""

  def init(self, cache):
    return cache

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    return jnp.ones_like(cache.valid_BxKxS), cache


@dataclasses.dataclass(frozen=True)
class Recency(KeepAll):
  """Keeps the `window` most recent positions (a sliding window over the cache)."""
  window: int = 256

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    newest_Bx1x1 = pos_BxT.max(-1)[:, None, None]
    return cache.pos_BxKxS > newest_Bx1x1 - self.window, cache


POLICIES = {'none': lambda cfg: None, 'keep_all': lambda cfg: KeepAll(),
            'recency': lambda cfg: Recency(int(cfg.window))}


def make_policy(cfg):
  """cfg: a ConfigDict with `policy` (a name in POLICIES) and the policy's options."""
  if cfg.policy not in POLICIES:
    raise ValueError(f'decode.policy: unknown policy {cfg.policy!r}; one of {sorted(POLICIES)}')
  return POLICIES[cfg.policy](cfg)
