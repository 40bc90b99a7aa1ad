"""Hugging Face Llama-family checkpoints (Llama 2/3, Mistral-style GQA) <-> the mnemax LM.

A checkpoint directory holds config.json and model.safetensors (or shards listed in
model.safetensors.index.json); pickle (.bin) checkpoints are never read.

  model_config(hf_dir)       mnemax `model.*` values from config.json (training/config.py
                             `resolve` applies them when train.init_from=hf:DIR)
  Checkpoint(hf_dir).read(path, shape, index)
                             one slice of an mnemax parameter, read from the files: only the
                             rows of the HF tensor that the slice needs are touched (the file
                             is memory-mapped), so a device reading its shard of a sharded
                             parameter never holds the whole tensor
  export_hf(state, cfg, dir) config.json + model.safetensors that transformers loads

Layouts (HF stores torch Linear weights [out, in]; mnemax keeps [in, out] with heads split):
  q_proj [N*H, D] -> wq [D, N, H];  k/v_proj [K*H, D] -> wk/wv [D, K, H];  o_proj [D, N*H]
  -> wo [N, H, D];  gate/up_proj [F, D] -> w_gate/w_up [D, F];  down_proj [D, F] -> w_down
  [F, D];  embed_tokens [V, D] -> embed [V_pad, D];  lm_head [V, D] -> head [D, V_pad]
  (V_pad: models/lm.py padded_vocab; pad rows are zero on import, dropped on export).
Both use RoPE in the 'rotate_half' layout, so q/k need no permutation.
"""
import json
import math
import os

import ml_dtypes
import numpy as np

SUPPORTED_TYPES = ('llama', 'mistral')
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16}
_ROPE_DEFAULTS = dict(factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


# --- config.json -> model.* -------------------------------------------------------------------

def read_config(hf_dir):
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{hf_dir!r} has no config.json (expected a Hugging Face model directory)')
  with open(path) as f:
    return json.load(f)


def _rope(c):
  """(rope_theta, rope_scaling dict) from either config.json format: transformers >= 5
  'rope_parameters', or the older top-level 'rope_theta' + 'rope_scaling'."""
  params = {**(c.get('rope_parameters') or {}), **(c.get('rope_scaling') or {})}
  theta = float(params.get('rope_theta', c.get('rope_theta', 10000.0)))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return theta, dict(type='none', **_ROPE_DEFAULTS)
  if kind == 'linear':
    return theta, dict(_ROPE_DEFAULTS, type='linear', factor=float(params['factor']))
  if kind == 'llama3':
    orig = params.get('original_max_position_embeddings', c.get('max_position_embeddings'))
    return theta, dict(type='llama3', factor=float(params['factor']),
                       low_freq_factor=float(params['low_freq_factor']),
                       high_freq_factor=float(params['high_freq_factor']),
                       original_max_position_embeddings=int(orig))
  raise ValueError(f'RoPE scaling type {kind!r} is not supported (default, linear, llama3)')


def model_config(hf_dir):
  """The mnemax `model.*` values of the checkpoint in `hf_dir`. ValueError if unsupported."""
  c = read_config(hf_dir)
  if c.get('model_type') not in SUPPORTED_TYPES:
    raise ValueError(f'model_type {c.get("model_type")!r} in {hf_dir}/config.json is not one '
                     f'of {SUPPORTED_TYPES}')
  for key, want in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False),
                    ('sliding_window', None), ('partial_rotary_factor', 1.0)):
    if c.get(key, want) != want:
      raise ValueError(f'{hf_dir}/config.json: {key}={c[key]!r} is not supported (only {want!r})')
  theta, scaling = _rope(c)
  n_heads = c['num_attention_heads']
  return dict(
      d_model=c['hidden_size'], n_layers=c['num_hidden_layers'], n_heads=n_heads,
      n_kv_heads=c.get('num_key_value_heads') or n_heads,
      head_dim=c.get('head_dim') or c['hidden_size'] // n_heads,
      mlp_dim=c['intermediate_size'], vocab_size=c['vocab_size'], rope_theta=theta,
      rope_scaling=scaling, norm_eps=float(c.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(c.get('tie_word_embeddings', False)), scale_embeddings=False)


# --- parameter layouts ------------------------------------------------------------------------

def param_name(keypath):
  """'blocks/0/mixer/wq' for a jax key path into an nnx.State (the trailing .value dropped)."""
  names = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in keypath]
  return '/'.join(n for n in names if n != 'value')


