"""KV-cache eviction policies behind one interface.

A policy is an object with `keep(cache, probs_BxKxTxS, pos_BxT) -> (keep_BxKxS, cache)`:
given the cache after the new tokens were written and the attention probabilities of
the new queries over the cache slots (averaged per KV group), it returns which slots to
keep (and may update its own per-slot state in `cache.token_state`). `init(cache)`
adds that state when the cache is created. Attention applies `valid &= keep`.
"""
import dataclasses
import importlib

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


# name -> make(decode_cfg) -> policy, or 'module:attribute' imported on first use.
POLICIES = {'none': lambda cfg: None, 'keep_all': lambda cfg: KeepAll(),
            'recency': lambda cfg: Recency(int(cfg.window)),
            'h2o': 'models.namm:make_h2o', 'l2': 'models.namm:make_l2',
            'namm': 'models.namm:make_namm', 'anchor': 'models.anchor:make_anchor_policy'}


def make_policy(cfg):
  """cfg: the `decode` ConfigDict: `policy` (a name in POLICIES) and the policy's options."""
  if cfg.policy not in POLICIES:
    raise ValueError(f'decode.policy: unknown policy {cfg.policy!r}; one of {sorted(POLICIES)}')
  make = POLICIES[cfg.policy]
  if isinstance(make, str):
    module, attr = make.split(':')
    make = getattr(importlib.import_module(module), attr)
  return make(cfg)
