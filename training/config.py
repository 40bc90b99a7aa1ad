"""Config resolution and validation: every error names the key, before anything compiles."""
import math

import ml_collections

from configs.base import get_base_config
from models.layers import DTYPES


class ConfigError(ValueError):
  pass


def _check(ok, key, msg):
  if not ok:
    raise ConfigError(f'config.{key}: {msg}')


def _unknown_keys(cfg, ref, prefix=''):
  for k in cfg.keys():
    if k not in ref:
      yield prefix + k
    elif isinstance(cfg[k], ml_collections.ConfigDict) and isinstance(ref[k], ml_collections.ConfigDict):
      yield from _unknown_keys(cfg[k], ref[k], prefix + k + '.')


def saved_config(saved):
  """A config dict saved with a checkpoint, over base defaults (typed like configs/base.py)."""
  cfg = get_base_config()
  cfg.update(saved)
  return cfg


def mesh_shape(mesh_cfg, n_devices):
  """(data, fsdp, tensor) with one -1 filled by the remaining devices."""
  sizes = {a: mesh_cfg[a] for a in ('data', 'fsdp', 'tensor')}
  free = [a for a, s in sizes.items() if s == -1]
  _check(len(free) <= 1, 'mesh', f'at most one axis may be -1, got {sizes}')
  for a, s in sizes.items():
    _check(s == -1 or s >= 1, f'mesh.{a}', f'must be >= 1 or -1, got {s}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    _check(n_devices % fixed == 0, f'mesh.{free[0]}',
           f'-1 cannot fill {n_devices} devices: the other axes take {fixed}')
    sizes[free[0]] = n_devices // fixed
  _check(math.prod(sizes.values()) == n_devices, 'mesh',
         f'data*fsdp*tensor = {math.prod(sizes.values())} {sizes} does not match the '
         f'{n_devices} available devices')
  return sizes


def resolve(cfg):
  """Fills derived model sizes (head_dim, mlp_dim) in place; returns cfg."""
  m = cfg.model
  with cfg.unlocked():
    if not m.head_dim and m.n_heads and m.d_model % m.n_heads == 0:
      m.head_dim = m.d_model // m.n_heads
    if not m.mlp_dim:
      m.mlp_dim = -(-(8 * m.d_model // 3) // 64) * 64
  return cfg


def validate(cfg, n_devices, *, check_mesh=True):
  """Raises ConfigError naming the offending key. Call before building anything."""
  from models.eviction import POLICIES
  from models.lm import MIXERS
  bad = list(_unknown_keys(cfg, get_base_config()))
  _check(not bad, bad[0] if bad else '', 'unknown key (typo?); known keys are in configs/base.py')
  m, d, t = cfg.model, cfg.data, cfg.train
  for key in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size'):
    _check(m[key] >= 1, f'model.{key}', f'must be >= 1, got {m[key]}')
  if not m.head_dim:
    _check(m.d_model % m.n_heads == 0, 'model.n_heads',
           f'n_heads={m.n_heads} does not divide d_model={m.d_model} (or set model.head_dim)')
  _check(m.n_heads % m.n_kv_heads == 0, 'model.n_kv_heads',
         f'n_kv_heads={m.n_kv_heads} must divide n_heads={m.n_heads}')
  for name in m.mixer.split(','):
    _check(name.strip() in MIXERS, 'model.mixer',
           f'unknown mixer {name.strip()!r}; one of {sorted(MIXERS)}')
  if 'sliding' in m.mixer:
    _check(m.window >= 1, 'model.window', 'sliding-window attention needs window >= 1')
  _check(m.dtype in DTYPES, 'model.dtype', f'{m.dtype!r} not one of {sorted(DTYPES)}')
  _check(m.remat in ('none', 'block', 'segment'), 'model.remat', f'{m.remat!r} not none|block|segment')
  _check(m.attention_impl in ('xla', 'masked'), 'model.attention_impl', f'{m.attention_impl!r}')
  _check(d.seq_len >= 1, 'data.seq_len', f'must be >= 1, got {d.seq_len}')
  _check(m.segment_len >= 0, 'model.segment_len', f'must be >= 0, got {m.segment_len}')
  if m.segment_len:
    _check(d.seq_len % m.segment_len == 0, 'data.seq_len',
           f'seq_len={d.seq_len} is not divisible by model.segment_len={m.segment_len}')
  _check(t.steps >= 1, 'train.steps', f'must be >= 1, got {t.steps}')
  _check(t.lr > 0, 'train.lr', f'must be > 0, got {t.lr}')
  _check(t.warmup_steps >= 0, 'train.warmup_steps', f'must be >= 0, got {t.warmup_steps}')
  for key in ('log_every', 'eval_every', 'ckpt_every', 'keep_ckpts', 'batch_size'):
    _check(t[key] >= 1, f'train.{key}', f'must be >= 1, got {t[key]}')
  _check(cfg.decode.policy in POLICIES, 'decode.policy',
         f'unknown policy {cfg.decode.policy!r}; one of {sorted(POLICIES)}')
  rules = dict(cfg.axis_rules)
  for axis in ('batch', 'embed', 'vocab', 'heads', 'kv_heads', 'head_dim', 'mlp', 'seq', 'norm'):
    _check(axis in rules, 'axis_rules', f'no rule for logical axis {axis!r}')
  if check_mesh:
    sizes = mesh_shape(cfg.mesh, n_devices)
    batch_shards = sizes['data'] * sizes['fsdp']
    _check(t.batch_size % batch_shards == 0, 'train.batch_size',
           f'batch_size={t.batch_size} is not divisible by mesh data*fsdp={batch_shards}')
    for key, size in (('n_kv_heads', m.n_kv_heads), ('n_heads', m.n_heads),
                      ('mlp_dim', m.mlp_dim or 1)):
      _check(size % sizes['tensor'] == 0, 'mesh.tensor',
             f'tensor={sizes["tensor"]} does not divide model.{key}={size}')
    _check(m.d_model % sizes['fsdp'] == 0, 'mesh.fsdp',
           f'fsdp={sizes["fsdp"]} does not divide model.d_model={m.d_model}')
  return cfg