def layout(name, m):
  """(HF tensor name, split, perm) for mnemax parameter `name` of model config `m`, or None.

  The HF tensor reshaped to the flattened `split` groups (one tuple of sizes per HF dim),
  then transposed by `perm`, is the mnemax parameter (before vocab padding).
  """
  D, N, K, H, F, V = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
  fixed = {'embed': ('model.embed_tokens.weight', ((V,), (D,)), (0, 1)),
           'head': ('lm_head.weight', ((V,), (D,)), (1, 0)),
           'norm/scale': ('model.norm.weight', ((D,),), (0,))}
  if name in fixed:
    return fixed[name]
  parts = name.split('/')
  if len(parts) != 4 or parts[0] != 'blocks':
    return None
  pre, key = f'model.layers.{parts[1]}.', '/'.join(parts[2:])
  per_layer = {
      'norm1/scale': ('input_layernorm.weight', ((D,),), (0,)),
      'norm2/scale': ('post_attention_layernorm.weight', ((D,),), (0,)),
      'mixer/wq': ('self_attn.q_proj.weight', ((N, H), (D,)), (2, 0, 1)),
      'mixer/wk': ('self_attn.k_proj.weight', ((K, H), (D,)), (2, 0, 1)),
      'mixer/wv': ('self_attn.v_proj.weight', ((K, H), (D,)), (2, 0, 1)),
      'mixer/wo': ('self_attn.o_proj.weight', ((D,), (N, H)), (1, 2, 0)),
      'mlp/w_gate': ('mlp.gate_proj.weight', ((F,), (D,)), (1, 0)),
      'mlp/w_up': ('mlp.up_proj.weight', ((F,), (D,)), (1, 0)),
      'mlp/w_down': ('mlp.down_proj.weight', ((D,), (F,)), (1, 0)),
  }
  if key not in per_layer:
    return None
  hf, split, perm = per_layer[key]
  return pre + hf, split, perm


# --- reading ----------------------------------------------------------------------------------

class Checkpoint:
  """The tensors of a safetensors checkpoint directory, memory-mapped on demand.

  safetensors' own numpy reader cannot return bfloat16 (numpy has no such dtype), and Llama
  checkpoints are bfloat16, so the (simple, documented) format is read here with np.memmap:
  8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, data.
  """

  def __init__(self, hf_dir):
    self.dir = hf_dir
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
    if not files:
      raise ValueError(f'{hf_dir!r} has no *.safetensors files (pickle .bin checkpoints are '
                       'not read: re-save with save_pretrained(safe_serialization=True))')
    self.tensors = {}                        # name -> (file, dtype, shape, byte offset)
    for name in files:
      path = os.path.join(hf_dir, name)
      with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(n))
      for key, info in header.items():
        if key == '__metadata__':
          continue
        if info['dtype'] not in _DTYPES:
          raise ValueError(f'{path}: tensor {key} has dtype {info["dtype"]}; only '
                           f'{sorted(_DTYPES)} are read')
        self.tensors[key] = (path, _DTYPES[info['dtype']], tuple(info['shape']),
                             8 + n + info['data_offsets'][0])

  def tensor(self, key):
    """The whole tensor as a read-only memory map (nothing is read until sliced)."""
    if key not in self.tensors:
      raise ValueError(f'tensor {key!r} is not in the safetensors files of {self.dir}')
    path, dtype, shape, offset = self.tensors[key]
    if not math.prod(shape):
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape)

  def check(self, name, m):
    """The HF name of mnemax parameter `name`; ValueError unless present with its shape."""
    spec = layout(name, m)
    if spec is None:
      raise ValueError(f'parameter {name} has no Llama counterpart')
    hf_name, split, _ = spec
    want = tuple(math.prod(g) for g in split)
    if hf_name not in self.tensors:
      raise ValueError(f'tensor {hf_name!r} (for {name}) is not in {self.dir}')
    if self.tensors[hf_name][2] != want:
      raise ValueError(f'tensor {hf_name!r} has shape {self.tensors[hf_name][2]} in {self.dir}; '
                       f'config.json implies {want}')
    return hf_name

  def read(self, name, shape, index, m):
    """The block `index` (a tuple of slices) of mnemax parameter `name` of `shape`."""
    hf_name, split, perm = layout(name, m)
    view = [s for group in split for s in group]
    ranges = [sl.indices(n)[:2] for sl, n in zip(index, shape)]
    view_ranges = [None] * len(view)
    for i, p in enumerate(perm):
      view_ranges[p] = ranges[i]
    # Vocab padding: the mnemax dim may be longer than the HF one; the rest is zeros.
    clipped = [(min(a, n), min(b, n)) for (a, b), n in zip(view_ranges, view)]
    block = self._read_view(self.tensor(hf_name), split, clipped)
    block = np.asarray(block).transpose(perm).astype(np.float32)
    pad = [(0, (b - a) - s) for (a, b), s in zip(ranges, block.shape)]
    return np.pad(block, pad) if any(p for _, p in pad) else block

  @staticmethod
  def _read_view(w, split, clipped):
    """The block `clipped` (ranges over the flattened split dims) of HF tensor `w`."""
    hf_index, inner, i = [], [], 0
    for group in split:
      (a, b), rest = clipped[i], group[1:]
      stride = math.prod(rest)
      hf_index.append(slice(a * stride, b * stride))      # whole leading units: contiguous
      inner.append((b - a,) + rest)
      i += len(group)
    block = w[tuple(hf_index)]
    block = np.asarray(block).reshape([n for g in inner for n in g])
    return block[tuple(slice(a, b) if j not in _leads(split) else slice(None)
                       for j, (a, b) in enumerate(clipped))]


