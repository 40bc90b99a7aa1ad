"""Config resolution and validation: every error names the key, before anything compiles.

Generic checks live here (unknown keys, sizes, mesh, training keys); each method's own keys
are checked by the validate it registered (models/registry.py) when a config uses it."""
import math

import jax
import ml_collections

from configs.base import get_base_config
from data import pipeline, synthetic
from data.sources import SPLITS
from models import registry
from models.layers import DTYPES
from models.registry import ConfigError, check as _check


def _unknown_keys(cfg, ref, prefix=''):
  for k in cfg.keys():
    if k not in ref:
      yield prefix + k
    elif isinstance(cfg[k], ml_collections.ConfigDict) and isinstance(ref[k], ml_collections.ConfigDict):
      yield from _unknown_keys(cfg[k], ref[k], prefix + k + '.')


def key_node(cfg, key):
  """(parent ConfigDict, leaf name) of a dotted key of cfg; ConfigError naming the key if any
  part of it does not exist."""
  *parents, leaf = key.split('.')
  node = cfg
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise ConfigError(f'config.{key}: unknown key')
    node = node[p]
  if leaf not in node:
    raise ConfigError(f'config.{key}: unknown key')
  return node, leaf


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
  """Fills derived model sizes (head_dim, mlp_dim) in place; returns cfg.

  With train.init_from=hf:DIR the architecture keys come from DIR/config.json (see
  _fill_from_hf), and data.tokenizer 'auto' becomes hf:DIR ('byte' without an hf: source).
  """
  m = cfg.model
  with cfg.unlocked():
    init_from = cfg.get('train', {}).get('init_from', '')
    if init_from.startswith('hf:'):
      _fill_from_hf(cfg, init_from[len('hf:'):])
    if 'data' in cfg and 'tokenizer' in cfg.data:
      from data.hf_tokenizer import tokenizer_spec
      cfg.data.tokenizer = tokenizer_spec(cfg.data.tokenizer, init_from)
    if 'anchor' in m and ('anchor' in m.mixer.split(',') or
                          cfg.get('decode', {}).get('policy') == 'anchor'):
      _fill_anchor_ids(m, cfg.data.tokenizer if 'data' in cfg else 'byte')
    if not m.head_dim and m.n_heads and m.d_model % m.n_heads == 0:
      m.head_dim = m.d_model // m.n_heads
    if not m.mlp_dim:
      m.mlp_dim = -(-(8 * m.d_model // 3) // 64) * 64
  return cfg


def _fill_anchor_ids(m, tokenizer):
  """model.anchor's ids left to the tokenizer: EP anchors (ep_ids ()), BOS and PAD (-1), the
  <AC> id (-1) and the id its embedding starts from (-2: '.'); in AC mode the vocabulary
  grows to hold <AC> (an HF tokenizer's new token, one past its ids)."""
  a = m.anchor
  if a.mode == 'ac' and a.ac_id >= m.vocab_size:
    m.vocab_size = int(a.ac_id) + 1
  if len(a.ep_ids) and a.bos_id != -1 and a.ac_id != -1 and a.ac_init_from != -2:
    return
  from data.hf_tokenizer import get_tokenizer, sentence_end_ids
  tok = get_tokenizer('byte' if tokenizer == 'auto' else tokenizer)
  if a.ac_id == -1:
    a.ac_id = int(tok.AC)
  if a.ac_init_from == -2:
    dot = tok.encode('.')
    _check(len(dot) == 1, 'model.anchor.ac_init_from', f"'.' is not one token of "
           f'{tokenizer}: name the id <AC> starts from (or -1: a fresh embedding)')
    a.ac_init_from = int(dot[0])
  if a.mode == 'ac' and a.ac_id >= m.vocab_size:
    m.vocab_size = int(a.ac_id) + 1
  if not len(a.ep_ids):
    a.ep_ids = sentence_end_ids(tok)
    _check(len(a.ep_ids), 'model.anchor.ep_ids', f'no id of {tokenizer} ends a sentence; '
           'list the anchor ids')
  if a.bos_id == -1:
    _check(tok.BOS >= 0, 'model.anchor.bos_id', f'{tokenizer} has no BOS id to separate '
           'documents; set it')
    a.bos_id, a.pad_id = int(tok.BOS), int(tok.PAD) if a.pad_id == -1 else a.pad_id


def _fill_from_hf(cfg, hf_dir):
  """model.* from a Hugging Face Llama-family config.json (models/hf_llama.py): sizes, vocab,
  rope_theta, rope_scaling, norm_eps, tie_embeddings, scale_embeddings=False. They replace the
  config file's values (the weights fix them); the mixer and method keys stay yours. One
  exception: a model.rope_scaling set here on a checkpoint without one is kept (context
  extension by continued pretraining)."""
  from models.hf_llama import model_config
  try:
    values = model_config(hf_dir)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f'config.train.init_from: {e}') from None
  m = cfg.model
  for key, value in values.items():
    if key != 'rope_scaling':
      m[key] = value
    elif value['type'] != 'none' or m.rope_scaling.type == 'none':
      m.rope_scaling.update(value)


def _validate_hf(cfg):
  """model.rope_scaling, data.tokenizer (train.init_from=hf:DIR is checked by resolve)."""
  import os
  s, tok = cfg.model.rope_scaling, cfg.data.tokenizer
  _check(s.type in ('none', 'linear', 'llama3'), 'model.rope_scaling.type',
         f'{s.type!r} not none|linear|llama3')
  if s.type != 'none':
    _check(s.factor > 0, 'model.rope_scaling.factor', f'must be > 0, got {s.factor}')
  if s.type == 'llama3':
    _check(0 < s.low_freq_factor < s.high_freq_factor, 'model.rope_scaling.high_freq_factor',
           f'need 0 < low_freq_factor < high_freq_factor, got {s.low_freq_factor}, '
           f'{s.high_freq_factor}')
    _check(s.original_max_position_embeddings >= 1,
           'model.rope_scaling.original_max_position_embeddings', 'must be >= 1')
  _check(tok in ('byte', 'auto') or tok.startswith('hf:'), 'data.tokenizer',
         f"{tok!r} not byte | auto | hf:DIR")
  if tok.startswith('hf:'):
    d = tok[len('hf:'):]
    _check(any(os.path.isfile(os.path.join(d, f)) for f in ('tokenizer.json', 'tokenizer.model')),
           'data.tokenizer', f'{d!r} has neither tokenizer.json nor tokenizer.model')
    from data.hf_tokenizer import get_tokenizer
    n = get_tokenizer(tok).vocab_size
    _check(n <= cfg.model.vocab_size, 'data.tokenizer',
           f'{n} token ids do not fit model.vocab_size={cfg.model.vocab_size}')
    src = cfg.data.source
    _check('synthetic:' not in src, 'data.source',
           f'{src!r}: the synthetic tasks are written in byte ids, not in {tok}\'s; train on '
           'text (evaluate long context with ruler.tasks, which speak any tokenizer)')


def _validate_zoology(cfg):
  """data.source zoology:mqar[:KEY=VALUE,...]: its parameters, seq_len and the vocabulary fit;
  its ids are the task's own (no tokenizer, every target weighted by the task)."""
  from data import zoology
  d = cfg.data
  try:
    params = zoology.parse(d.source)
    zoology.check(d.seq_len, params.get('vocab', 8192), params.get('pairs', 8))
  except ValueError as e:
    _check(False, 'data.source', f'{d.source!r}: {e}')
  vocab = params.get('vocab', 8192)
  _check(vocab <= cfg.model.vocab_size, 'model.vocab_size',
         f'{cfg.model.vocab_size} < the task\'s vocab {vocab} (data.source={d.source!r})')
  _check(d.tokenizer in ('byte', 'auto') and not cfg.train.init_from.startswith('hf:'),
         'data.tokenizer', f'zoology: sources are token ids of their own, not {d.tokenizer}\'s')
  _check(d.loss == 'all', 'data.loss', "zoology: sources weigh the queried values only: "
         "leave data.loss='all'")


def _validate_ruler(r):
  """ruler.*: known task names, lengths, depths in [0, 1], counts."""
  from data import ruler
  for task in r.tasks:
    _check(task in ruler.TASKS, 'ruler.tasks', f'unknown task {task!r}; one of '
           f'{sorted(ruler.TASKS)}')
  _check(all(int(n) >= 64 for n in r.lengths), 'ruler.lengths',
         f'lengths must be >= 64 tokens, got {tuple(r.lengths)}')
  _check(all(0 <= d <= 1 for d in r.depths), 'ruler.depths',
         f'depths are fractions in [0, 1], got {tuple(r.depths)}')
  _check(r.examples >= 1, 'ruler.examples', f'must be >= 1, got {r.examples}')
  for key in ('max_new_tokens', 'num_needle_k', 'num_needle_v', 'num_needle_q', 'num_hops',
              'num_chains'):
    _check(r[key] >= 0, f'ruler.{key}', f'must be >= 0 (0: the task\'s own), got {r[key]}')


def _validate_param_groups(cfg):
  """train.param_groups: (regex, lr multiplier, weight decay bool) entries."""
  import re
  for i, group in enumerate(cfg.train.param_groups):
    _check(len(group) == 3, 'train.param_groups', f'entry {i} must be (regex, lr multiplier, '
           f'weight decay bool), got {group!r}')
    try:
      re.compile(group[0])
    except re.error as e:
      raise ConfigError(f'config.train.param_groups: entry {i} regex {group[0]!r}: {e}') from None
    _check(group[1] > 0, 'train.param_groups', f'entry {i} lr multiplier must be > 0')


def xla_options(train_cfg):
  """train.xla_options 'name=value,...' as jax.jit compiler_options (true/false: bools,
  digits: ints, anything else: the string, e.g. '' for an empty list)."""
  out = {}
  for item in filter(None, train_cfg.xla_options.split(',')):
    name, eq, value = item.partition('=')
    _check(eq and name, 'train.xla_options', f"{item!r} is not name=value")
    value = {'true': True, 'false': False}.get(value.lower(), value)
    out[name.strip()] = int(value) if isinstance(value, str) and value.isdigit() else value
  return out


def validate(cfg, n_devices, *, check_mesh=True):
  """Raises ConfigError naming the offending key. Call before building anything."""
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
  methods = [registry.mixer(name.strip()) for name in m.mixer.split(',')]
  methods.append(registry.policy(cfg.decode.policy))
  _check(m.dtype in DTYPES, 'model.dtype', f'{m.dtype!r} not one of {sorted(DTYPES)}')
  _check(m.remat in ('none', 'block', 'segment'), 'model.remat', f'{m.remat!r} not none|block|segment')
  _validate_attention(m, n_devices)
  _check(d.seq_len >= 1, 'data.seq_len', f'must be >= 1, got {d.seq_len}')
  _check(d.loss in ('all', 'answer'), 'data.loss', f'{d.loss!r} not all|answer')
  _check(d.read_threads >= 1, 'data.read_threads', f'must be >= 1, got {d.read_threads}')
  _check(d.prefetch >= 0, 'data.prefetch', f'must be >= 0, got {d.prefetch}')
  _check(d.eval_batches >= 0, 'data.eval_batches', f'must be >= 0, got {d.eval_batches}')
  _check(cfg.eval.split in SPLITS, 'eval.split', f'{cfg.eval.split!r} not one of {SPLITS}')
  text = pipeline.is_text(d.source)
  _check(text or d.eval_batches, 'data.eval_batches',
         f'0 (every window) needs a text source, got {d.source!r}')
  _check(text or cfg.eval.split != 'all', 'eval.split',
         f"'all' needs a text source, got {d.source!r}")
  if d.source.startswith('zoology:'):
    _validate_zoology(cfg)
  _check(0 <= cfg.decode.compression_ratio < 1, 'decode.compression_ratio',
         f'must be in [0, 1), got {cfg.decode.compression_ratio}')
  if cfg.decode.compression_ratio and cfg.decode.policy != 'none':
    from models.presses import check_ratio_policy
    check_ratio_policy(cfg.decode.policy)
  _check(0 <= t.loss_positions <= d.seq_len, 'train.loss_positions',
         f'must be in [0, data.seq_len={d.seq_len}], got {t.loss_positions}')
  _check(0 <= t.stop_at_accuracy <= 1, 'train.stop_at_accuracy',
         f'must be in [0, 1], got {t.stop_at_accuracy}')
  parts = d.source[len('mix:'):].split('+') if d.source.startswith('mix:') else [d.source]
  if d.loss == 'answer':
    _check(any(p.startswith(('synthetic:', 'ruler:')) for p in parts), 'data.loss',
           "'answer' needs task examples (synthetic: or ruler:) in data.source, got "
           f'{d.source!r}')
  for p in parts:
    if p.startswith('ruler:'):
      from data import ruler
      bad = [t for t in p[len('ruler:'):].split(',') if t not in ruler.TASKS]
      _check(not bad, 'data.source', f'{p!r}: unknown RULER task {bad[0] if bad else ""!r}; '
             f'one of {sorted(ruler.TASKS)}')
  _check(m.segment_len >= 0, 'model.segment_len', f'must be >= 0, got {m.segment_len}')
  if m.segment_len:
    _check(d.seq_len % m.segment_len == 0, 'data.seq_len',
           f'seq_len={d.seq_len} is not divisible by model.segment_len={m.segment_len}')
  _check(t.steps >= 1, 'train.steps', f'must be >= 1, got {t.steps}')
  _check(t.lr > 0, 'train.lr', f'must be > 0, got {t.lr}')
  for key in ('lr', 'weight_decay', 'b1', 'b2', 'grad_clip', 'min_lr_ratio', 'peak_flops'):
    _check(math.isfinite(t[key]), f'train.{key}', f'must be finite, got {t[key]}')
  _check(t.warmup_steps >= 0, 'train.warmup_steps', f'must be >= 0, got {t.warmup_steps}')
  for key in ('log_every', 'eval_every', 'ckpt_every', 'keep_ckpts', 'batch_size',
              'microbatches'):
    _check(t[key] >= 1, f'train.{key}', f'must be >= 1, got {t[key]}')
  if t.xla_options:
    try:                      # an unknown name fails here, not after the model compiled
      jax.jit(lambda x: x + 1, compiler_options=xla_options(t)).lower(1.0).compile()
    except jax.errors.JaxRuntimeError as e:
      raise ConfigError(f'config.train.xla_options: {e}') from None
  _validate_param_groups(cfg)
  _validate_hf(cfg)
  _validate_ruler(cfg.ruler)
  for method_validate in dict.fromkeys(m.validate for m in methods if m.validate):   # once each
    method_validate(cfg)
  _validate_evolve(cfg)
  rules = dict(cfg.axis_rules)
  for axis in ('batch', 'embed', 'vocab', 'heads', 'kv_heads', 'head_dim', 'mlp', 'seq', 'norm'):
    _check(axis in rules, 'axis_rules', f'no rule for logical axis {axis!r}')
  if check_mesh:
    sizes = mesh_shape(cfg.mesh, n_devices)
    batch_shards = sizes['data'] * sizes['fsdp']
    _check(t.batch_size % batch_shards == 0, 'train.batch_size',
           f'batch_size={t.batch_size} is not divisible by mesh data*fsdp={batch_shards}')
    _check(t.batch_size % (t.microbatches * batch_shards) == 0, 'train.microbatches',
           f'batch_size={t.batch_size} is not divisible by microbatches={t.microbatches} x '
           f'mesh data*fsdp={batch_shards}')
    for key, size in (('n_kv_heads', m.n_kv_heads), ('n_heads', m.n_heads),
                      ('mlp_dim', m.mlp_dim or 1)):
      _check(size % sizes['tensor'] == 0, 'mesh.tensor',
             f'tensor={sizes["tensor"]} does not divide model.{key}={size}')
    _check(m.d_model % sizes['fsdp'] == 0, 'mesh.fsdp',
           f'fsdp={sizes["fsdp"]} does not divide model.d_model={m.d_model}')
  return cfg


def _validate_attention(m, n_devices):
  """model.attention_impl and attention_block. cudnn and splash are checked against the
  platform only when jax may start (n_devices > 0: train.py validates once before
  jax.distributed)."""
  from models.ops.attention import IMPLS
  _check(m.attention_impl in IMPLS, 'model.attention_impl',
         f'{m.attention_impl!r} not {"|".join(IMPLS[1:] + IMPLS[:1])}')
  _check(m.attention_block >= 1, 'model.attention_block', f'must be >= 1, got {m.attention_block}')
  if m.attention_impl == 'cudnn':
    _check(m.dtype in ('bfloat16', 'float16'), 'model.attention_impl',
           f'cudnn needs model.dtype bfloat16 or float16, got {m.dtype!r}')
  needs = dict(cudnn='gpu', splash='tpu').get(m.attention_impl)
  if needs and n_devices:
    platform = jax.devices()[0].platform
    _check(platform == needs, 'model.attention_impl',
           f'{m.attention_impl} needs a {needs.upper()}, this platform is {platform!r} (use '
           'auto, xla or chunked)')


def _validate_evolve(cfg):
  """The `evolve` section (evolve.py; the `namm` keys are the NAMM policy's)."""
  ev = cfg.evolve
  _check(ev.strategy in ('cma_es', 'sep_cma_es', 'snes', 'open_es'), 'evolve.strategy',
         f'{ev.strategy!r} not one of cma_es|sep_cma_es|snes|open_es')
  _check(ev.population >= 2, 'evolve.population', f'must be >= 2, got {ev.population}')
  if ev.strategy == 'open_es':
    _check(ev.population % 2 == 0, 'evolve.population', 'open_es needs an even population')
  _check(ev.sigma0 > 0, 'evolve.sigma0', f'must be > 0, got {ev.sigma0}')
  _check(ev.cache_weight >= 0, 'evolve.cache_weight', f'must be >= 0, got {ev.cache_weight}')
  _check(0 <= ev.compression_ratio < 1, 'evolve.compression_ratio',
         f'must be in [0, 1), got {ev.compression_ratio}')
  _check(len(ev.stages) == len(ev.generations) and len(ev.stages) >= 1, 'evolve.generations',
         f'one generation count per stage: {len(ev.stages)} stages, {len(ev.generations)} counts')
  from data import ruler
  known = synthetic.TASKS + ('corpus',) + tuple(f'ruler:{t}' for t in ruler.TASKS)
  for stage in ev.stages:
    for task in stage.split(','):
      _check(task.strip() in known, 'evolve.stages',
             f'unknown task {task.strip()!r} in stage {stage!r}; tasks: '
             f"{'|'.join(synthetic.TASKS + ('corpus',))} | ruler:TASK (data/ruler.py)")
  for key in ('length', 'prompts', 'pool', 'eval_prompts', 'eval_every', 'ckpt_every',
              'keep_ckpts', 'log_every'):
    _check(ev[key] >= 1, f'evolve.{key}', f'must be >= 1, got {ev[key]}')
  _check(ev.prompts <= ev.pool, 'evolve.prompts', f'must be <= evolve.pool={ev.pool}')
  for key in ('pool', 'eval_prompts'):
    _check(ev[key] % ev.prompts == 0, f'evolve.{key}',
           f'{ev[key]} must be a multiple of evolve.prompts={ev.prompts} (one compiled shape)')
