"""Methods as plugins: every sequence mixer and every KV-cache eviction policy registers here
its constructor, its config keys with their defaults, its own validate(cfg) and (mixers) its
layer-state type. Nothing else in the library names a method: configs/base.py adds the
registered keys to the base config, training/config.py calls the validate of the methods a
config uses, models/lm.py builds mixers by name, training/ builds the decode policy by name.

A new method is one module that ends with, e.g.,

    registry.register_mixer('my_mixer', MyMixer, state=MyState,
                            config={'model.my_mixer': dict(rank=4)}, validate=my_validate)

and is imported before the config is built (the built-in ones are listed in BUILTINS).

Config keys: {dotted key: default}; a dict default is a whole section (model.titans). Two
methods may share a key (h2o and l2: decode.budget) only with the same default.
validate(cfg) raises ConfigError naming the key (use `check`).

The layer-state protocol: a mixer's `init_state(batch, capacity)` returns its registered
state type, a LayerState (or a tuple of them); `is_kv_cache(state)` says whether eviction
policies act on it (a KVState, i.e. a KVCache), and `nbytes(state)` is its size in bytes.
"""
import contextlib
import dataclasses
import importlib
from typing import Any, Callable

import jax

BUILTINS = ('models.attention', 'models.eviction', 'models.namm', 'models.presses',
            'models.titans', 'models.infini', 'models.anchor')


class ConfigError(ValueError):
  pass


def check(ok, key, msg):
  """Raises ConfigError('config.KEY: MSG') unless ok."""
  if not ok:
    raise ConfigError(f'config.{key}: {msg}')


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build: Callable                  # mixer: (model_cfg, rngs) -> nnx.Module; policy: (cfg) -> policy
  config: dict                     # {dotted key: default}
  validate: Callable | None = None  # (cfg) -> None, raises ConfigError
  state: Any = None                # mixers: the type (or tuple of types) of the layer state


_MIXERS, _POLICIES, _KEYS = {}, {}, {}
_loaded = []


def _register(table, name, method):
  for key, default in method.config.items():
    if key in _KEYS and _KEYS[key] != default:
      raise ValueError(f'{name}: config key {key} is already registered with another default')
  _KEYS.update(method.config)
  table[name] = method


def register_mixer(name, build, *, state, config=None, validate=None):
  """A sequence mixer: build(model_cfg, rngs=...) -> module with the mixer contract
  (models/lm.py); `state` its init_state's type."""
  _register(_MIXERS, name, Method(name, build, dict(config or {}), validate, state))


def register_policy(name, build, *, config=None, validate=None):
  """An eviction policy: build(cfg) -> a policy pytree (models/eviction.py) or None."""
  _register(_POLICIES, name, Method(name, build, dict(config or {}), validate))


def load_builtins():
  if not _loaded:
    _loaded.append(True)
    for module in BUILTINS:
      importlib.import_module(module)


@contextlib.contextmanager
def scope():
  """Registrations made inside are undone at exit (a test's or a notebook's own methods)."""
  load_builtins()
  saved = [(table, dict(table)) for table in (_MIXERS, _POLICIES, _KEYS)]
  try:
    yield
  finally:
    for table, old in saved:
      table.clear()
      table.update(old)


def mixers():
  load_builtins()
  return dict(_MIXERS)


def policies():
  load_builtins()
  return dict(_POLICIES)


def config_keys():
  """{dotted key: default} of every registered method."""
  load_builtins()
  return dict(_KEYS)


def mixer(name):
  table = mixers()
  check(name in table, 'model.mixer', f'unknown mixer {name!r}; one of {sorted(table)}')
  return table[name]


def policy(name):
  table = policies()
  check(name in table, 'decode.policy', f'unknown policy {name!r}; one of {sorted(table)}')
  return table[name]


# --- The layer-state protocol ---------------------------------------------------------------

class LayerState:
  """Base of the states mixers' init_state return (flax struct dataclasses)."""

  def nbytes(self):
    return nbytes(self)


class KVState(LayerState):
  """A KV cache (models/attention.py KVCache): what eviction policies act on."""


def is_kv_cache(state):
  return isinstance(state, KVState)


def nbytes(state):
  """Bytes of a layer state (any pytree of arrays: a LayerState or a tuple of them)."""
  return sum(x.nbytes for x in jax.tree.leaves(state))