def _leads(split):
  """Indices of the first flattened dim of each HF dim (read as ranges already)."""
  out, i = set(), 0
  for group in split:
    out.add(i)
    i += len(group)
  return out


# --- writing ----------------------------------------------------------------------------------

def to_hf(name, value, m):
  """(HF name, HF-layout numpy array) of an mnemax parameter value (full, on host)."""
  hf_name, split, perm = layout(name, m)
  view = [s for group in split for s in group]
  x = np.asarray(value).transpose(np.argsort(perm))
  x = x[tuple(slice(0, n) for n in view)]                 # drop vocab padding
  return hf_name, x.reshape([math.prod(g) for g in split])


def hf_config(m, base=None, dtype='float32'):
  """config.json for model config `m`; `base`: a config.json dict to start from (keeps
  its token ids, max_position_embeddings, ...)."""
  if m.scale_embeddings:
    raise ValueError('model.scale_embeddings=True has no Llama equivalent (export needs False)')
  c = dict(base or {})
  for key in ('rope_parameters', 'rope_scaling', 'torch_dtype', 'dtype'):
    c.pop(key, None)
  s = m.rope_scaling
  scaling = None if s.type == 'none' else (
      dict(rope_type='linear', factor=s.factor) if s.type == 'linear' else dict(
          rope_type='llama3', factor=s.factor, low_freq_factor=s.low_freq_factor,
          high_freq_factor=s.high_freq_factor,
          original_max_position_embeddings=s.original_max_position_embeddings))
  c.setdefault('max_position_embeddings', 2048)
  c.update(architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=m.d_model,
           intermediate_size=m.mlp_dim, num_hidden_layers=m.n_layers,
           num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
           head_dim=m.head_dim, vocab_size=m.vocab_size, rms_norm_eps=m.norm_eps,
           rope_theta=m.rope_theta, rope_scaling=scaling, hidden_act='silu',
           attention_bias=False, mlp_bias=False, tie_word_embeddings=m.tie_embeddings,
           torch_dtype=dtype)
  return c


def export_hf(params, m, out_dir, *, dtype='float32', base_config=None,
              max_shard_bytes=4 * 2**30, write=True):
  """Writes `out_dir`/config.json and model.safetensors (or shards + index) for
  transformers' LlamaForCausalLM.

  params: {mnemax name ('blocks/0/mixer/wq', see param_name): host array or a callable
  returning it} (callables let the caller gather one parameter at a time, in the same
  order on every process). Parameters with no Llama counterpart (a memory mixer's) are an
  error naming them. write=False: fetch everything, write nothing (the other processes).
  """
  from safetensors.numpy import save_file
  np_dtype = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[dtype]
  extra = sorted(n for n in params if layout(n, m) is None)
  if extra:
    raise ValueError(f'parameters with no Llama counterpart: {extra}')
  config = hf_config(m, base_config, dtype)
  if write:
    os.makedirs(out_dir, exist_ok=True)
  written, current, size = [], {}, 0        # one shard in memory at a time

  def flush():
    path = os.path.join(out_dir, f'.shard{len(written)}.tmp')
    if write:
      save_file(current, path, metadata={'format': 'pt'})
    written.append((path, sorted(current), size))

  for name in sorted(params, key=_order):
    value = params[name]() if callable(params[name]) else params[name]
    hf_name, x = to_hf(name, value, m)
    x = np.ascontiguousarray(x.astype(np_dtype))
    if current and size + x.nbytes > max_shard_bytes:
      flush()
      current, size = {}, 0
    current[hf_name], size = x, size + x.nbytes
  flush()
  if not write:
    return []
  n = len(written)
  files = (['model.safetensors'] if n == 1 else
           [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)])
  for f, (tmp, _, _) in zip(files, written):
    os.replace(tmp, os.path.join(out_dir, f))
  if n > 1:
    index = dict(metadata=dict(total_size=sum(s for _, _, s in written)),
                 weight_map={k: f for f, (_, keys, _) in zip(files, written) for k in keys})
    with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as fh:
      json.dump(index, fh, indent=2)
  with open(os.path.join(out_dir, 'config.json'), 'w') as fh:
    json.dump(config, fh, indent=2)
  return files


def _order(name):
  """embed, blocks in layer order, norm, head (the order HF files list them)."""
  parts = name.split('/')
  return (1, int(parts[1]), name) if parts[0] == 'blocks' else (
      {'embed': 0, 'norm': 2, 'head': 3}.get(parts[0], 4), 0, name)
