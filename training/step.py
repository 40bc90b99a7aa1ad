"""Optimizer, loss and the jitted train / eval steps (explicit shardings, donation)."""
import functools
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data.tokenizer import ByteTokenizer


def make_optimizer(t):
  """AdamW with linear warmup + cosine decay and global-norm clipping; no decay on vectors.

  `train.param_groups` ((path regex, lr multiplier, weight decay?), ...) give the matching
  parameters their own learning rate (updates scaled) and weight decay switch."""
  warmup = min(t.warmup_steps, t.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup, t.steps, end_value=t.lr * t.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(t.grad_clip)]
  # Not optax.partition: its per-group states hold MaskedNode leaves, which nnx.eval_shape of
  # an nnx.Optimizer cannot wrap (flax 0.12.8: "'MaskedNode' object has no attribute 'shape'").
  groups = tuple(tuple(g) for g in t.param_groups)
  if groups:   # (path regex, lr multiplier, weight decay?) per group: e.g. Infini's gates
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and param_group(path, groups)[2], params)
  parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                           mask=decay_mask))
  if groups:
    parts.append(optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(
        lambda path, u: u * param_group(path, groups)[1], updates)))
  return optax.chain(*parts), schedule


def param_path(path):
  """'blocks/0/mixer/beta' for a jax key path into an nnx.State."""
  names = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
  return '/'.join(n for n in names if n != 'value')


def param_group(path, groups):
  """(regex, lr multiplier, weight decay?) of the first group whose regex is found in the
  parameter's path; the default group (None, 1.0, True) if none."""
  p = param_path(path)
  return next((g for g in groups if re.search(g[0], p)), (None, 1.0, True))


def label_positions(weights_BxL, k):
  """Each row's k highest-weight target positions [B, k] (train.loss_positions): the loss
  and accuracy are exact when no row weighs more than k targets (the loop checks); with
  k = 0, None (every position)."""
  return jax.lax.top_k(weights_BxL, k)[1] if k else None


def _at(a_BxL, positions_BxK):
  return a_BxL if positions_BxK is None else jnp.take_along_axis(a_BxL, positions_BxK, 1)


def token_nll(model, tokens_BxL1, pad_id=ByteTokenizer.PAD, hits=False, positions_BxK=None):
  """Per-token negative log-likelihood [B, L] and the mask of real (non-PAD) targets; with
  hits, also whether the most likely token is the target [B, L]. With positions_BxK
  (`label_positions`), only there: [B, K] each, the head run on those positions alone.

  pad_id: the tokenizer's PAD (data/hf_tokenizer.py; -1 when it has none)."""
  inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], _at(tokens_BxL1[:, 1:], positions_BxK)
  logits_BxLxV, _ = model(inputs_BxL, positions_BxK=positions_BxK)
  logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  if hits:
    return nll_BxL, targets_BxL != pad_id, logits_BxLxV.argmax(-1) == targets_BxL
  return nll_BxL, targets_BxL != pad_id


def loss_fn(model, tokens_BxL1, pad_id=ByteTokenizer.PAD, weights_BxL=None, total=None,
            loss_positions=0):
  """Mean nll over the real targets, each weighted by weights_BxL (default 1; data.loss=
  'answer' gives 1 on a synthetic example's answer targets, 0 elsewhere). `total`: divide
  by this instead of the batch's own weight (a slice of a larger batch). loss_positions
  k > 0: only each row's k highest-weight targets (`label_positions`)."""
  positions = label_positions(weights_BxL, loss_positions) if weights_BxL is not None else None
  nll_BxL, mask_BxL = token_nll(model, tokens_BxL1, pad_id, positions_BxK=positions)
  w_BxL = mask_BxL if weights_BxL is None else mask_BxL * _at(weights_BxL, positions)
  return (nll_BxL * w_BxL).sum() / (jnp.maximum(w_BxL.sum(), 1) if total is None else total)


