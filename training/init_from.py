"""Initialise a new run's model from another run's checkpoint (`train.init_from`).

Parameters are matched by path: every parameter of the new model that the source has
(same path, same shape) is copied; the rest keep their fresh initialisation (e.g. the
gates a memory mixer adds to a plain-attention model). A shape mismatch is an error
naming the parameter. This is how continued pretraining and method conversions start.
"""
import jax
from absl import logging

from training import mesh as meshlib
from training.checkpoint import Checkpointer
from training.config import ConfigError, resolve, saved_config


def _by_path(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in leaves}, [jax.tree_util.keystr(p) for p, _ in leaves], treedef


def load_source(cfg, mesh, rules):
  """The source checkpoint's model state (its own architecture), sharded on `mesh`."""
  from training.loop import model_ctor
  ckpt = Checkpointer.open(cfg.train.init_from)
  src = resolve(saved_config(ckpt.read_config()))
  _, abs_state, _ = meshlib.abstract_state(model_ctor(src), mesh, rules)
  step, restored = ckpt.restore(model=abs_state)
  logging.info('init_from %s: step %d (mixer %s)', cfg.train.init_from, step, src.model.mixer)
  return restored.model


def init_model_from(cfg, mesh, rules, fresh_state):
  """fresh_state with every parameter the source checkpoint has replaced by its value."""
  source, _, _ = _by_path(load_source(cfg, mesh, rules))
  fresh, order, treedef = _by_path(fresh_state)
  out, new = [], []
  for path in order:
    if path in source:
      if source[path].shape != fresh[path].shape:
        raise ConfigError(f'config.train.init_from: parameter {path} has shape '
                          f'{source[path].shape} in the source, {fresh[path].shape} here')
      out.append(jax.device_put(source[path].astype(fresh[path].dtype), fresh[path].sharding))
    else:
      out.append(fresh[path])
      new.append(path)
  unused = sorted(set(source) - set(fresh))
  logging.info('init_from: copied %d parameters; new (fresh init): %s; unused: %s',
               len(order) - len(new), new or 'none', unused or 'none')
  return jax.tree_util.tree_unflatten(treedef, out)
