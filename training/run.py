"""Loading a run's model: one place for evaluate.py, evolve.py, train.init_from, export_hf.py
and the benchmarks.

    run = load_run('runs/tiny')                       # latest step, all devices
    run = load_run('runs/tiny', step=200, overrides={'decode.policy': 'recency'})
    run = load_run('hf:/models/llama', mesh=mesh)     # a Hugging Face Llama directory
    logits, _ = run.model()(tokens)

Config precedence (`run_config`), lowest to highest:
  1. the config saved with the checkpoint step, laid over configs/base.py defaults, with
     `mesh` reset to data=-1, fsdp=1, tensor=1 (the training mesh need not fit here);
  2. a whole config (`config=`, evaluate.py's --config=file.py:preset), replacing 1 entirely;
  3. single-key overrides ({'decode.policy': 'recency'}).
Keys that fix parameter shapes must still match the checkpoint (ConfigError otherwise).

Only the model is read: a train.py checkpoint's `state` item holds the TrainState (model,
optimizer), and the optimizer's part stays on disk. Run directories written before the
TrainState (items `model` and `opt`) restore too.
"""
import dataclasses
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from training import mesh as meshlib
from training.checkpoint import Checkpointer
from training.config import ConfigError, key_node, resolve, saved_config, validate
from training.state import model_ctor

# Model keys that change parameter shapes: they must equal the checkpoint's.
SHAPE_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim',
              'mlp_dim', 'mixer', 'tie_embeddings')


@dataclasses.dataclass
class Run:
  """A run's model on a mesh: its resolved config, graphdef and (sharded) parameters."""
  cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  state: nnx.State
  mesh: jax.sharding.Mesh
  step: int | None              # None for an hf: source
  source: str

  def model(self):
    return nnx.merge(self.graphdef, self.state)


def run_config(saved, config=None, overrides=None):
  """Config of a checkpoint whose saved config (a dict) is `saved` (see the module
  docstring). Returns a resolved ConfigDict."""
  if config is None:
    cfg = saved_config(saved)
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  else:
    cfg = ml_collections.ConfigDict(config.to_dict())
  apply_overrides(cfg, overrides)
  cfg = resolve(cfg)
  check_shapes(cfg, saved)
  return cfg


def check_shapes(cfg, saved, hint='', keys=SHAPE_KEYS):
  """ConfigError naming the model `keys` of `cfg` that change parameter shapes from those of
  the checkpoint whose saved config is `saved` (the first, and the others)."""
  trained = resolve(saved_config(saved)).model
  bad = [key for key in keys if cfg.model[key] != trained[key]]
  if bad:
    key, more = bad[0], ', '.join(f'model.{k}' for k in bad[1:])
    raise ConfigError(f'config.model.{key}: {cfg.model[key]!r} does not match the checkpoint '
                      f'({trained[key]!r}){f" (nor do {more})" if more else ""}; it changes '
                      f'parameter shapes{hint}')


def apply_overrides(cfg, overrides):
  """{'dotted.key': value} set in cfg; ConfigError naming an unknown key or a wrong type."""
  for key, value in (overrides or {}).items():
    node, leaf = key_node(cfg, key)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f'config.{key}: {e}') from None


def abstract_model(cfg, mesh):
  """(graphdef, abstract model state with its target shardings on `mesh`)."""
  graphdef, abs_state, _ = meshlib.abstract_state(model_ctor(cfg), mesh, meshlib.axis_rules(cfg))
  return graphdef, abs_state


def restore_model(ckpt, step, abs_state):
  """The model part of a checkpoint step, onto `abs_state` (any mesh)."""
  items = ckpt.items(step)
  if 'model' in items:          # a run directory written before the TrainState
    return ckpt.restore(step, model=abs_state)[1].model
  return ckpt.restore_part(step, 'state', {'model': abs_state}, hint=(
      f' (items: {sorted(items)}): not a train.py run; an evolve.py run is used through its '
      'base LM (evolve.base)'))['model']


def load_run(source, step=None, mesh=None, *, config=None, overrides=None):
  """The model of a train.py run directory (or its checkpoints/ folder), or of `hf:DIR`.

  step: default the newest that restores. mesh: default the config's mesh over all devices (the config
  is then validated for them). config / overrides: see the module docstring."""
  source = os.fspath(source)
  if source.startswith('hf:'):
    return _load_hf(source, mesh, overrides)
  ckpt = Checkpointer.open(source)

  def load(step):
    cfg = run_config(ckpt.read_config(step), config, overrides)
    if mesh is None:
      validate(cfg, jax.device_count())
    on = mesh or meshlib.make_mesh(cfg)
    graphdef, abs_state = abstract_model(cfg, on)
    return cfg, on, graphdef, restore_model(ckpt, step, abs_state)
  try:            # no step given: the newest that restores (a damaged one is skipped, logged)
    step, (cfg, mesh, graphdef, state) = ckpt.restore_newest(load, step)
  finally:
    ckpt.close()
  logging.info('loaded %s step %d (mixer %s)', source, step, cfg.model.mixer)
  return Run(cfg, graphdef, state, mesh, step, source)


def _load_hf(source, mesh, overrides):
  """configs/base.py filled from DIR/config.json (a plain-attention LM), its weights read
  shard by shard from the memory-mapped safetensors files."""
  from configs.base import get_base_config
  cfg = get_base_config()
  cfg.train.init_from = source
  apply_overrides(cfg, overrides)
  cfg = resolve(cfg)
  mesh = mesh or meshlib.make_mesh(cfg)
  graphdef, abs_state = abstract_model(cfg, mesh)
  return Run(cfg, graphdef, read_hf(cfg, abs_state), mesh, None, source)


def read_hf(cfg, abs_state):
  """The safetensors checkpoint of cfg.train.init_from=hf:DIR onto `abs_state` (the
  plain-attention LM of cfg's sizes), each parameter built with make_array_from_callback so
  every device reads only its own shard."""
  from models import hf_llama
  try:
    ckpt = hf_llama.Checkpoint(cfg.train.init_from[len('hf:'):])
  except ValueError as e:
    raise ConfigError(f'config.train.init_from: {e}') from None
  used = set()

  def build(path, a):
    name = hf_llama.param_name(path)
    try:
      used.add(ckpt.check(name, cfg.model))          # present, with the expected shape
    except ValueError as e:
      raise ConfigError(f'config.train.init_from: {e}') from None
    read = lambda index: ckpt.read(name, a.shape, index, cfg.model).astype(a.dtype)
    return jax.make_array_from_callback(a.shape, a.sharding, read)

  state = jax.tree_util.tree_map_with_path(build, abs_state)
  logging.info('%s: %d tensors; not used: %s', cfg.train.init_from, len(used),
               sorted(set(ckpt.tensors) - used) or 'none')
  return state
