"""Infini-attention (Munkhdalai et al. 2024, arXiv:2404.07143): causal dot-product attention
inside a segment of N tokens plus a compressive memory (M, z) carried across segments,
mixed per head by a learned gate.

Per layer and KV head, for segment s with position-free Q, K (RoPE is only on the local path):

  sigma(x) = ELU(x) + 1                                                  (always > 0)
  A_dot = softmax(Q K^T / sqrt(d_head)) V, causal, inside the segment     (Eq. 2 / 6)
  A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})                           (Eq. 7)
  linear: M_s = M_{s-1} + sigma(K)^T V                                    (Eq. 8)
  delta:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))   (Eq. 9)
          z_s = z_{s-1} + sum_t sigma(K_t)
  A = sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_dot, one beta per head (Eq. 10)
  O = [A_1; ...; A_H] W_O

A segment reads M_{s-1} and then writes; it never reads its own writes. M_0 = z_0 = 0, so the
first segment's read is 0/0: the denominator is clamped at EPS (as lucidrains), which makes
A_mem = 0 there (and the delta term 0), with finite gradients. M and z are fp32 whatever the
compute dtype. With GQA, memory is per KV head (d_head x d_head) and read by its query heads.

Config `model.infini` (configs/base.py): update_rule 'linear' | 'delta'; detach (stop gradients
into the carried memory: truncated BPTT, an ablation only; the default is full BPTT through
(M, z) across the LM's segment scan); gate_init (beta at init; 0 -> gate 0.5 as the paper);
memory (False: segment-local attention only, the baseline). The gate's own learning rate and
no weight decay come from `train.param_groups` (configs/infini.py).

State (`InfiniState`): (M, z) plus, for decoding, the position-free K/V of the current
partial segment (N slots, slot = position mod N); when a chunk ends a segment (absolute
position mod N == N - 1) the slots are folded into (M, z) and cleared. So the state is the
same size for any total length. Chunks must not cross a segment boundary except at their end
(the LM cuts at multiples of N from position 0; decode.prefill_chunk must be a multiple of N).
A chunk of exactly N tokens, or any chunk when the state has no slots (capacity 0), is a whole
segment: fast path, no slots used.

Parameters reuse Attention's wq/wk/wv/wo (so `train.init_from=<plain attention run>` converts a
trained model: "plug and play") plus `beta` [heads].
"""
import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import registry
from models.attention import Attention
from models.layers import constrain, rope
from models.ops.attention import attention, concat_kv
from models.registry import check

EPS = 1e-10


@struct.dataclass
class InfiniState(registry.LayerState):
  M_BxKxHxH: jax.Array          # fp32 memory, d_key x d_value per KV head
  z_BxKxH: jax.Array            # fp32 normaliser
  k_BxSxKxH: jax.Array          # position-free keys of the current partial segment (S = N or 0)
  v_BxSxKxH: jax.Array
  pos_BxS: jax.Array            # int32 absolute positions, -1 in empty slots

  @property
  def slots(self):
    return self.pos_BxS.shape[-1]


def sigma(x):
  """ELU + 1: the positive feature map of the memory."""
  return jax.nn.elu(x) + 1.0


