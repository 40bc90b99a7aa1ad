"""Decoder-only LM: embed -> blocks (norm, mixer, norm, SwiGLU) -> norm -> head.

Each layer's sequence mixer is chosen by config (`model.mixer`: one name, or a
comma-separated pattern cycled over the layers) among the mixers registered in
models/registry.py. Every mixer follows one contract:

    mixer(x_BxTxD, state, pos_BxT, policy=None, tokens_BxT=None) -> (y_BxTxD, state)
    mixer.init_state(batch, capacity) -> state
  mixer.flops_per_token(seq_len) -> forward FLOPs per token beyond its parameter matmuls

where `state` is the layer's recurrent memory (a KV cache for attention); `tokens_BxT`
are the chunk's token ids (for token-dependent masks such as AnSAN anchors). Long inputs
are processed segment by segment (`model.segment_len`) by `lax.scan`, carrying states.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from models import registry
from models.layers import DTYPES, RMSNorm, SwiGLU, constrain, param


def make_mixer(name, cfg, rngs):
  return registry.mixer(name).build(cfg, rngs=rngs)


def layer_mixers(cfg):
  pattern = [m.strip() for m in cfg.mixer.split(',')]
  return [pattern[i % len(pattern)] for i in range(cfg.n_layers)]


def padded_vocab(cfg):
  return -(-cfg.vocab_size // 128) * 128


class Block(nnx.Module):

  def __init__(self, cfg, mixer, *, rngs):
    self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mixer = make_mixer(mixer, cfg, rngs)
    self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, rngs=rngs, dtype=DTYPES[cfg.dtype])

  def __call__(self, x_BxTxD, state, pos_BxT, policy=None, tokens_BxT=None):
    h_BxTxD, state = self.mixer(self.norm1(x_BxTxD), state, pos_BxT, policy=policy,
                                tokens_BxT=tokens_BxT)
    x_BxTxD = x_BxTxD + h_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.norm2(x_BxTxD))
    return constrain(x_BxTxD, ('batch', 'seq', 'embed')), state


class LM(nnx.Module):

  def __init__(self, cfg, *, rngs):
    self.cfg = cfg
    V, D = padded_vocab(cfg), cfg.d_model
    self.dtype = DTYPES[cfg.dtype]
    self.embed = param(rngs, (V, D), ('vocab', 'embed'), scale=D ** -0.5)
    self.blocks = nnx.List([Block(cfg, m, rngs=rngs) for m in layer_mixers(cfg)])
    self.norm = RMSNorm(D, eps=cfg.norm_eps, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (D, V), ('embed', 'vocab'), scale=D ** -0.5)

  def init_state(self, batch, capacity):
    """Per-layer mixer states for `capacity` tokens of context before the next chunk."""
    return [blk.mixer.init_state(batch, capacity) for blk in self.blocks]

  def _chunk(self, tokens_BxT, state, pos_BxT, policy):
    """One chunk through the whole stack: final-normed hidden states h_BxTxD, new state."""
    cfg = self.cfg
    x = self.embed[...][tokens_BxT].astype(self.dtype)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.d_model ** 0.5, self.dtype)
    x = constrain(x, ('batch', 'seq', 'embed'))
    new_state = []
    for i, (blk, s) in enumerate(zip(self.blocks, state)):
      # a policy with layer-wise budgets (PyramidKV) gives each layer its own
      layer_policy = (policy.for_layer(i, len(self.blocks)) if hasattr(policy, 'for_layer')
                      else policy)
      if cfg.remat == 'block':   # functional (split/merge) so it nests inside lax.scan
        gdef, params = nnx.split(blk)
        run = lambda params, x, s, p, t, g=gdef, lp=layer_policy: nnx.merge(g, params)(
            x, s, p, lp, t)
        x, s = jax.checkpoint(run)(params, x, s, pos_BxT, tokens_BxT)
      else:
        x, s = blk(x, s, pos_BxT, layer_policy, tokens_BxT)
      new_state.append(s)
    return self.norm(x), new_state

  def logits(self, h_BxKxD):
    """The output head (fp32 logits) on hidden states of any positions."""
    w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
    logits = jnp.einsum('bkd,dv->bkv', h_BxKxD, w_DxV.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ('batch', 'seq', 'vocab'))[..., :self.cfg.vocab_size]

  def __call__(self, tokens_BxT, state=None, pos_BxT=None, *, policy=None, positions_BxK=None):
    """Logits for every position, or only at `positions_BxK` (indices into T: the head, the
    largest matmul of a small model, then runs on those alone; train.loss_positions).
    Without `state`, a fresh one (training / scoring).

    The input is cut into segments of `segment_len` scanned in order (the last one may
    be shorter); `pos_BxT` are absolute positions (default 0..T-1).
    """
    h_BxTxD, state = self.hidden(tokens_BxT, state, pos_BxT, policy)
    if positions_BxK is not None:
      h_BxTxD = jnp.take_along_axis(h_BxTxD, positions_BxK[..., None], axis=1)
    return self.logits(h_BxTxD), state

  def hidden(self, tokens_BxT, state, pos_BxT, policy):
    """(final-normed hidden states h_BxTxD, new state): __call__ without the head."""
    B, T = tokens_BxT.shape
    C = min(self.cfg.segment_len or T, T)
    if pos_BxT is None:
      pos_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if state is None:
      state = self.init_state(B, T - C)
    if C == T:
      return self._chunk(tokens_BxT, state, pos_BxT, policy)
    return self._segments(tokens_BxT, state, pos_BxT, policy, C)

  def _segments(self, tokens_BxT, state, pos_BxT, policy, C):
    B, T = tokens_BxT.shape
    n = T // C
    split = lambda a: a[:, :n * C].reshape(B, n, C).swapaxes(0, 1)

    def body(state, xs):
      h, state = self._chunk(xs[0], state, xs[1], policy)
      return state, h

    if self.cfg.remat == 'segment':
      body = jax.checkpoint(body)
    state, h_NxBxCxD = jax.lax.scan(body, state, (split(tokens_BxT), split(pos_BxT)))
    h = h_NxBxCxD.swapaxes(0, 1).reshape(B, n * C, -1)
    if n * C < T:
      tail, state = self._chunk(tokens_BxT[:, n * C:], state, pos_BxT[:, n * C:], policy)
      h = jnp.concatenate([h, tail], 1)
    return h, state
