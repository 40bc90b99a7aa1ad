"""Training-free KV-cache compression policies of the field (kvpress's "presses"), behind the
one policy interface of models/eviction.py, with static shapes:

  streaming_llm  Xiao et al. 2023 (StreamingLLM): the first `sinks` positions (attention
                 sinks) and the `window` most recent ones.
  tova           Oren et al. 2024 (TOVA): keep the `budget` tokens with the largest
                 attention from the current (last) query, averaged over the layer's heads:
                 one decision per layer, the same tokens in every KV head; no recent window.
  random         `budget` tokens per head drawn uniformly (a hash of position, head and the
                 newest position: deterministic, another draw at every eviction).
  snapkv         Li et al. 2024 (SnapKV): at prefill, the attention of the prompt's last
                 `window` queries (the observation window) summed per head, average-pooled
                 over `kernel` neighbouring positions (kvpress: window 64, kernel 5, zero
                 padding counted); keep the window and the best others up to `budget`. It
                 acts on an update of at least `window` queries (decode steps keep all:
                 decode.prefill_chunk=0 compresses once, at the end of the prompt, as the
                 paper does; with chunks, each chunk is compressed).
  pyramidkv      Cai et al. 2024 (PyramidKV): SnapKV's scores with layer-wise budgets that
                 fall arithmetically from the first layer to the last (the last gets
                 budget / beta, beta = 20; the mean over layers is `budget`).
  keydiff        Park et al. 2025 (KeyDiff): keep the `budget` keys least similar (cosine)
                 to the mean of the head's cached keys; the `recent` newest always kept.
  adakv          Feng et al. 2024 (Ada-KV): head-adaptive budgets around any of the scoring
                 presses (decode.ada_press, ADA_PRESSES): the layer's K x budget slots go to
                 the best scores across its heads, each head keeping at least its newest and
                 its top ada_alpha x budget (kvpress AdaKVPress's safeguard, 0.2).
H2O and key-norm (KNorm, `l2`) are in models/namm.py with NAMM; with a ratio, NAMM keeps
its best-scoring tokens up to the budget instead of those scored >= 0 (NAMM.budget).

Budgets are counts of tokens per KV head (decode.budget, or sinks + window); ties keep the
lower slot (eviction.top_budget). decode.compression_ratio sets them from each prompt's length
for the policies of RATIO_POLICIES (training/policy.py ratio_budget).
"""
import jax
import jax.numpy as jnp
from flax import struct

from models import registry
from models.eviction import AdaKV, KeepAll, ScorerPress
from models.namm import BUDGET, validate_budget


@struct.dataclass
class StreamingLLM(KeepAll):
  sinks: int = struct.field(pytree_node=False, default=4)
  window: int = struct.field(pytree_node=False, default=256)

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    newest_Bx1x1 = pos_BxT.max(-1)[:, None, None]
    pos = cache.pos_BxKxS
    return cache.valid_BxKxS & ((pos < self.sinks) | (pos > newest_Bx1x1 - self.window)), cache


@struct.dataclass
class TOVA(ScorerPress):
  budget: int = struct.field(pytree_node=False, default=256)
  recent = 0

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    valid = cache.valid_BxKxS
    # the last query's attention, averaged over the heads that see each slot
    p = jnp.where(valid, probs_BxKxTxS[:, :, -1].astype(jnp.float32), 0.)
    seen_BxS = jnp.maximum(valid.sum(1), 1)
    return jnp.broadcast_to((p.sum(1) / seen_BxS)[:, None], valid.shape), cache


def uniform_hash(pos_BxKxS, head_K, newest_B):
  """A uniform [0, 1) number per (position, head, eviction), from integer hashing."""
  x = (pos_BxKxS.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
       ^ head_K[None, :, None].astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
       ^ newest_B[:, None, None].astype(jnp.uint32) * jnp.uint32(0xC2B2AE3D))
  for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 1)):
    x = (x ^ (x >> shift)) * jnp.uint32(mult)
  return (x >> 8).astype(jnp.float32) / float(1 << 24)


@struct.dataclass
class Random(ScorerPress):
  budget: int = struct.field(pytree_node=False, default=256)
  recent = 0

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    K = cache.valid_BxKxS.shape[1]
    return uniform_hash(cache.pos_BxKxS, jnp.arange(K), pos_BxT.max(-1)), cache


RATIO_POLICIES = ('recency', 'streaming_llm', 'tova', 'snapkv', 'pyramidkv', 'h2o', 'l2',
                  'keydiff', 'random', 'adakv', 'namm')


def check_ratio_policy(policy):
  """ConfigError unless decode.policy `policy` has a token budget a ratio can set."""
  registry.check(policy in RATIO_POLICIES, 'decode.compression_ratio',
                 f'{policy} has no token budget to set from a ratio (one of {RATIO_POLICIES})')


ADA_PRESSES = ('snapkv', 'tova', 'h2o', 'l2', 'keydiff', 'random')   # adakv's inner presses


