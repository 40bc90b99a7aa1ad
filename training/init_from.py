"""Initialise a new run's model from another run's checkpoint (`train.init_from`).

Parameters are matched by path: every parameter of the new model that the source has
(same path, same shape) is copied; the rest keep their fresh initialisation (e.g. the
gates a memory mixer adds to a plain-attention model). A shape mismatch is an error
naming the parameter. This is how continued pretraining and method conversions start.

`hf:DIR` sources are Hugging Face Llama-family checkpoints (models/hf_llama.py): the source
state is the plain-attention LM of the config's sizes (filled from DIR/config.json by
training/config.py resolve), each parameter built with jax.make_array_from_callback so
every device reads only its own shard from the memory-mapped safetensors files.
"""
import jax
from absl import logging

from training import mesh as meshlib
from training.checkpoint import Checkpointer
from training.config import ConfigError, resolve, saved_config


def _by_path(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in leaves}, [jax.tree_util.keystr(p) for p, _ in leaves], treedef


def load_hf(cfg, mesh, rules):
  """The safetensors checkpoint of train.init_from=hf:DIR as a plain-attention LM state."""
  import ml_collections
  from models import hf_llama
  from training.loop import model_ctor
  src = ml_collections.ConfigDict(cfg.to_dict())
  src.model.mixer = 'attention'
  _, abs_state, _ = meshlib.abstract_state(model_ctor(src), mesh, rules)
  try:
    ckpt = hf_llama.Checkpoint(cfg.train.init_from[len('hf:'):])
  except ValueError as e:
    raise ConfigError(f'config.train.init_from: {e}') from None
  used = set()

  def build(path, a):
    name = hf_llama.param_name(path)
    try:
      used.add(ckpt.check(name, src.model))          # present, with the expected shape
    except ValueError as e:
      raise ConfigError(f'config.train.init_from: {e}') from None
    read = lambda index: ckpt.read(name, a.shape, index, src.model).astype(a.dtype)
    return jax.make_array_from_callback(a.shape, a.sharding, read)

  state = jax.tree_util.tree_map_with_path(build, abs_state)
  logging.info('init_from %s: %d tensors; not used: %s', cfg.train.init_from, len(used),
               sorted(set(ckpt.tensors) - used) or 'none')
  return state


def hf_model(hf_dir, devices=None):
  """(graphdef, state, cfg) of the plain-attention LM of an HF checkpoint, without a train.py
  run (a frozen base, e.g. for evolve.py): configs/base.py filled from DIR/config.json,
  sharded over `devices` (default all) by the default mesh and axis rules."""
  from configs.base import get_base_config
  from training.loop import model_ctor
  cfg = get_base_config()
  cfg.train.init_from = f'hf:{hf_dir}'
  cfg = resolve(cfg)
  mesh = meshlib.make_mesh(cfg, devices)
  rules = meshlib.axis_rules(cfg)
  graphdef, _, _ = meshlib.abstract_state(model_ctor(cfg), mesh, rules)
  return graphdef, load_hf(cfg, mesh, rules), cfg


def load_source(cfg, mesh, rules):
  """The source checkpoint's model state (its own architecture), sharded on `mesh`."""
  if cfg.train.init_from.startswith('hf:'):
    return load_hf(cfg, mesh, rules)
  ckpt = Checkpointer.open(cfg.train.init_from)
  src = resolve(saved_config(ckpt.read_config()))
  src.axis_rules = cfg.axis_rules
  _, state, step = ckpt.restore_model(src, mesh)
  logging.info('init_from %s: step %d (mixer %s)', cfg.train.init_from, step, src.model.mixer)
  return state


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
  state = jax.tree_util.tree_unflatten(treedef, out)
  if 'anchor' in cfg.model.mixer:   # AnLLM-AC: the new <AC> embedding starts as '.'
    from models.anchor import init_ac_embedding
    state = init_ac_embedding(cfg.model, state)
  return state
