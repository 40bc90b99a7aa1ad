"""Optimizer, loss and the jitted train / eval steps (explicit shardings, donation)."""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data.tokenizer import ByteTokenizer


def make_optimizer(t):
  """AdamW with linear warmup + cosine decay and global-norm clipping; no decay on vectors."""
  warmup = min(t.warmup_steps, t.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.lr, warmup, t.steps, end_value=t.lr * t.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                               mask=decay_mask))
  return tx, schedule


def token_nll(model, tokens_BxL1):
  """Per-token negative log-likelihood [B, L] and the mask of real (non-PAD) targets."""
  inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
  logits_BxLxV, _ = model(inputs_BxL)
  logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
  return nll_BxL, targets_BxL != ByteTokenizer.PAD


def loss_fn(model, tokens_BxL1):
  nll_BxL, mask_BxL = token_nll(model, tokens_BxL1)
  return (nll_BxL * mask_BxL).sum() / jnp.maximum(mask_BxL.sum(), 1)


def make_train_step(graphdef, schedule, state_shardings, batch_sharding):
  """step(state, tokens) -> (state, metrics). A non-finite loss or gradient leaves the
  state untouched and reports finite=0, so a bad update never reaches a checkpoint."""

  @functools.partial(jax.jit, donate_argnums=0,
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, None))
  def train_step(state, tokens_BxL1):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens_BxL1)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    step = opt.step[...]
    opt.update(model, grads)
    new_state = nnx.split((model, opt))[1]
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(step), finite=finite)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, model_shardings, batch_sharding):
  """eval(model_state, tokens) -> (sum of nll, number of tokens)."""

  @functools.partial(jax.jit, in_shardings=(model_shardings, batch_sharding))
  def eval_step(model_state, tokens_BxL1):
    nll_BxL, mask_BxL = token_nll(nnx.merge(graphdef, model_state), tokens_BxL1)
    return (nll_BxL * mask_BxL).sum(), mask_BxL.sum()

  return eval_step
