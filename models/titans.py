"""Titans (Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663): neural long-term memory and the
MAC / MAG / MAL / LMM mixers.

Neural memory (Sec 3.1). Per head, a deep MLP M (the "fast weights", fp32, one copy per
sequence) is trained at test time on the associative loss (Eq 12)
    l(M; x_t) = ||M(k_t) - v_t||^2,    k = l2(conv(SiLU(x W_K))), v = conv(SiLU(x W_V)),
with momentum ("surprise") and forgetting (Eq 13-14), on every weight tensor W of M:
    S_t = eta_t S_{t-1} - theta_t grad_W l(M_{t'}; x_t),      M_t = (1 - alpha_t) M_{t-1} + S_t.
Chunked training (Sec 3.2): every token of a chunk of b tokens takes its gradient at
M_{t'}, the state at the end of the previous chunk; inside a chunk the recurrence is
linear, so the chunk-end state has a closed form (Eq 16-18 with momentum):
    S_b = m_b S_0 - sum_j theta_j E[b, j] u_j
    M_b = beta_b M_0 + (sum_i r_i m_i) S_0 - sum_j theta_j g_j u_j
where E[i, j] = prod_{l=j+1..i} eta_l, m_i = E[i, 0], r_i = prod_{l=i+1..b} (1 - alpha_l),
beta_b = r_0, g_j = sum_{i>=j} r_i E[i, j], u_j = grad l(M_0; x_j). A sum sum_j c_j u_j is
the gradient of sum_j c_j l(M_0; x_j): two weighted-loss gradients per chunk, no per-token
weight copies (`chunk_form='closed'`), both from one forward and backward pass
(`backprop`); the backward pass of that chunk step (second order: through the deltas, the
clip and the sums) is written by hand (`chunk_closed`). `chunk_form='scan'` takes the
per-token gradients and runs the momentum and decay recurrences with
`lax.associative_scan` (same numbers; tests check both against a naive per-token loop).
The chunks of a call (a MAC segment's) run as straight-line code (up to `UNROLL`), more as
a `lax.scan` under `jax.checkpoint`.
Reads y_t = M*(q_t) (Eq 15) are causal: a token reads the memory at the start of its chunk
(the state its own gradient is taken at), so no token sees its chunk's writes.
Gates are data dependent, per head and token: theta = theta_max sigmoid(.), eta = sigmoid(.),
alpha = sigmoid(.) of linear maps of x (momentum / forgetting can be switched off).
Memory net: L_M = 1: M(x) = x W (linear); L_M >= 2: M(x) = x + MLP(x) with GELU, hidden
width expansion * head_dim (the NeurIPS version's LayerNorm on the branch is left out:
see `mlp`); M_0 is learned.

MAC (Sec 4.1, Eq 21-25) on segments of C = model.segment_len tokens:
    h = M*_{t-1}(q)                         retrieval with the memory after previous segments
    y = Attn(P || h || S)                   causal inside the segment: token i sees all
                                            persistent tokens P, h_<=i and S_<=i
    M_t = M_{t-1}(w)                        w is written, chunk by chunk: w = x + y
                                            (model.titans.mac_write='residual', default)
                                            or w = y (Eq 24 literally, 'y')
    o = RMSNorm(y) * sigmoid(RMSNorm(M*(y)))  memory read causally (chunk start)
Why 'residual' by default: at init the attention output y is mostly a component common to
all tokens (uniform attention over the persistent tokens and the prefix: 42% of its energy,
keys written from y have mean pairwise cosine 0.49 vs 0.12 from x), so the memory cannot
tell the written tokens apart; on the recall task of bench/results/titans.md (L = 64, 2
segments; its script since retired for bench/zoology.py) writing y
stayed at chance for 1000 steps while writing x + y learned (bench/results/titans.md).
RoPE inside a segment uses segment-relative positions (h_i and S_i share position i);
persistent keys are position-free (scored with the unrotated query).
MAG (Eq 26-28): o = RMSNorm(SWA(P || x)) * sigmoid(RMSNorm(M(x))), memory over the whole
sequence. MAL (Eq 29-31): m = M(x); o = m + SWA(P || x + m). LMM: o = M(x) alone.

State and decode. Multi-token calls must start at a segment boundary (MAC) or a chunk
boundary (LMM/MAG/MAL: the LM's segments and prefills do; `decode.prefill_chunk` must be
a multiple of segment_len / chunk, checked by the config); otherwise the output is NaN.
Single tokens: the LMM keeps (M at the chunk start, running M, S) and folds each token
into the running state with its gradient at the chunk start; MAC keeps the current
segment's inputs and recomputes that segment (exactly as the full forward would) each
step, committing the memory when the segment completes.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import registry
from models.attention import Attention, KVCache, write
from models.layers import DTYPES, RMSNorm, param, rope
from models.ops.attention import attention, concat_kv
from models.registry import check

# --- Fast weights: the memory MLP and its associative loss (pure functions) -----------------

def mlp(w, x_BxNxTxH):
  """M(x) per (batch row, head); w: {'w0'.. 'w{L-1}': [B, N, in, out]}.

  L = 1: x W0 (linear memory). L >= 2: x + W_{L-1}(GELU(... GELU(x W0))) (residual MLP).
  The NeurIPS version adds a LayerNorm on the MLP branch; inside the inner loop it makes M
  invariant to the scale of W, so forgetting (weight decay) shrinks W and the effective
  inner step grows as 1/|W|: it diverged within 1K tokens at every theta_max >= 0.1 we
  tried, so it is left out (see bench/results/titans.md).
  """
  return mlp_layers(w, x_BxNxTxH)[0]


def mlp_layers(w, x_BxNxTxH):
  """(M(x), acts, slopes, pres): per layer i its input a_i, and for the hidden layers GELU'
  and the pre-activation z (a_{i+1} = GELU(z_i); unused outputs cost nothing)."""
  depth = len(w)
  h, acts, slopes, pres = x_BxNxTxH, [], [], []
  for i in range(depth):
    acts.append(h)
    h = jnp.einsum('bnti,bnio->bnto', h, w[f'w{i}'])
    if i < depth - 1:
      pres.append(h)
      h, slope = jax.jvp(jax.nn.gelu, (h,), (jnp.ones_like(h),))    # elementwise: GELU'(h)
      slopes.append(slope)
  return (h if depth == 1 else x_BxNxTxH + h), acts, slopes, pres


def token_losses(w, k_BxNxTxH, v_BxNxTxH):
  """l(M; x_t) = ||M(k_t) - v_t||^2 for every token: [B, N, T] (Eq 12). The update uses
  its gradients through `backprop`; tests check those against autodiff of this."""
  return ((mlp(w, k_BxNxTxH) - v_BxNxTxH) ** 2).sum(-1)


def backprop(w, k_BxNxTxH, v_BxNxTxH, q_BxNxSxH=None):
  """One forward and one backward pass of l(M; x_t) for every token, by hand: (acts,
  deltas), per layer i its input a_i and the loss gradient d_i at its output, [B, N, T, .],
  and with queries q also the reads M(q) [B, N, S, H], from the same forward pass (one
  contraction per layer for keys and queries together).
  Token t's gradient of layer i is the outer product a_i,t^T d_i,t: never formed, since
  everything the update needs is a sum over tokens (`weighted_grads`) or a norm
  (`grad_norms`). Autodiff would redo the forward and the whole backward for each."""
  T = k_BxNxTxH.shape[2]
  fw = _backprop(w, k_BxNxTxH, v_BxNxTxH, q_BxNxSxH)
  acts = [a[:, :, :T] for a in fw['acts']]
  return (acts, fw['deltas']) if q_BxNxSxH is None else (acts, fw['deltas'], fw['out'][:, :, T:])


def _backprop(w, k_BxNxTxH, v_BxNxTxH, q_BxNxSxH=None):
  """`backprop`'s passes, everything kept: acts and pres over keys and queries, and per
  hidden layer i the pre-slope backward d_{i+1} W_{i+1}^T ('backs')."""
  T = k_BxNxTxH.shape[2]
  x = k_BxNxTxH if q_BxNxSxH is None else jnp.concatenate([k_BxNxTxH, q_BxNxSxH], 2)
  out, acts, slopes, pres = mlp_layers(w, x)
  deltas, backs = [2.0 * (out[:, :, :T] - v_BxNxTxH)], []
  for i in range(len(w) - 1, 0, -1):
    backs.insert(0, jnp.einsum('bnto,bnio->bnti', deltas[0], w[f'w{i}']))
    deltas.insert(0, backs[0] * slopes[i - 1][:, :, :T])
  return dict(out=out, acts=acts, pres=pres, deltas=deltas, backs=backs)


def weighted_grads(acts, deltas, coefs_BxNxCxT):
  """grad_W sum_t c_t l(W; x_t) for each of C coefficient rows c: per layer
  sum_t c_t a_t^T d_t, one contraction for all rows; leaves [C, B, N, in, out] (rows
  leading: each row's sum is a contiguous slice)."""
  return {f'w{i}': jnp.einsum('bnct,bnti,bnto->cbnio', coefs_BxNxCxT, a, d)
          for i, (a, d) in enumerate(zip(acts, deltas))}


def grad_norms(acts, deltas):
  """|grad_W l(W; x_t)| (all layers, Frobenius) for every token [B, N, T]: the norm of an
  outer product a^T d is |a| |d|."""
  sq = sum((a * a).sum(-1) * (d * d).sum(-1) for a, d in zip(acts, deltas))
  return jnp.sqrt(sq + 1e-12)


def clipped_theta(theta_BxNxT, acts, deltas, clip):
  """theta_t / sqrt(1 + (|u_t| / clip)^2): a soft cap clip on each token's step |theta u|
  / theta (deep memories diverge without it, see `mlp`). clip = 0: theta unchanged."""
  if not clip:
    return theta_BxNxT
  return theta_BxNxT * jax.lax.rsqrt(1.0 + (grad_norms(acts, deltas) / clip) ** 2)


def _bcast(c_BxN, x):
  return c_BxN.reshape(c_BxN.shape + (1,) * (x.ndim - c_BxN.ndim)) * x


def seg_prod(g_BxNxn):
  """P[..., i, j] = prod_{l=j+1..i} g_l for 0 <= j <= i <= n (g indexed 1..n); 0 for j > i.
  As exp(sum of logs) over a constant 0/1 mask: one small matmul, whose gradient is cheap
  (a product's gradient is a chain of pads and cumulative products); a zero gate gives
  log -1e4, so its products are exactly 0."""
  n = g_BxNxn.shape[-1]
  idx, l = jnp.arange(n + 1), jnp.arange(1, n + 1)
  inside = ((l > idx[None, :, None]) & (l <= idx[:, None, None])).astype(g_BxNxn.dtype)
  pos = g_BxNxn > 0
  log_g = jnp.where(pos, jnp.log(jnp.where(pos, g_BxNxn, 1.0)), -1e4)
  p = jnp.exp(jnp.einsum('ijl,...l->...ij', inside, log_g))
  return jnp.where(idx[:, None] >= idx[None, :], p, 0.0)


def closed_gate_terms(eta, alpha):
  """What the closed form needs from the gates of chunks of n tokens (any leading axes):
  the weights of its two gradient sums, E[n, j] and g_j, and m_n, r_0, sum_i r_i m_i.
  They do not depend on the memory, so a sequence's chunks get them in one batch."""
  n = eta.shape[-1]
  E = seg_prod(eta)                        # [..., n+1, n+1]
  r = seg_prod(1.0 - alpha)[..., n, :]     # r_i = prod_{l=i+1..n} (1 - alpha_l), i = 0..n
  m = E[..., :, 0]                         # m_i = prod_{l<=i} eta_l
  g = jnp.einsum('...ij,...i->...j', E[..., 1:, 1:], r[..., 1:])
  return E[..., n, 1:], g, m[..., n], r[..., 0], (r[..., 1:] * m[..., 1:]).sum(-1)


def chunk_update_closed(w, s, acts, deltas, theta, gate_terms):
  """(M_b, S_b) after one chunk, gradients at M_0 = w (`backprop(w, k, v)`): the closed
  form (module docstring), with `closed_gate_terms(eta, alpha)`."""
  e_n, g, m_n, r_0, coef_ms = gate_terms
  grads = weighted_grads(acts, deltas, jnp.stack([theta * e_n, theta * g], 2))
  s_new = jax.tree.map(lambda s0, gr: _bcast(m_n, s0) - gr[0], s, grads)
  w_new = jax.tree.map(lambda w0, s0, gr: _bcast(r_0, w0) + _bcast(coef_ms, s0) - gr[1],
                       w, s, grads)
  return w_new, s_new


def chunk_update_scan(w, s, acts, deltas, theta, gate_terms):
  """Same as `chunk_update_closed`, with per-token gradients and associative scans (Eq 18);
  gate_terms = (eta, alpha)."""
  eta, alpha = gate_terms
  u = {f'w{i}': jnp.einsum('bnti,bnto->tbnio', a, d)             # leaves [n, B, N, ...]
       for i, (a, d) in enumerate(zip(acts, deltas))}
  t_first = lambda a_BxNxn: jnp.moveaxis(a_BxNxn, -1, 0)        # [n, B, N]

  def linear_scan(gates_nxBxN, inputs, init):
    """x_i = gate_i x_{i-1} + input_i from x_0 = init; returns x_n."""
    def op(a, b):
      return a[0] * b[0], _bcast(b[0], a[1]) + b[1]
    cum_gate, acc = jax.lax.associative_scan(op, (gates_nxBxN, inputs))
    return _bcast(cum_gate, init[None]) + acc                    # every x_i: [n, B, N, ...]

  def per_leaf(w0, s0, u_):
    s_all = linear_scan(t_first(eta), -_bcast(t_first(theta), u_), s0)
    w_all = linear_scan(t_first(1.0 - alpha), s_all, w0)
    return w_all[-1], s_all[-1]

  out = jax.tree.map(per_leaf, w, s, u)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda p: p[0], out, is_leaf=is_pair),
          jax.tree.map(lambda p: p[1], out, is_leaf=is_pair))


