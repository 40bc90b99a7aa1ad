"""NAMM (Sakana AI, arXiv 2410.13166): evolved KV-cache eviction from attention spectrograms,
plus the H2O and L2-norm baselines, behind the models/eviction.py policy interface.

Official semantics (SakanaAI/evo-memory @3a0a6bd: memory_policy/; arXiv 2410.13166), per
layer, every `update_interval` new tokens:
  1. the new queries' attention rows (averaged per GQA group, fp32) are buffered per key:
     A^T [N keys, n rows], left-padded with that key's previous-update last `hop` rows
     (zeros for new tokens and on the first update);
  2. STFT magnitudes: periodic Hann, n_fft 32, hop 16, no centring -> [N, n/16 frames, 17];
  3. masked EMA (0.99 per token; g = 0.99^hop per frame):
       E = 0.99^n E_prev + sum_t (1-g) g^(T-1-t) M[t,i] S_t[i],
     M[t,i] = 1 for old tokens and, for a new token at offset j, iff j < hop (t+1);
  4. normalise (E - mu) / max(sigma, 1e-7) with statistics gathered on the keep-all pass;
  5. recency features [sin(age f_k), cos(age f_k)], f_k = max_freq^(-k/(dim/2));
  6. BAM scorer: one attention head over the layer's tokens, a token attends to itself and
     NEWER tokens (backward mask), residual + multiplicative output, linear score;
  7. keep rule: K = max over heads of #(score >= 0); each head keeps its own top-K; the newest
     token is always kept (+inf), empty slots never (-inf). Zero parameters keep everything.

The policy is a pytree (models/eviction.py): hyper-parameters static, the scorer parameters
`theta` and the normalisation statistics `mu` / `sigma` array fields (zeros and (0, 1) by
default: keep everything), so the evolution loop vmaps one compiled program over population
members' theta (training/evolve.py). Per-slot state (`cache.token_state`, zeroed when a
slot is written): the EMA `ema` [.., F] and a ring `rows` [.., hop + n] of the latest
attention rows (the previous update's last `hop` and the `n` since). `policy_state['stats']`
accumulates [count, sum, sum of squares] of E over valid tokens at every update (pooled per
layer; the evolution loop sums over layers and prompts of its keep-all pass and freezes mu,
sigma).

Cost: an update scores the valid slots only, gathered into the smallest of S/2^(buckets-1)
.. S/2, S slots that holds them (`buckets`; the same keep decisions as scoring every slot),
so it follows the kept cache rather than the capacity.

Deviation (documented): K is the max over heads per batch row, not over the batch too (the
official B = 1 makes them equal; this keeps prompts of one batch independent).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models import registry
from models.eviction import INF, ScorerPress, rank_desc, top_budget
from models.registry import check


# --- Scorer parameters -------------------------------------------------------------------

def param_shapes(n_feat=17, rec_dim=8, hidden=32):
  """Official row-major layout: qkv W (Z, 3h), b; out W (h, 2Z), b; final W (Z, 1), b."""
  Z = n_feat + rec_dim
  return (('w_qkv', (Z, 3 * hidden)), ('b_qkv', (3 * hidden,)), ('w_out', (hidden, 2 * Z)),
          ('b_out', (2 * Z,)), ('w_score', (Z, 1)), ('b_score', (1,)))


def n_params(n_feat=17, rec_dim=8, hidden=32):
  return sum(int(np.prod(s)) for _, s in param_shapes(n_feat, rec_dim, hidden))


def unflatten(theta_P, n_feat=17, rec_dim=8, hidden=32):
  out, i = {}, 0
  for name, shape in param_shapes(n_feat, rec_dim, hidden):
    size = int(np.prod(shape))
    out[name] = theta_P[i:i + size].reshape(shape)
    i += size
  return out


# --- Features ----------------------------------------------------------------------------

def windowed_dft(n_fft):
  """[n_fft, 2F] fp32: [hann * cos | -hann * sin] of the onesided DFT (F = n_fft//2 + 1), so
  frames @ it = [Re | Im] of rfft(hann * frame)."""
  n, f = np.arange(n_fft)[:, None], np.arange(n_fft // 2 + 1)[None]
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)      # periodic Hann
  angle = 2 * np.pi * n * f / n_fft
  return np.concatenate([hann[:, None] * np.cos(angle), -hann[:, None] * np.sin(angle)],
                        1).astype(np.float32)


def stft_magnitudes(x_Nx_L, n_fft=32, hop=16, start=0):
  """|STFT| of each row, torch.stft(center=False, periodic Hann, onesided) semantics:
  frame t = |rfft(hann * x[hop t : hop t + n_fft])|. [..., L] -> [..., T, n_fft//2 + 1], fp32.
  `start` (may be traced): the rows are a ring whose oldest column is `start`. The DFT is
  one matmul with the window folded in (the features of a 3072-slot cache took 184 ms
  instead of 249 ms with jnp.fft.rfft of the 32-point frames, on CPU)."""
  L = x_Nx_L.shape[-1]
  T, F = (L - n_fft) // hop + 1, n_fft // 2 + 1
  idx_TxW = (start + hop * jnp.arange(T)[:, None] + jnp.arange(n_fft)[None]) % L
  y = x_Nx_L.astype(jnp.float32)[..., idx_TxW] @ windowed_dft(n_fft)
  return jnp.sqrt(y[..., :F] ** 2 + y[..., F:] ** 2)


def ema_update(ema_NxF, spec_NxTxF, offset_N, gamma=0.99, hop=16):
  """Masked EMA over the T frames of one update (n = T hop new rows).

  offset_N: each token's position minus the first new query's position (< 0: old token).
  A new token at offset j contributes frame t only iff j < hop (t + 1)."""
  T = spec_NxTxF.shape[-2]
  g = gamma ** hop
  t_T = jnp.arange(T)
  w_T = (1 - g) * g ** (T - 1 - t_T).astype(jnp.float32)
  m_NxT = (offset_N[..., None] < hop * (t_T + 1)).astype(jnp.float32)
  return gamma ** (T * hop) * ema_NxF + ((w_T * m_NxT)[..., None] * spec_NxTxF).sum(-2)


def recency_features(age_N, dim=8, max_freq=50000.0):
  """[sin(age f_k) for k < dim/2, cos(age f_k) ...], f_k = max_freq^(-k / (dim/2))."""
  half = dim // 2
  f_K = max_freq ** (-jnp.arange(half, dtype=jnp.float32) / half)
  a = age_N.astype(jnp.float32)[..., None] * f_K
  return jnp.concatenate([jnp.sin(a), jnp.cos(a)], -1)


def bam_scores(z_NxZ, pos_N, valid_N, p, hidden=32, block=0, n_valid=None):
  """BAM scorer for one (batch row, head): token i attends to j iff pos_j >= pos_i (itself and
  newer tokens: the backward mask) and both are valid. No nonlinearity. Returns scores [N]
  (an empty slot's is that of a token seeing nothing; the keep rule never keeps it).

  `block` > 0: keys in blocks of that many with an online softmax (memory O(N * block)
  instead of the [N, N] logits; the same result up to float rounding). `n_valid` (may be
  traced, not batched): at least the number of valid tokens; blocks past it are skipped,
  so the cost follows the kept cache, not the capacity."""
  qkv = z_NxZ @ p['w_qkv'] + p['b_qkv']
  q, k, v = jnp.split(qkv, 3, -1)
  q = q / jnp.sqrt(jnp.float32(hidden))
  if block <= 0 or block >= z_NxZ.shape[0]:
    mask_NxN = (pos_N[None, :] >= pos_N[:, None]) & valid_N[None, :] & valid_N[:, None]
    logits_NxN = jnp.where(mask_NxN, q @ k.T, -INF)
    o = (jax.nn.softmax(logits_NxN, -1) * mask_NxN) @ v
  else:
    o = _bam_blockwise(q, k, v, pos_N, valid_N, block, n_valid)
  u = o @ p['w_out'] + p['b_out']
  res, mult = jnp.split(u, 2, -1)
  z2 = z_NxZ * (1 + mult) + res
  return (z2 @ p['w_score'] + p['b_score'])[..., 0]


def _bam_blockwise(q_NxH, k_NxH, v_NxH, pos_N, valid_N, block, n_valid=None):
  """Softmax-weighted values under the backward mask, in blocks with an online softmax.
  Tokens sorted oldest first (empty slots last), query block a needs key blocks b >= a only:
  the pairs a <= b, about half of all; key blocks from ceil(n_valid / block) on hold only
  empty slots and are skipped. Needs distinct positions among valid tokens (a cache's)."""
  N, H = q_NxH.shape
  nb = -(-N // block)
  n_valid = N if n_valid is None else n_valid
  key_N = jnp.where(valid_N, pos_N, jnp.iinfo(jnp.int32).max)   # empty: last, sees nothing
  order_N = jnp.argsort(key_N)
  def blocks(a, fill):
    a = jnp.concatenate([a[order_N], jnp.full((nb * block - N,) + a.shape[1:], fill, a.dtype)])
    return a.reshape((nb, block) + a.shape[1:])
  q, k, v, pos, valid = (blocks(q_NxH, 0), blocks(k_NxH, 0), blocks(v_NxH, 0),
                         blocks(key_N, 0), blocks(valid_N, False))
  pairs_Px2 = np.array([(a, b) for a in range(nb) for b in range(a, nb)], np.int32)

  def pair(carry, a, b):
    m, l, acc = carry                                 # [nb, block], [nb, block], [.., H]
    mask_QxB = (pos[b][None, :] >= pos[a][:, None]) & valid[b][None, :]
    s_QxB = jnp.where(mask_QxB, q[a] @ k[b].T, -INF)
    m_new = jnp.maximum(m[a], s_QxB.max(-1))
    e_QxB = jnp.exp(s_QxB - m_new[:, None]) * mask_QxB
    scale = jnp.exp(m[a] - m_new)
    return (m.at[a].set(m_new), l.at[a].set(l[a] * scale + e_QxB.sum(-1)),
            acc.at[a].set(acc[a] * scale[:, None] + e_QxB @ v[b]))

  def body(carry, ab):                                # a <= b: b holds a valid token or none
    return jax.lax.cond(ab[1] * block < n_valid, pair, lambda c, a, b: c, carry, ab[0],
                        ab[1]), None

  init = (jnp.full((nb, block), -INF), jnp.zeros((nb, block)), jnp.zeros((nb, block, H)))
  (_, l, acc), _ = jax.lax.scan(body, init, pairs_Px2)
  o_sorted = (acc / jnp.where(l > 0, l, 1.0)[..., None]).reshape(nb * block, H)[:N]
  return jnp.zeros_like(o_sorted).at[order_N].set(o_sorted)


def keep_rule(score_BxKxS, valid_BxKxS, pos_BxKxS):
  """Official binary selection: the newest valid token +inf, empty slots -inf;
  K = max over heads of #(score >= 0); each head keeps its own top-K."""
  newest_BxKx1 = jnp.where(valid_BxKxS, pos_BxKxS, -1).max(-1, keepdims=True)
  s = jnp.where(valid_BxKxS, score_BxKxS, -INF)
  s = jnp.where(valid_BxKxS & (pos_BxKxS == newest_BxKx1), INF, s)
  k_BxK = ((s >= 0) & valid_BxKxS).sum(-1)
  K_Bx1x1 = k_BxK.max(-1)[:, None, None]
  return (rank_desc(s) < K_Bx1x1) & valid_BxKxS


# --- The NAMM policy ---------------------------------------------------------------------

static = lambda default: struct.field(pytree_node=False, default=default)


@struct.dataclass
class NAMM:
  """Eviction by the evolved BAM scorer (see the module docstring). Build with `make`."""
  theta: jax.Array              # [n_params] scorer parameters (official row-major layout)
  mu: jax.Array                 # [n_feat] normalisation of the EMA features
  sigma: jax.Array
  update_interval: int = static(512)
  n_fft: int = static(32)
  hop: int = static(16)
  gamma: float = static(0.99)
  rec_dim: int = static(8)
  max_freq: float = static(50000.0)
  hidden: int = static(32)
  block: int = static(256)      # BAM keys per block (memory O(S * block), not O(S^2))
  buckets: int = static(4)      # features + BAM on the valid slots gathered into the smallest
                                # of S/2^(buckets-1) .. S/2, S that holds them (1: all S slots)
  budget: int = static(0)       # 0: the official rule (keep_rule); else the newest and the
                                # best-scoring others up to `budget` per head (a ratio's budget)

  @classmethod
  def make(cls, theta=None, mu=None, sigma=None, **hyper):
    """The policy with these hyper-parameters; parameters default to zeros (keep all)."""
    p = cls(None, None, None, **hyper)
    F = p.n_feat
    as_f32 = lambda a, default: default if a is None else jnp.asarray(a, jnp.float32)
    return p.replace(theta=as_f32(theta, jnp.zeros(p.n_params)), mu=as_f32(mu, jnp.zeros(F)),
                     sigma=as_f32(sigma, jnp.ones(F)))

  @property
  def n_feat(self):
    return self.n_fft // 2 + 1

  @property
  def n_params(self):
    return n_params(self.n_feat, self.rec_dim, self.hidden)

  def init(self, cache):
    B, K, S = cache.valid_BxKxS.shape
    F, R = self.n_feat, self.hop + self.update_interval
    token_state = dict(ema=jnp.zeros((B, K, S, F)), rows=jnp.zeros((B, K, S, R)))
    policy_state = dict(count=jnp.zeros((), jnp.int32), written=jnp.zeros((), jnp.int32),
                        start_B=jnp.zeros((B,), jnp.int32), stats=jnp.zeros((3, F)))
    return cache.replace(token_state=token_state, policy_state=policy_state)

  def features(self, cache, newest_B):
    """Normalised z [B, K, S, R + F] and the updated EMA, from the buffered rows."""
    ts, ps = cache.token_state, cache.policy_state
    spec = stft_magnitudes(ts['rows'], self.n_fft, self.hop, start=ps['written'])
    offset_BxKxS = cache.pos_BxKxS - ps['start_B'][:, None, None]
    ema = ema_update(ts['ema'], spec, offset_BxKxS, self.gamma, self.hop)
    e_hat = (ema - self.mu) / jnp.maximum(self.sigma, 1e-7)
    age = newest_B[:, None, None] - cache.pos_BxKxS
    z = jnp.concatenate([recency_features(age, self.rec_dim, self.max_freq), e_hat], -1)
    return z, ema

  def bam(self, cache, z_BxKxSxZ):
    """BAM scores [B, K, S] of the features z, per (batch row, head)."""
    p = unflatten(self.theta, self.n_feat, self.rec_dim, self.hidden)
    n_valid = cache.valid_BxKxS.sum(-1).max()        # one bound for all rows: a real branch
    bam = lambda z, pos, v: bam_scores(z, pos, v, p, self.hidden, self.block, n_valid)
    return jax.vmap(jax.vmap(bam))(z_BxKxSxZ, cache.pos_BxKxS, cache.valid_BxKxS)

  def scores(self, cache, newest_B):
    z_BxKxSxZ, ema = self.features(cache, newest_B)
    return self.bam(cache, z_BxKxSxZ), ema

  def keep_and_ema(self, cache, newest_B):
    score, ema = self.scores(cache, newest_B)
    if self.budget:
      return top_budget(score, cache.valid_BxKxS, cache.pos_BxKxS, newest_B, self.budget,
                        1), ema
    return keep_rule(score, cache.valid_BxKxS, cache.pos_BxKxS), ema

  def compact_keep_and_ema(self, cache, newest_B, M):
    """`keep_and_ema` on the valid slots only, gathered (oldest slot first) into M >= their
    number per (batch row, head), then scattered back: the update's cost follows the kept
    cache, not the capacity. Invalid slots are not kept and keep their EMA."""
    if M >= cache.capacity:
      return self.keep_and_ema(cache, newest_B)
    idx_BxKxM = jnp.argsort(~cache.valid_BxKxS, axis=-1, stable=True)[..., :M]
    take = lambda a: jnp.take_along_axis(a, idx_BxKxM.reshape(idx_BxKxM.shape + (1,) * (
        a.ndim - 3)), 2)
    view = cache.replace(pos_BxKxS=take(cache.pos_BxKxS), valid_BxKxS=take(cache.valid_BxKxS),
                         token_state={k: take(v) for k, v in cache.token_state.items()})
    keep_BxKxM, ema_BxKxMxF = self.keep_and_ema(view, newest_B)
    B, K = idx_BxKxM.shape[:2]
    b, k = jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None]
    return (jnp.zeros_like(cache.valid_BxKxS).at[b, k, idx_BxKxM].set(keep_BxKxM),
            cache.token_state['ema'].at[b, k, idx_BxKxM].set(ema_BxKxMxF))

  def _update(self, cache, newest_B):
    """(keep, ema, stats) of an update (the rows buffer is only read)."""
    S = cache.capacity
    sizes = sorted({max(S >> i, 1) for i in range(self.buckets)})
    if len(sizes) == 1:
      keep, ema = self.keep_and_ema(cache, newest_B)
    else:                         # a real branch (not under vmap: evolve.py uses buckets=1)
      i = jnp.searchsorted(jnp.asarray(sizes), cache.valid_BxKxS.sum(-1).max())
      keep, ema = jax.lax.switch(i, [lambda c, n, M=M: self.compact_keep_and_ema(c, n, M)
                                     for M in sizes], cache, newest_B)
    v = cache.valid_BxKxS[..., None].astype(jnp.float32)
    stats = cache.policy_state['stats'] + jnp.stack(
        [jnp.broadcast_to(v.sum((0, 1, 2)), (self.n_feat,)), (ema * v).sum((0, 1, 2)),
         (ema ** 2 * v).sum((0, 1, 2))])
    return keep, ema, stats

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    # The rows are a ring of the last hop + n attention rows, written in place and never
    # cleared (`write` zeroes a new slot's), so an update reads [previous hop rows, n new
    # rows] in ring order and the steps between updates copy nothing: the big buffer is
    # neither moved nor an output of the cond.
    n, T = self.update_interval, probs_BxKxTxS.shape[2]
    ps, ts = cache.policy_state, cache.token_state
    R = ts['rows'].shape[-1]
    W = min(T, R)                                 # a chunk longer than the ring: its newest
    new_BxKxSxW = probs_BxKxTxS[:, :, -W:].swapaxes(2, 3).astype(jnp.float32)
    if W == 1:
      rows = jax.lax.dynamic_update_slice_in_dim(ts['rows'], new_BxKxSxW, ps['written'], -1)
    else:
      rows = ts['rows'].at[..., (ps['written'] + jnp.arange(W)) % R].set(new_BxKxSxW)
    count = ps['count'] + T
    ps = dict(ps, count=count, written=(ps['written'] + W) % R,
              start_B=jnp.where(ps['count'] == 0, pos_BxT[:, 0], ps['start_B']))
    cache = cache.replace(token_state=dict(ts, rows=rows), policy_state=ps)
    keep, ema, stats = jax.lax.cond(
        count >= n, lambda: self._update(cache, pos_BxT.max(-1)),
        lambda: (jnp.ones_like(cache.valid_BxKxS), ts['ema'], ps['stats']))
    return keep, cache.replace(token_state=dict(ema=ema, rows=rows), policy_state=dict(
        ps, count=jnp.where(count >= n, 0, count), stats=stats))


def pooled_stats(layer_states):
  """[count, sum, sumsq] of E summed over NAMM layers (each row [..., F])."""
  return sum(s.policy_state['stats'] for s in layer_states
             if registry.is_kv_cache(s) and 'stats' in (s.policy_state or {}))


def mean_std(stats_3xF):
  """Normalisation statistics (mu, sigma) from pooled [count, sum, sumsq]."""
  n = jnp.maximum(stats_3xF[0], 1.0)
  mu = stats_3xF[1] / n
  return mu, jnp.sqrt(jnp.maximum(stats_3xF[2] / n - mu ** 2, 0.0))


# --- Baselines ---------------------------------------------------------------------------

@struct.dataclass
class H2O(ScorerPress):
  """Heavy-hitter oracle (Zhang et al. 2023): keep the `recent` newest tokens plus those with
  the largest attention accumulated since they entered the cache, `budget` per head."""
  budget: int = static(256)
  recent: int = static(32)

  def init(self, cache):
    return cache.replace(token_state=dict(acc=jnp.zeros(cache.valid_BxKxS.shape)))

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    acc = cache.token_state['acc'] + probs_BxKxTxS.sum(2).astype(jnp.float32)
    return acc, cache.replace(token_state=dict(acc=acc))


@struct.dataclass
class L2Norm(ScorerPress):
  """Key-norm eviction (Devoto et al. 2024): keep the `recent` newest tokens plus the
  tokens with the LOWEST key L2 norm, `budget` per head."""
  budget: int = static(256)
  recent: int = static(32)

  def score(self, cache, probs_BxKxTxS, pos_BxT):
    return -jnp.linalg.norm(cache.k_BxKxSxH.astype(jnp.float32), axis=-1), cache


# --- Registration (models/registry.py) ------------------------------------------------------

def from_config(namm_cfg, theta=None, mu=None, sigma=None):
  """The NAMM policy of a `namm` config section (dict or ConfigDict), with these parameters
  (training/evolve.py load_namm reads an evolve.py run's)."""
  n = namm_cfg
  return NAMM.make(theta, mu, sigma, update_interval=int(n['update_interval']),
                   n_fft=int(n['n_fft']), hop=int(n['hop']), gamma=float(n['gamma']),
                   rec_dim=int(n['rec_dim']), max_freq=float(n['max_freq']),
                   hidden=int(n['hidden']))


def validate_budget(cfg):
  de = cfg.decode
  check(de.budget >= 1, 'decode.budget', f'must be >= 1, got {de.budget}')
  check(0 <= de.recent <= de.budget, 'decode.recent',
        f'must be in [0, decode.budget={de.budget}], got {de.recent}')


def validate(cfg):
  """The `namm` section (and decode.namm_which); evolve.py calls it too."""
  n = cfg.namm
  check(cfg.decode.namm_which in ('best_val', 'mean', 'best'), 'decode.namm_which',
        f'{cfg.decode.namm_which!r} not best_val|mean|best')
  check(n.hop >= 1 and n.n_fft >= n.hop, 'namm.hop', f'need 1 <= hop <= n_fft, got hop={n.hop} '
        f'n_fft={n.n_fft}')
  check(n.update_interval >= n.hop and n.update_interval % n.hop == 0, 'namm.update_interval',
        f'must be a positive multiple of namm.hop={n.hop}, got {n.update_interval}')
  check(n.n_fft == 2 * n.hop, 'namm.n_fft',
        f'the official framing pads one previous hop: n_fft must be 2*hop, got {n.n_fft}')
  check(0 < n.gamma <= 1, 'namm.gamma', f'must be in (0, 1], got {n.gamma}')
  check(n.rec_dim >= 2 and n.rec_dim % 2 == 0, 'namm.rec_dim', f'must be even >= 2, got {n.rec_dim}')
  check(n.hidden >= 1, 'namm.hidden', f'must be >= 1, got {n.hidden}')


BUDGET = {'decode.budget': 256,   # h2o and l2 keep `budget` tokens per head,
          'decode.recent': 32}    # `recent` of them the newest
NAMM_CONFIG = {
    # decode.policy=namm loads an evolve.py run (training/evolve.py load_namm)
    'decode.namm_run': '',            # evolve.py workdir ('' : zero parameters = keep everything)
    'decode.namm_which': 'best_val',  # best_val (shipped: best val mean) | mean (last) | best member
    'namm': dict(
        update_interval=512,    # new tokens between evictions (official 512; prefill_chunk too)
        n_fft=32,               # STFT window = n_fft (periodic Hann), no centring
        hop=16,
        gamma=0.99,             # EMA decay per token
        rec_dim=8,              # sinusoidal recency features
        max_freq=50000.0,
        hidden=32,              # BAM width (4172 parameters with the defaults)
    ),
}
registry.register_policy('h2o', lambda cfg: H2O(int(cfg.decode.budget), int(cfg.decode.recent)),
                         config=BUDGET, validate=validate_budget)
registry.register_policy('l2', lambda cfg: L2Norm(int(cfg.decode.budget), int(cfg.decode.recent)),
                         config=BUDGET, validate=validate_budget)
registry.register_policy('namm', lambda cfg: from_config(cfg.namm), config=NAMM_CONFIG,
                         validate=validate)