def pool_by_position(score_BxKxS, pos_BxKxS, valid_BxKxS, kernel):
  """Average of each slot's score with its `kernel` nearest slots in position order (zeros
  beyond the ends and at empty slots, counted: torch avg_pool1d's default)."""
  order = jnp.argsort(jnp.where(valid_BxKxS, pos_BxKxS, jnp.iinfo(jnp.int32).max), -1)
  s = jnp.take_along_axis(jnp.where(valid_BxKxS, score_BxKxS, 0.), order, -1)
  half = kernel // 2
  padded = jnp.pad(s, ((0, 0), (0, 0), (half, half)))
  S = s.shape[-1]
  pooled = sum(padded[..., i:i + S] for i in range(kernel)) / kernel
  return jnp.zeros_like(pooled).at[
      jnp.arange(s.shape[0])[:, None, None], jnp.arange(s.shape[1])[None, :, None],
      order].set(pooled)


@struct.dataclass
class SnapKV(ScorerPress):
  budget: int = struct.field(pytree_node=False, default=256)
  window: int = struct.field(pytree_node=False, default=64)
  kernel: int = struct.field(pytree_node=False, default=5)

  @property
  def recent(self):
    return self.window

  def acts(self, probs_BxKxTxS):          # decode steps: SnapKV acts at prefill
    return probs_BxKxTxS.shape[2] >= self.window

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    score = probs_BxKxTxS[:, :, -self.window:].astype(jnp.float32).sum(2)
    return pool_by_position(score, cache.pos_BxKxS, cache.valid_BxKxS, self.kernel), cache


@struct.dataclass
class PyramidKV(KeepAll):
  budget: int = struct.field(pytree_node=False, default=256)
  window: int = struct.field(pytree_node=False, default=64)
  kernel: int = struct.field(pytree_node=False, default=5)
  beta: int = struct.field(pytree_node=False, default=20)

  def layer_budgets(self, n_layers):
    """Budget per layer: arithmetic from 2 x budget - last down to last = budget / beta (at
    least the window), so they average `budget`."""
    if n_layers == 1:
      return (self.budget,)
    last = max(self.budget // self.beta, self.window)
    first = 2 * self.budget - last
    return tuple(max(round(first - i * (first - last) / (n_layers - 1)), self.window)
                 for i in range(n_layers))

  def for_layer(self, layer, n_layers):
    return SnapKV(self.layer_budgets(n_layers)[layer], self.window, self.kernel)


@struct.dataclass
class KeyDiff(ScorerPress):
  budget: int = struct.field(pytree_node=False, default=256)
  recent: int = struct.field(pytree_node=False, default=32)

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    valid = cache.valid_BxKxS
    k = cache.k_BxKxSxH.astype(jnp.float32)
    unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
    mean_BxKxH = (unit * valid[..., None]).sum(2) / jnp.maximum(valid.sum(-1), 1)[..., None]
    anchor = mean_BxKxH / jnp.maximum(jnp.linalg.norm(mean_BxKxH, axis=-1, keepdims=True), 1e-6)
    return -jnp.einsum('bksh,bkh->bks', unit, anchor), cache


def _validate_snap(cfg):
  validate_budget(cfg)
  de = cfg.decode
  registry.check(1 <= de.snap_window <= de.budget, 'decode.snap_window',
                 f'must be in [1, decode.budget={de.budget}], got {de.snap_window}')


def _validate_streaming(cfg):
  de = cfg.decode
  registry.check(de.sinks >= 0, 'decode.sinks', f'must be >= 0, got {de.sinks}')
  registry.check(de.window >= 1, 'decode.window', f'must be >= 1, got {de.window}')


registry.register_policy(
    'streaming_llm', lambda cfg: StreamingLLM(int(cfg.decode.sinks), int(cfg.decode.window)),
    config={'decode.sinks': 4, 'decode.window': 256}, validate=_validate_streaming)
registry.register_policy('tova', lambda cfg: TOVA(int(cfg.decode.budget)), config=BUDGET,
                         validate=validate_budget)
registry.register_policy('snapkv', lambda cfg: SnapKV(int(cfg.decode.budget),
                                                       int(cfg.decode.snap_window)),
                         config=dict(BUDGET, **{'decode.snap_window': 64}),
                         validate=_validate_snap)
registry.register_policy('pyramidkv', lambda cfg: PyramidKV(int(cfg.decode.budget),
                                                             int(cfg.decode.snap_window)),
                         config=dict(BUDGET, **{'decode.snap_window': 64}),
                         validate=_validate_snap)
registry.register_policy('keydiff', lambda cfg: KeyDiff(int(cfg.decode.budget),
                                                         int(cfg.decode.recent)),
                         config=BUDGET, validate=validate_budget)
def _validate_ada(cfg):
  de = cfg.decode
  registry.check(de.ada_press in ADA_PRESSES, 'decode.ada_press',
                 f'must be one of {ADA_PRESSES}, got {de.ada_press!r}')
  registry.check(0 <= de.ada_alpha <= 1, 'decode.ada_alpha',
                 f'must be in [0, 1], got {de.ada_alpha}')
  registry.policy(de.ada_press).validate(cfg)


registry.register_policy('adakv', lambda cfg: AdaKV(registry.policy(cfg.decode.ada_press).build(
    cfg), float(cfg.decode.ada_alpha)), config=dict(BUDGET, **{'decode.ada_press': 'snapkv',
                                                               'decode.ada_alpha': 0.2}),
                         validate=_validate_ada)
registry.register_policy('random', lambda cfg: Random(int(cfg.decode.budget)), config=BUDGET,
                         validate=validate_budget)
