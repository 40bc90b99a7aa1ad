"""Initialise a new run's model from another run's checkpoint (`train.init_from`).

Parameters are matched by path: every parameter of the new model that the source has
(same path, same shape) is copied; the rest keep their fresh initialisation (e.g. the
gates a memory mixer adds to a plain-attention model). A shape mismatch is an error
naming the parameter, but for a vocabulary grown by new ids (AnLLM-AC's <AC> past an HF
tokenizer's ids): the source's rows are copied, the new ones stay fresh. This is how continued pretraining and method conversions start.

Sources are read by training/run.py load_run: a train.py run directory, or `hf:DIR`, a
Hugging Face Llama-family checkpoint (the plain-attention LM of DIR/config.json's sizes,
every device reading only its own shard from the memory-mapped safetensors files).
"""
import jax
from absl import logging

from training.config import ConfigError
from training.run import load_run


def _by_path(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in leaves}, [jax.tree_util.keystr(p) for p, _ in leaves], treedef


def load_source(cfg, mesh):
  """The source's model state (its own architecture), sharded on `mesh` by cfg's rules."""
  run = load_run(cfg.train.init_from, mesh=mesh, overrides={'axis_rules': cfg.axis_rules})
  logging.info('init_from %s: step %s (mixer %s)', cfg.train.init_from, run.step,
               run.cfg.model.mixer)
  return run.state


_EMBED, _HEAD = "['embed']", "['head']"


def _grown_vocab(path, src, dst):
  """Whether dst is src with more vocabulary rows (an AnLLM-AC model's new <AC> id)."""
  axis = {_EMBED: 0, _HEAD: 1}.get(path.replace('.value', ''))
  if axis is None or src.ndim != 2:
    return False
  return (src.shape[1 - axis] == dst.shape[1 - axis] and src.shape[axis] < dst.shape[axis])


def init_model_from(cfg, mesh, fresh_state):
  """fresh_state with every parameter the source checkpoint has replaced by its value."""
  source, _, _ = _by_path(load_source(cfg, mesh))
  fresh, order, treedef = _by_path(fresh_state)
  out, new = [], []
  for path in order:
    if path in source:
      src, dst = source[path], fresh[path]
      if src.shape != dst.shape and not _grown_vocab(path, src, dst):
        raise ConfigError(f'config.train.init_from: parameter {path} has shape '
                          f'{src.shape} in the source, {dst.shape} here')
      if src.shape != dst.shape:          # the source's rows, then the new ids' fresh rows
        axis = 0 if path.replace('.value', '') == _EMBED else 1
        src = jax.numpy.concatenate(
            [src.astype(dst.dtype), jax.lax.slice_in_dim(dst, src.shape[axis], None,
                                                         axis=axis)], axis)
      out.append(jax.device_put(src.astype(dst.dtype), dst.sharding))
    else:
      out.append(fresh[path])
      new.append(path)
  unused = sorted(set(source) - set(fresh))
  logging.info('init_from: copied %d parameters; new (fresh init): %s; unused: %s',
               len(order) - len(new), new or 'none', unused or 'none')
  state = jax.tree_util.tree_unflatten(treedef, out)
  if 'anchor' in cfg.model.mixer:   # AnLLM-AC: the new <AC> embedding starts as '.'
    from models.anchor import init_ac_embedding
    state = init_ac_embedding(cfg.model, state)
  return state
