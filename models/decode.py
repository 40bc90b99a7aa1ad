"""Decoding: prefill a prompt into the fixed-capacity per-layer state, then step.

State = the LM's per-layer mixer states (KV caches for attention layers), created with
`capacity` slots; an eviction policy (models/eviction.py) may free slots as it goes.
"""
import functools
import warnings

import jax
import jax.numpy as jnp

from models import registry


def init_state(model, batch, capacity, policy=None):
  state = model.init_state(batch, capacity)
  if policy is not None:
    state = [policy.init(s) if registry.is_kv_cache(s) else s for s in state]
  return state


def prefill(model, prompt_BxP, state, policy=None, chunk=0, align_end=False):
  """Runs the prompt (positions 0..P-1). Returns logits of the last position, state.

  With `chunk`, the prompt goes in pieces of that many tokens, so an eviction policy acts
  while the prompt is read (every piece) rather than once after all of it; `align_end` puts
  the shorter piece first, so that a piece (and a policy's every-`chunk` update) ends with
  the prompt.
  """
  B, P = prompt_BxP.shape
  chunk = min(chunk or P, P)
  first = P % chunk if align_end else 0          # a shorter piece first, else last
  n = (P - first) // chunk                       # whole pieces: one lax.scan (one copy of
  last = P - first - n * chunk                   # the model in the program, any P)

  def piece(state, start, size):
    pos_BxC = jnp.broadcast_to(start + jnp.arange(size, dtype=jnp.int32), (B, size))
    tokens = jax.lax.dynamic_slice_in_dim(prompt_BxP, start, size, 1)
    last_Bx1 = jnp.full((B, 1), size - 1, jnp.int32)    # the head at the last position only
    logits_Bx1xV, state = model(tokens, state, pos_BxC, policy=policy, positions_BxK=last_Bx1)
    return logits_Bx1xV[:, 0], state

  if first:
    logits_BxV, state = piece(state, 0, first)
  if n == 1:
    logits_BxV, state = piece(state, first, chunk)
  elif n > 1:                                    # carries only the last piece's logits
    shape = jax.eval_shape(lambda s: piece(s, first, chunk)[0], state)
    (logits_BxV, state), _ = jax.lax.scan(
        lambda carry, start: (piece(carry[1], start, chunk), None),
        (jnp.zeros(shape.shape, shape.dtype), state), first + chunk * jnp.arange(n))
  if last:
    logits_BxV, state = piece(state, P - last, last)
  return logits_BxV, state


def step(model, token_B, pos_B, state, policy=None):
  """One token at absolute position pos_B. Returns its logits [B, V], state."""
  logits_Bx1xV, state = model(token_B[:, None], state, pos_B[:, None], policy=policy)
  return logits_Bx1xV[:, 0], state


def sample(logits_BxV, key, temperature=0.0, top_p=1.0):
  """Greedy (temperature 0) or temperature / nucleus sampling."""
  if temperature <= 0:
    return logits_BxV.argmax(-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, -1), -1)
    cutoff_B = jnp.take_along_axis(sorted_BxV, (cum_BxV < top_p).sum(-1, keepdims=True), -1)
    logits = jnp.where(logits < cutoff_B, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('n_new', 'capacity', 'temperature', 'top_p',
                                             'prefill_chunk'))
def generate(model, prompt_BxP, key, *, n_new, capacity=0, temperature=0.0, top_p=1.0,
             policy=None, prefill_chunk=0):
  """Prompt + n_new sampled tokens [B, P + n_new]; also returns the final state."""
  B, P = prompt_BxP.shape
  if policy is None and 0 < capacity < P + n_new:
    warnings.warn(f'decode: capacity {capacity} < prompt {P} + {n_new} new tokens and no '
                  'eviction policy: the oldest tokens are overwritten (a recency window); '
                  'set decode.capacity=0 to keep all of them, or choose decode.policy')
  state = init_state(model, B, capacity or P + n_new, policy)
  logits_BxV, state = prefill(model, prompt_BxP, state, policy, prefill_chunk)

  def body(carry, i):
    logits_BxV, state, key = carry
    key, sub = jax.random.split(key)
    tok_B = sample(logits_BxV, sub, temperature, top_p)
    logits_BxV, state = step(model, tok_B, jnp.full((B,), P + i, jnp.int32), state, policy)
    return (logits_BxV, state, key), tok_B

  (_, state, _), new_NxB = jax.lax.scan(body, (logits_BxV, state, key), jnp.arange(n_new))
  return jnp.concatenate([prompt_BxP, new_NxB.T], 1), state