def chunk_autodiff(update, w, s, q, k, v, theta, gate_terms, clip):
  """One chunk from (M_0, S_0) = (w, s): ((M_b, S_b), reads M_0(q)), by `backprop`,
  `clipped_theta` and `update` (a chunk_update_*), differentiated by JAX."""
  acts, deltas, reads = backprop(w, k, v, q)
  theta = clipped_theta(theta, acts, deltas, clip)
  return update(w, s, acts, deltas, theta, gate_terms), reads


def _gelu_derivatives(z):
  """(GELU'(z), GELU''(z)), elementwise."""
  d1 = lambda z: jax.jvp(jax.nn.gelu, (z,), (jnp.ones_like(z),))[1]
  return jax.jvp(d1, (z,), (jnp.ones_like(z),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def chunk_closed(w, s, q, k, v, theta, gate_terms, clip):
  """`chunk_autodiff(chunk_update_closed, ...)` with a hand-written backward pass: the
  memory's second-order chain (through the deltas, the clip and the weighted sums) in a
  few batched contractions per layer, instead of autodiff's trace of every forward op
  (tests check both against each other, values and gradients)."""
  return _chunk_closed_fwd(w, s, q, k, v, theta, gate_terms, clip)[0]


def _chunk_closed_fwd(w, s, q, k, v, theta, gate_terms, clip):
  T = k.shape[2]
  fw = _backprop(w, k, v, q)
  acts, deltas = [a[:, :, :T] for a in fw['acts']], fw['deltas']
  rho = clipped_theta(jnp.ones_like(theta), acts, deltas, clip)    # theta's factor
  new = chunk_update_closed(w, s, acts, deltas, theta * rho, gate_terms)
  res = (w, s, fw['acts'], fw['pres'], deltas, fw['backs'], theta, rho, gate_terms)
  return (new, fw['out'][:, :, T:]), res


def _chunk_closed_bwd(clip, res, cts):
  w, s, hs, pres, deltas, backs, theta, rho, (e_n, g, m_n, r_0, coef_ms) = res
  (w_bar_new, s_bar_new), reads_bar = cts
  T, L = deltas[0].shape[2], len(w)
  names = [f'w{i}' for i in range(L)]
  acts = [h[:, :, :T] for h in hs]
  keys_rows = lambda a_BxNxTx_: jnp.pad(a_BxNxTx_, ((0, 0), (0, 0), (0, hs[0].shape[2] - T),
                                                    (0, 0)))
  # the state update: S_b = m_n S_0 - G_e, M_b = r_0 M_0 + coef_ms S_0 - G_g
  inner = lambda a, b: sum((a[n] * b[n]).sum((-2, -1)) for n in names)
  gate_bars = [inner(s_bar_new, s), inner(w_bar_new, w), inner(w_bar_new, s)]
  s_bar = {n: _bcast(m_n, s_bar_new[n]) + _bcast(coef_ms, w_bar_new[n]) for n in names}
  w_bar = {n: _bcast(r_0, w_bar_new[n]) for n in names}
  # G_c = sum_t c_ct a_t^T d_t, c = theta rho (e_n, g): the bars of c, a and d
  tc = theta * rho
  c = tc[:, :, None] * jnp.stack([e_n, g], 2)                        # [B, N, 2, T]
  c_bar, a_bar, d_bar = 0.0, [], []
  for i, n in enumerate(names):
    g_bar = -jnp.stack([s_bar_new[n], w_bar_new[n]])                 # [2, B, N, in, out]
    a_g = jnp.einsum('bnti,cbnio->cbnto', acts[i], g_bar)
    c_bar = c_bar + jnp.einsum('cbnto,bnto->bnct', a_g, deltas[i])
    d_bar.append(jnp.einsum('bnct,cbnto->bnto', c, a_g))
    a_bar.append(jnp.einsum('bnct,cbnio,bnto->bnti', c, g_bar, deltas[i]))
  tc_bar = c_bar[:, :, 0] * e_n + c_bar[:, :, 1] * g                  # bar of theta rho
  e_bar, g_bar_ = c_bar[:, :, 0] * tc, c_bar[:, :, 1] * tc
  theta_bar = tc_bar * rho
  if clip:      # rho = (1 + sq / clip^2)^(-1/2), sq = sum_i |a_i|^2 |d_i|^2
    sq_bar = -tc_bar * theta * rho ** 3 / (2 * clip ** 2)
    for i in range(L):
      a2, d2 = (acts[i] ** 2).sum(-1), (deltas[i] ** 2).sum(-1)
      a_bar[i] = a_bar[i] + (2 * sq_bar * d2)[..., None] * acts[i]
      d_bar[i] = d_bar[i] + (2 * sq_bar * a2)[..., None] * deltas[i]
  # the deltas: d_{i-1} = (d_i W_i^T) * GELU'(z_{i-1}), from the bottom layer up
  slope_bar = []
  for i in range(1, L):
    e = d_bar[i - 1] * _gelu_derivatives(pres[i - 1][:, :, :T])[0]
    d_bar[i] = d_bar[i] + jnp.einsum('bnti,bnio->bnto', e, w[names[i]])
    w_bar[names[i]] = w_bar[names[i]] + jnp.einsum('bnti,bnto->bnio', e, deltas[i])
    slope_bar.append(d_bar[i - 1] * backs[i - 1])
  # d_{L-1} = 2 (M(k) - v); then the forward pass over keys and queries
  v_bar = -2.0 * d_bar[L - 1]
  z_bar = jnp.concatenate([2.0 * d_bar[L - 1], reads_bar], 2)       # bar of M(x)
  x_bar = z_bar if L > 1 else 0.0                                   # the residual
  for i in range(L - 1, -1, -1):
    w_bar[names[i]] = w_bar[names[i]] + jnp.einsum('bnti,bnto->bnio', hs[i], z_bar)
    h_bar = jnp.einsum('bnto,bnio->bnti', z_bar, w[names[i]]) + keys_rows(a_bar[i])
    if i:
      d1, d2 = _gelu_derivatives(pres[i - 1])
      z_bar = h_bar * d1 + keys_rows(slope_bar[i - 1]) * d2
    else:
      x_bar = x_bar + h_bar
  return (w_bar, s_bar, x_bar[:, :, T:], x_bar[:, :, :T], v_bar, theta_bar,
          (e_bar, g_bar_, *gate_bars))


chunk_closed.defvjp(_chunk_closed_fwd, _chunk_closed_bwd)


# chunk_form -> (gate terms from (eta, alpha), update of one chunk, the whole chunk step)
UPDATES = {'closed': (closed_gate_terms, chunk_update_closed, chunk_closed),
           'scan': (lambda eta, alpha: (eta, alpha), chunk_update_scan,
                    functools.partial(chunk_autodiff, chunk_update_scan))}


# Chunks per call run as straight-line code up to this many (a MAC segment's C / b), more as
# a checkpointed lax.scan over this many per iteration: a loop stacks every residual of its
# body per iteration (XLA ops of one 64-token segment's memory, forward + backward, b = 4:
# 1,352 straight, 1,700 in iterations of 8, 2,090 one chunk per iteration), while straight-line
# code grows the compile (the 340m preset's 32 chunks straight: > 30 min on 2 busy cores).
UNROLL = 8


@struct.dataclass
class MemState(registry.LayerState):
  w_base: dict        # fast weights at the last chunk boundary: reads + gradients of this chunk
  w: dict             # fast weights after every token seen
  s: dict             # surprise (momentum)
  conv: jax.Array     # [B, K-1, 3, N, H] last pre-conv q, k, v projections


def _p(value, axes):
  return nnx.Param(value, out_sharding=tuple(axes))


class NeuralMemory(nnx.Module):
  """The long-term memory module (LMM): projections, gates, M_0 and the chunked update."""

  def __init__(self, cfg, *, rngs):
    t = cfg.titans
    D, N, H = cfg.d_model, cfg.n_heads, cfg.head_dim
    E = t.expansion * H
    self.heads, self.head_dim, self.chunk, self.kernel = N, H, t.chunk, t.conv
    self.theta_max, self.momentum, self.forget = t.theta_max, t.momentum, t.forget
    self.grad_clip = t.grad_clip
    self.gate_terms, _, self.chunk_step = UPDATES[t.chunk_form]
    for name in 'qkv':
      setattr(self, 'w' + name, param(rngs, (D, N, H), ('embed', 'heads', 'head_dim'),
                                      scale=D ** -0.5))
      if t.conv:                    # depthwise causal conv, initialised to the identity
        setattr(self, 'conv_' + name, _p(jnp.zeros((t.conv, N, H)).at[-1].set(1.0),
                                         ('conv', 'heads', 'head_dim')))
    self.w_gates = param(rngs, (D, 3, N), ('embed', 'gate', 'heads'), scale=0.1 * D ** -0.5)
    bias = jnp.asarray(t.gate_bias, jnp.float32)              # theta, eta, alpha (pre-sigmoid)
    self.b_gates = _p(jnp.broadcast_to(bias[:, None], (3, N)), ('gate', 'heads'))
    dims = [H] + [E] * (t.depth - 1) + [H]
    for i in range(t.depth):
      setattr(self, f'init_w{i}', param(rngs, (N, dims[i], dims[i + 1]),
                                        ('heads', 'mem_in', 'mem_out'), scale=dims[i] ** -0.5))
    self.depth = t.depth
    self.wo = param(rngs, (N, H, D), ('heads', 'head_dim', 'embed'), scale=(N * H) ** -0.5)

  # --- state ---
  def initial_weights(self, batch):
    names = [f'w{i}' for i in range(self.depth)]
    return {n: jnp.broadcast_to(getattr(self, 'init_' + n)[...],
                                (batch,) + getattr(self, 'init_' + n).shape) for n in names}

  def init_state(self, batch):
    w = self.initial_weights(batch)
    conv = jnp.zeros((batch, max(self.kernel - 1, 0), 3, self.heads, self.head_dim))
    return MemState(w, w, jax.tree.map(jnp.zeros_like, w), conv)

  def fast_weight_size(self):
    return sum(getattr(self, f'init_w{i}').size for i in range(self.depth)) // self.heads

  # --- projections and gates ---
  def project(self, x_BxTxD, conv_BxKxPxNxH, kinds='qkv'):
    """(q, k, v projections of `kinds`, each [B,T,N,H] fp32, new conv buffer). Eq 11 + conv."""
    x = x_BxTxD.astype(jnp.float32)
    w_DxPxNxH = jnp.stack([getattr(self, 'w' + c)[...] for c in kinds], 1)
    z = jax.nn.silu(jnp.einsum('btd,dpnh->btpnh', x, w_DxPxNxH))  # [B, T, P, N, H]: one matmul
    if self.kernel:
      K, T = self.kernel, x.shape[1]
      zz = jnp.concatenate([conv_BxKxPxNxH.astype(jnp.float32), z], 1)
      taps = jnp.stack([getattr(self, 'conv_' + c)[...] for c in kinds], 1)   # [K, P, N, H]
      win = jnp.stack([zz[:, j:j + T] for j in range(K)], -1)              # [B, T, P, N, H, K]
      z = jnp.einsum('btpnhk,kpnh->btpnh', win, taps)   # taps' gradient: one reduction, not K
      conv_BxKxPxNxH = zz[:, T:]
    out = []
    for i, c in enumerate(kinds):
      zi = z[:, :, i]
      if c in 'qk':
        zi = zi * jax.lax.rsqrt((zi * zi).sum(-1, keepdims=True) + 1e-6)
      out.append(zi)
    return out, conv_BxKxPxNxH

  def gates(self, x_BxTxD):
    """theta, eta, alpha [B, N, T]: learning rate (capped), momentum, forgetting."""
    g = jnp.einsum('btd,dgn->bgnt', x_BxTxD.astype(jnp.float32), self.w_gates[...])
    g = g + self.b_gates[...][None, :, :, None]
    theta = self.theta_max * jax.nn.sigmoid(g[:, 0])
    eta = jax.nn.sigmoid(g[:, 1]) if self.momentum else jnp.zeros_like(theta)
    alpha = jax.nn.sigmoid(g[:, 2]) if self.forget else jnp.zeros_like(theta)
    return theta, eta, alpha

  def read(self, w, q_BxTxNxH):
    """M*(q): forward pass without update (Eq 15). [B, T, N, H]."""
    return mlp(w, q_BxTxNxH.swapaxes(1, 2)).swapaxes(1, 2)

  def out(self, m_BxTxNxH, dtype):
    return jnp.einsum('btnh,nhd->btd', m_BxTxNxH, self.wo[...]).astype(dtype)

  # --- the memory over a stream ---
  def forward(self, x_BxTxD, state: MemState):
    """Reads (at each token's chunk start) and writes of T tokens starting at a chunk
    boundary. Returns reads [B, T, N, H] and the new state."""
    (q, k, v), conv = self.project(x_BxTxD, state.conv)
    q, k, v = (a.swapaxes(1, 2) for a in (q, k, v))             # [B, N, T, H]
    theta, eta, alpha = self.gates(x_BxTxD)
    T, b = x_BxTxD.shape[1], self.chunk
    nf, rem = divmod(T, b)
    w, s, reads = state.w, state.s, []

    def body(carry, xs):
      return self.chunk_step(*carry, *xs, self.grad_clip)

    def inputs(cut):
      q_, k_, v_, theta_, eta_, alpha_ = map(cut, (q, k, v, theta, eta, alpha))
      return q_, k_, v_, theta_, self.gate_terms(eta_, alpha_)

    if 0 < nf <= UNROLL:      # straight-line code: no loop plumbing, XLA fuses across chunks
      xs = inputs(lambda a: a[:, :, :nf * b].reshape(a.shape[:2] + (nf, b) + a.shape[3:]))
      for c in range(nf):
        (w, s), r = body((w, s), jax.tree.map(lambda a: a[:, :, c], xs))
        reads.append(r)
    elif nf:
      chunks = lambda a: jnp.moveaxis(a[:, :, :nf * b].reshape(a.shape[:2] + (nf, b) + a.shape[3:]), 2, 0)
      (w, s), reads_FxBxNxbxH = jax.lax.scan(jax.checkpoint(body), (w, s), inputs(chunks),
                                             unroll=UNROLL)
      B, N = q.shape[:2]
      reads.append(jnp.moveaxis(reads_FxBxNxbxH, 0, 2).reshape(B, N, nf * b, -1))
    w_base = w
    if rem:
      (w, s), r = body((w, s), inputs(lambda a: a[:, :, nf * b:]))
      reads.append(r)
    reads = jnp.concatenate(reads, 2).swapaxes(1, 2)
    return reads, MemState(w_base, w, s, conv)

  def step(self, x_Bx1xD, state: MemState, pos_B):
    """One token: read M at its chunk start, fold its gradient (taken there) into the
    running (M, S); at a chunk end the running M becomes the new chunk start."""
    (q, k, v), conv = self.project(x_Bx1xD, state.conv)
    q, k, v = (a.swapaxes(1, 2) for a in (q, k, v))
    theta, eta, alpha = self.gates(x_Bx1xD)
    reads = mlp(state.w_base, q).swapaxes(1, 2)
    acts, deltas = backprop(state.w_base, k, v)
    theta = clipped_theta(theta, acts, deltas, self.grad_clip)
    u = jax.tree.map(lambda g: g[0], weighted_grads(acts, deltas, theta[:, :, None]))
    s = jax.tree.map(lambda s0, u_: _bcast(eta[..., 0], s0) - u_, state.s, u)
    w = jax.tree.map(lambda w0, s_: _bcast(1.0 - alpha[..., 0], w0) + s_, state.w, s)
    boundary_B = (pos_B + 1) % self.chunk == 0
    w_base = jax.tree.map(
        lambda a, b: jnp.where(boundary_B.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
        w, state.w_base)
    return reads, MemState(w_base, w, s, conv)

  def run(self, x_BxTxD, state: MemState, pos_BxT):
    """`step` for one token, else `forward` (NaN unless it starts at a chunk boundary)."""
    if x_BxTxD.shape[1] == 1:
      return self.step(x_BxTxD, state, pos_BxT[:, 0])
    reads, state = self.forward(x_BxTxD, state)
    return _nan_unless(pos_BxT[:, 0] % self.chunk == 0, reads), state

  def flops_per_token(self):
    """Read (2P) + loss forward (2P) + two weighted VJPs (2 x 4P) per head, P fast weights."""
    return 12 * self.heads * self.fast_weight_size()


def _nan_unless(ok_B, y_BxT_):
  return jnp.where(ok_B.reshape((-1,) + (1,) * (y_BxT_.ndim - 1)), y_BxT_, jnp.nan)


# --- attention with position-free persistent tokens ------------------------------------------

class _PersistentAttention(Attention):
  """Attention (same wq/wk/wv/wo as models.attention) plus N_p learned persistent tokens."""

  def __init__(self, cfg, *, window=0, rngs):
    super().__init__(cfg, window=window, rngs=rngs)
    self.n_persist = cfg.titans.persistent
    if self.n_persist:
      self.persistent = param(rngs, (self.n_persist, cfg.d_model), ('persist', 'embed'), scale=1.0)
    self.memory = NeuralMemory(cfg, rngs=rngs)

  def proj(self, x_BxTxD, pos_BxT):
    dt = x_BxTxD.dtype
    qraw = jnp.einsum('btd,dnh->btnh', x_BxTxD, self.wq[...].astype(dt))
    k = jnp.einsum('btd,dkh->bkth', x_BxTxD, self.wk[...].astype(dt))
    v = jnp.einsum('btd,dkh->bkth', x_BxTxD, self.wv[...].astype(dt))
    k = rope(k.swapaxes(1, 2), pos_BxT, self.rope_theta, self.rope_scaling).swapaxes(1, 2)
    return rope(qraw, pos_BxT, self.rope_theta, self.rope_scaling), qraw, k, v

  def prefix(self, qraw_BxTxNxH):
    """The attention op's persistent prefix: (unrotated query, keys, values of the N_p
    persistent tokens), or None without them."""
    if not self.n_persist:
      return None
    dt = qraw_BxTxNxH.dtype
    p = self.persistent[...].astype(dt)
    return (qraw_BxTxNxH, jnp.einsum('pd,dkh->kph', p, self.wk[...].astype(dt)),
            jnp.einsum('pd,dkh->kph', p, self.wv[...].astype(dt)))

  def swa(self, x_BxTxD, cache: KVCache, pos_BxT):
    """Sliding-window causal attention over (P || cached tokens || x). Returns y, cache."""
    q, qraw, k, v = self.proj(x_BxTxD, pos_BxT)
    if cache.capacity == 0:        # one chunk at positions 0..T-1: model.attention_impl's backend
      return self.out(attention(q, k, v, impl=self.impl, block=self.block, window=self.window,
                                prefix=self.prefix(qraw))), cache
    k_all, v_all, pos_all, valid_all = concat_kv(cache.k_BxKxSxH, cache.v_BxKxSxH,
                                                 cache.pos_BxKxS, cache.valid_BxKxS, k, v, pos_BxT)
    o = attention(q, k_all, v_all, q_pos_BxT=pos_BxT, k_pos_BxKxS=pos_all,
                  k_valid_BxKxS=valid_all, window=self.window,
                  prefix=self.prefix(qraw))
    cache, _ = write(cache, k, v, pos_BxT)
    return self.out(o), cache

  def swa_flops(self, seq_len):
    return super().flops_per_token(seq_len) + 4 * self.n_heads * self.head_dim * self.n_persist


# --- mixers -------------------------------------------------------------------------------

class LMM(nnx.Module):
  """Memory-only layer ("Titans (LMM)"): o = W_O M*(q), read at each token's chunk start."""

  def __init__(self, cfg, *, rngs):
    self.memory = NeuralMemory(cfg, rngs=rngs)

  def init_state(self, batch, capacity):
    return self.memory.init_state(batch)

  def flops_per_token(self, seq_len):
    return self.memory.flops_per_token()

  def __call__(self, x_BxTxD, state, pos_BxT, *, policy=None, tokens_BxT=None):
    m, state = self.memory.run(x_BxTxD, state, pos_BxT)
    return self.memory.out(m, x_BxTxD.dtype), state


class _WindowedMemory(_PersistentAttention):
  """Sliding-window attention (model.window) + a memory over the whole stream."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, window=cfg.window, rngs=rngs)

  def init_state(self, batch, capacity):
    return super().init_state(batch, capacity), self.memory.init_state(batch)

  def flops_per_token(self, seq_len):
    return self.swa_flops(seq_len) + self.memory.flops_per_token()


class MAG(_WindowedMemory):
  """Memory as a gate (Eq 26-28): RMSNorm(SWA(P || x)) * sigmoid(RMSNorm(M(x)))."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.norm_y = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.norm_m = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)

  def __call__(self, x_BxTxD, state, pos_BxT, *, policy=None, tokens_BxT=None):
    cache, mem = state
    y, cache = self.swa(x_BxTxD, cache, pos_BxT)
    m, mem = self.memory.run(x_BxTxD, mem, pos_BxT)
    o = self.norm_y(y) * jax.nn.sigmoid(self.norm_m(self.memory.out(m, y.dtype)))
    return o, (cache, mem)


class MAL(_WindowedMemory):
  """Memory as a layer (Eq 29-31): m = M(x); o = m + SWA(P || x + m)."""

  def __call__(self, x_BxTxD, state, pos_BxT, *, policy=None, tokens_BxT=None):
    cache, mem = state
    m, mem = self.memory.run(x_BxTxD, mem, pos_BxT)
    m = self.memory.out(m, x_BxTxD.dtype)
    y, cache = self.swa(x_BxTxD + m, cache, pos_BxT)
    return m + y, (cache, mem)


@struct.dataclass
class MACState(registry.LayerState):
  mem: MemState        # memory after the completed segments (y-stream conv buffer inside)
  conv_x: jax.Array    # [B, K-1, 1, N, H] retrieval-query conv buffer (x stream)
  buf_BxCxD: jax.Array  # inputs of the current, incomplete segment


class MAC(_PersistentAttention):
  """Memory as a context (Eq 21-25); see the module docstring. Segment length C =
  model.segment_len; attention never crosses a segment (the memory does)."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.segment = cfg.segment_len
    self.write_residual = {'y': False, 'residual': True}[cfg.titans.mac_write]
    self.dtype = DTYPES[cfg.dtype]
    self.norm_y = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.norm_m = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)

  def init_state(self, batch, capacity):
    mem = self.memory.init_state(batch)
    conv_x = jnp.zeros(mem.conv.shape[:2] + (1,) + mem.conv.shape[3:])
    return MACState(mem, conv_x, jnp.zeros((batch, self.segment, self.d_model), self.dtype))

  @property
  def d_model(self):
    return self.wq.shape[0]

  def flops_per_token(self, seq_len):
    C = min(self.segment, seq_len)
    keys = self.n_persist + (C + 1)          # mean over the segment of N_p + 2 (i + 1)
    return (4 * self.n_heads * self.head_dim * keys
            + self.memory.flops_per_token() + 2 * self.n_heads * self.memory.fast_weight_size())

  def segment_forward(self, x_BxLxD, state: MACState):
    """One segment (or its first L tokens) from the state after the previous segments.
    Returns the outputs and the state after writing all L tokens."""
    B, L, _ = x_BxLxD.shape
    mem = state.mem
    (q_ret,), conv_x = self.memory.project(x_BxLxD, state.conv_x, 'q')
    h = self.memory.out(self.memory.read(mem.w, q_ret), x_BxLxD.dtype)      # Eq 21
    rel = jnp.arange(L, dtype=jnp.int32)
    # h and x projected together (one matmul each for q, k, v; h's queries are unused):
    # keys and values come out in the attention's order, h_0..h_{L-1} then x_0..x_{L-1}
    q, qraw, k, v = self.proj(jnp.concatenate([h, x_BxLxD], 1),
                              jnp.broadcast_to(jnp.concatenate([rel, rel]), (B, 2 * L)))
    q, qraw = q[:, L:], qraw[:, L:]
    causal_LxL = jnp.tril(jnp.ones((L, L), bool))
    mask = jnp.broadcast_to(jnp.concatenate([causal_LxL, causal_LxL], 1), (B, self.kv_heads, L, 2 * L))
    o = attention(q, k, v, mask_BxKxTxS=mask, prefix=self.prefix(qraw))            # Eq 22-23
    y = self.out(o)
    w = x_BxLxD + y if self.write_residual else y
    m, mem = self.memory.forward(w, mem)                                         # Eq 24
    o = self.norm_y(y) * jax.nn.sigmoid(self.norm_m(self.memory.out(m, y.dtype)))  # Eq 25
    return o, MACState(mem, conv_x, state.buf_BxCxD)

  def __call__(self, x_BxTxD, state: MACState, pos_BxT, *, policy=None, tokens_BxT=None):
    T, C = x_BxTxD.shape[1], self.segment
    assert T <= C, f'MAC: a call takes at most model.segment_len={C} tokens, got {T}'
    if T == 1 and C > 1:
      return self._step(x_BxTxD, state, pos_BxT[:, 0])
    o, new = self.segment_forward(x_BxTxD, state)
    o = _nan_unless(pos_BxT[:, 0] % C == 0, o)
    if T == C:        # a whole segment: commit its memory
      return o, new
    return o, state.replace(buf_BxCxD=state.buf_BxCxD.at[:, :T].set(x_BxTxD.astype(self.dtype)))

  def _step(self, x_Bx1xD, state: MACState, pos_B):
    """Token at in-segment slot n: recompute the segment's first slots from its buffer
    (causal, so slots > n do not matter) and commit when the segment completes."""
    C = self.segment
    n = pos_B[0] % C
    buf = jax.lax.dynamic_update_slice_in_dim(state.buf_BxCxD, x_Bx1xD.astype(self.dtype), n, 1)
    o_BxCxD, new = self.segment_forward(buf.astype(x_Bx1xD.dtype), state)
    o = jax.lax.dynamic_slice_in_dim(o_BxCxD, n, 1, 1)
    done = n == C - 1
    new = jax.tree.map(lambda a, b: jnp.where(done, a, b), new, state)
    return o, new.replace(buf_BxCxD=buf)


def validate(cfg):
  """model.titans (mixers titans_mac / titans_mag / titans_mal / titans_lmm)."""
  m = cfg.model
  ti = m.titans
  for key in ('chunk', 'depth', 'expansion'):
    check(ti[key] >= 1, f'model.titans.{key}', f'must be >= 1, got {ti[key]}')
  for key in ('persistent', 'conv'):
    check(ti[key] >= 0, f'model.titans.{key}', f'must be >= 0, got {ti[key]}')
  check(ti.theta_max > 0, 'model.titans.theta_max', f'must be > 0, got {ti.theta_max}')
  check(ti.grad_clip >= 0, 'model.titans.grad_clip', f'must be >= 0, got {ti.grad_clip}')
  check(len(ti.gate_bias) == 3, 'model.titans.gate_bias',
        f'must be 3 numbers (theta, eta, alpha), got {ti.gate_bias}')
  check(ti.mac_write in ('y', 'residual'), 'model.titans.mac_write',
        f'{ti.mac_write!r} not y|residual')
  check(ti.chunk_form in ('closed', 'scan'), 'model.titans.chunk_form',
        f'{ti.chunk_form!r} not closed|scan')
  unit = ti.chunk
  if 'titans_mac' in m.mixer:
    check(m.segment_len >= 1, 'model.segment_len', 'titans_mac needs segments (C): set >= 1')
    check(m.segment_len % ti.chunk == 0, 'model.titans.chunk',
          f'chunk={ti.chunk} must divide model.segment_len={m.segment_len}')
    unit = m.segment_len
  elif m.segment_len:
    check(m.segment_len % ti.chunk == 0, 'model.titans.chunk',
          f'chunk={ti.chunk} must divide model.segment_len={m.segment_len}')
  if 'titans_mag' in m.mixer or 'titans_mal' in m.mixer:
    check(m.window >= 1, 'model.window', 'titans_mag / titans_mal need a sliding window >= 1')
  check(cfg.decode.prefill_chunk % unit == 0, 'decode.prefill_chunk',
        f'titans memory is updated per {unit} tokens: prefill_chunk must be a multiple of it')


CONFIG = {'model.titans': dict(
    chunk=16,                   # b: tokens per memory chunk (gradients at the chunk start)
    depth=2,                    # L_M: memory MLP layers (1: linear memory)
    expansion=4,                # memory MLP hidden width = expansion * head_dim
    persistent=16,              # N_p learned persistent tokens (MAC/MAG/MAL)
    conv=4,                     # causal depthwise conv kernel on q, k, v (0: none)
    theta_max=0.1,              # cap of the inner learning rate theta
    grad_clip=1.0,              # soft cap of each token's inner gradient norm (0: off)
    gate_bias=(-2.0, 0.0, -5.0),  # initial pre-sigmoid theta, eta, alpha: theta/theta_max
                                # ~ 0.12, eta 0.5, alpha ~ 0.007
    momentum=True,              # False: eta = 0 (ablation)
    forget=True,                # False: alpha = 0 (ablation)
    mac_write='residual',       # MAC write (Eq 24): residual (x + y) | y (attention output only)
    chunk_form='closed',        # closed (chunk-end closed form) | scan (per-token + assoc. scan)
)}
for _name, _mixer, _state in (('titans_mac', MAC, MACState), ('titans_mag', MAG, (KVCache, MemState)),
                              ('titans_mal', MAL, (KVCache, MemState)), ('titans_lmm', LMM, MemState)):
  registry.register_mixer(_name, _mixer, state=_state, config=CONFIG, validate=validate)