def memory_read(q_BxTxNxH, M_BxKxHxH, z_BxKxH):
  """A_mem = sigma(Q) M / (sigma(Q) z) (Eq. 7), fp32; query heads grouped onto KV heads."""
  B, T, N, H = q_BxTxNxH.shape
  K = M_BxKxHxH.shape[1]
  sq = sigma(q_BxTxNxH.astype(jnp.float32)).reshape(B, T, K, N // K, H)
  num_BxTxKxGxH = jnp.einsum('btkgh,bkhv->btkgv', sq, M_BxKxHxH)
  den_BxTxKxG = jnp.einsum('btkgh,bkh->btkg', sq, z_BxKxH)
  return (num_BxTxKxGxH / jnp.maximum(den_BxTxKxG, EPS)[..., None]).reshape(B, T, N, H)


def memory_update(M_BxKxHxH, z_BxKxH, k_BxTxKxH, v_BxTxKxH, valid_BxT, rule):
  """Writes the valid tokens of one segment: Eq. 8 (linear) or Eq. 9 (delta). fp32."""
  sk = sigma(k_BxTxKxH.astype(jnp.float32)) * valid_BxT[:, :, None, None]
  v = v_BxTxKxH.astype(jnp.float32)
  if rule == 'delta':
    num_BxTxKxH = jnp.einsum('btkh,bkhv->btkv', sk, M_BxKxHxH)
    den_BxTxK = jnp.einsum('btkh,bkh->btk', sk, z_BxKxH)
    v = v - num_BxTxKxH / jnp.maximum(den_BxTxK, EPS)[..., None]
  M = M_BxKxHxH + jnp.einsum('btkh,btkv->bkhv', sk, v)
  return M, z_BxKxH + sk.sum(1)


class InfiniAttention(Attention):
  """Infini-attention mixer: (x_BxTxD, InfiniState, pos_BxT) -> (y_BxTxD, InfiniState)."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    c = cfg.infini
    self.segment_len, self.rule = cfg.segment_len, c.update_rule
    self.detach, self.use_memory = c.detach, c.memory
    self.beta = nnx.Param(jnp.full((self.n_heads,), c.gate_init, jnp.float32),
                          out_sharding=('heads',))

  def init_state(self, batch, capacity, dtype=jnp.float32):
    """(M, z) = 0 and, when the caller keeps context (capacity > 0), N slots for the
    current partial segment: the size does not depend on the total length."""
    K, H = self.kv_heads, self.head_dim
    S = self.segment_len if capacity > 0 else 0
    return InfiniState(jnp.zeros((batch, K, H, H), jnp.float32),
                       jnp.zeros((batch, K, H), jnp.float32),
                       jnp.zeros((batch, S, K, H), dtype), jnp.zeros((batch, S, K, H), dtype),
                       jnp.full((batch, S), -1, jnp.int32))

  def flops_per_token(self, seq_len):
    """Local causal attention inside segments + memory read (and delta) + update, per token."""
    n = min(self.segment_len or seq_len, seq_len)
    local = 4 * self.n_heads * self.head_dim * (n + 1) / 2
    if not self.use_memory:
      return local
    H = self.head_dim
    read = self.n_heads * (2 * H * H + 2 * H)
    write = self.kv_heads * 2 * H * H * (2 if self.rule == 'delta' else 1)
    return local + read + write

  def project(self, x_BxTxD):
    """Position-free Q, K, V (the memory's view); RoPE is applied on the local path only."""
    dt = x_BxTxD.dtype
    q = jnp.einsum('btd,dnh->btnh', x_BxTxD, self.wq[...].astype(dt))
    k = jnp.einsum('btd,dkh->btkh', x_BxTxD, self.wk[...].astype(dt))
    v = jnp.einsum('btd,dkh->btkh', x_BxTxD, self.wv[...].astype(dt))
    q = constrain(q, ('batch', 'seq', 'heads', 'head_dim'))
    k = constrain(k, ('batch', 'seq', 'kv_heads', 'head_dim'))
    return q, k, v

  def __call__(self, x_BxTxD, state: InfiniState, pos_BxT, *, policy=None, tokens_BxT=None):
    del policy, tokens_BxT                      # no eviction: the memory is already constant
    B, T, _ = x_BxTxD.shape
    q, k, v = self.project(x_BxTxD)
    q_rope, k_rope = self._rope(q, pos_BxT), self._rope(k, pos_BxT)
    whole_segment = state.slots == 0 or T == self.segment_len
    if whole_segment:                           # training: one segment, positions contiguous
      tr = lambda a: a.transpose(0, 2, 1, 3)    # [B, T, K, H] -> [B, K, T, H]
      o_dot = attention(q_rope, tr(k_rope), tr(v), impl=self.impl, block=self.block)
    else:
      o_dot = self._attend_partial(q_rope, k_rope, v, state, pos_BxT)
    M, z = state.M_BxKxHxH, state.z_BxKxH
    if self.detach:                             # truncated BPTT (ablation)
      M, z = jax.lax.stop_gradient(M), jax.lax.stop_gradient(z)
    if self.use_memory:
      o_mem = memory_read(q, M, z)              # reads M_{s-1}, before this segment's write
      g_N = jax.nn.sigmoid(self.beta[...])[:, None]
      o = (g_N * o_mem + (1 - g_N) * o_dot.astype(jnp.float32)).astype(x_BxTxD.dtype)
    else:                                       # segment-local baseline (memory unused)
      o = o_dot

    if not whole_segment:                       # decode: keep the partial segment, fold at end
      state = self._write_and_fold(state.replace(M_BxKxHxH=M, z_BxKxH=z), k, v, pos_BxT)
    elif self.use_memory:
      M, z = memory_update(M, z, k, v, jnp.ones((B, T), bool), self.rule)
      state = state.replace(M_BxKxHxH=M, z_BxKxH=z)
    return self.out(o), state

  def _rope(self, x_BxTxNxH, pos_BxT):
    return rope(x_BxTxNxH, pos_BxT, self.rope_theta, self.rope_scaling)

  def _attend_partial(self, q_rope, k_rope, v, state, pos_BxT):
    """Local attention of a chunk over the current segment's earlier tokens (slots) + itself."""
    tr = lambda a: a.transpose(0, 2, 1, 3)     # [B, T, K, H] -> [B, K, T, H]
    k_slots = tr(self._rope(state.k_BxSxKxH.astype(k_rope.dtype), state.pos_BxS))
    pos_BxKxS = jnp.broadcast_to(state.pos_BxS[:, None], k_slots.shape[:3])
    k_all, v_all, pos_all, valid_all = concat_kv(k_slots, tr(state.v_BxSxKxH), pos_BxKxS,
                                                 pos_BxKxS >= 0, tr(k_rope), tr(v), pos_BxT)
    return attention(q_rope, k_all, v_all, q_pos_BxT=pos_BxT, k_pos_BxKxS=pos_all,
                     k_valid_BxKxS=valid_all)

  def _write_and_fold(self, state, k, v, pos_BxT):
    """Stores the chunk's position-free K/V in slots pos mod N; a row whose chunk ends its
    segment folds all its slots into (M, z) (Eq. 8 / 9) and clears them."""
    N = self.segment_len
    slot_BxT = pos_BxT % N
    put = jax.vmap(lambda buf, i, new: buf.at[i].set(new))
    state = state.replace(
        k_BxSxKxH=put(state.k_BxSxKxH, slot_BxT, k.astype(state.k_BxSxKxH.dtype)),
        v_BxSxKxH=put(state.v_BxSxKxH, slot_BxT, v.astype(state.v_BxSxKxH.dtype)),
        pos_BxS=put(state.pos_BxS, slot_BxT, pos_BxT.astype(jnp.int32)))
    done_B = slot_BxT[:, -1] == N - 1

    def fold(state):
      M, z = memory_update(state.M_BxKxHxH, state.z_BxKxH, state.k_BxSxKxH, state.v_BxSxKxH,
                           state.pos_BxS >= 0, self.rule)
      pick = lambda new, old: jnp.where(done_B.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
      return state.replace(M_BxKxHxH=pick(M, state.M_BxKxHxH), z_BxKxH=pick(z, state.z_BxKxH),
                           pos_BxS=pick(jnp.full_like(state.pos_BxS, -1), state.pos_BxS))

    return jax.lax.cond(done_B.any(), fold, lambda s: s, state)


def validate(cfg):
  """model.infini (mixer 'infini')."""
  m = cfg.model
  check(m.infini.update_rule in ('linear', 'delta'), 'model.infini.update_rule',
        f'{m.infini.update_rule!r} not linear|delta')
  check(m.segment_len >= 1, 'model.segment_len',
        'mixer infini needs segments (memory is written per segment): set segment_len >= 1')
  check(cfg.decode.prefill_chunk % m.segment_len == 0, 'decode.prefill_chunk',
        f'{cfg.decode.prefill_chunk} must be a multiple of model.segment_len={m.segment_len} '
        '(infini chunks may not cross a segment boundary)')


CONFIG = {'model.infini': dict(
    update_rule='linear',   # linear (Eq. 8) | delta (Eq. 9) memory update
    detach=False,           # stop gradients into carried (M, z): truncated BPTT (ablation)
    gate_init=0.0,          # beta per head at init; sigmoid(0) = 0.5 mixes memory/local
    memory=True,            # False: segment-local attention only (the baseline)
)}
registry.register_mixer('infini', InfiniAttention, state=InfiniState, config=CONFIG,
                        validate=validate)