def accumulated_value_and_grad(model, tokens_BxL1, weights_BxL, microbatches, pad_id,
                               loss_positions=0):
  """loss_fn and its gradient over the batch, computed `microbatches` rows-slices at a time
  (a lax.scan summing gradients): the same numbers as one pass (each slice's weighted nll
  sum is divided by the whole batch's weight), with a k-times smaller activation footprint.
  Slice i takes rows i, i+k, ... so every data shard contributes to every slice."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mask_BxL = tokens_BxL1[:, 1:] != pad_id
  total = jnp.maximum((mask_BxL * weights_BxL).sum(), 1)
  k = microbatches
  slices = lambda a: a.reshape((a.shape[0] // k, k) + a.shape[1:]).swapaxes(0, 1)

  def slice_loss(params, tokens_bxL1, weights_bxL):
    return loss_fn(nnx.merge(graphdef, params, rest), tokens_bxL1, pad_id, weights_bxL, total,
                   loss_positions)

  def body(acc, xs):
    return jax.tree.map(jnp.add, acc, jax.value_and_grad(slice_loss)(params, *xs)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(body, zeros, (slices(tokens_BxL1), slices(weights_BxL)))
  return loss, grads


def all_finite(tree):
  """Whether every floating-point leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(graphdef, schedule, state_shardings, batch_sharding,
                    pad_id=ByteTokenizer.PAD, microbatches=1, compiler_options=None,
                    loss_positions=0):
  """step(state, tokens [B, L+1], weights [B, L]) -> (state, metrics): weights scale each
  target's loss (see loss_fn). A non-finite loss, gradient or updated state (parameters,
  optimizer moments) leaves the state untouched and reports finite=0 (state_finite says
  which), so a bad update never reaches a checkpoint. microbatches > 1: the
  gradient is accumulated over that many slices of the batch (train.microbatches).
  compiler_options: XLA's, for this step (train.xla_options). loss_positions: see loss_fn."""

  @functools.partial(jax.jit, donate_argnums=0,
                     in_shardings=(state_shardings, batch_sharding, batch_sharding),
                     out_shardings=(state_shardings, None), compiler_options=compiler_options)
  def train_step(state, tokens_BxL1, weights_BxL):
    train_state = nnx.merge(graphdef, state)             # training/state.py TrainState
    model, opt = train_state.model, train_state.opt
    if microbatches > 1:
      loss, grads = accumulated_value_and_grad(model, tokens_BxL1, weights_BxL, microbatches,
                                               pad_id, loss_positions)
    else:
      loss, grads = nnx.value_and_grad(loss_fn)(model, tokens_BxL1, pad_id, weights_BxL,
                                                loss_positions=loss_positions)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    step = opt.step[...]
    opt.update(model, grads)
    new_state = nnx.split(train_state)[1]
    state_finite = all_finite(new_state)      # a finite gradient can still overflow the update
    finite = finite & state_finite
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(step), finite=finite,
                   state_finite=state_finite)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, model_shardings, batch_sharding, pad_id=ByteTokenizer.PAD,
                   loss_positions=0):
  """eval(model_state, tokens, weights) -> (weighted sums of nll and of greedy hits, sum of
  weights); loss_positions: see loss_fn."""

  @functools.partial(jax.jit, in_shardings=(model_shardings, batch_sharding, batch_sharding))
  def eval_step(model_state, tokens_BxL1, weights_BxL):
    positions = label_positions(weights_BxL, loss_positions)
    nll_BxL, mask_BxL, hit_BxL = token_nll(nnx.merge(graphdef, model_state), tokens_BxL1,
                                           pad_id, hits=True, positions_BxK=positions)
    w_BxL = mask_BxL * _at(weights_BxL, positions)
    return (nll_BxL * w_BxL).sum(), (hit_BxL * w_BxL).sum(), w_BxL.sum()

  return eval_step
