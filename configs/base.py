"""Every config key mnemax knows, with defaults. Experiment files start from this.

Unknown keys are an error (see training/config.py), so a typo in a config file or in
`--config.x=y` fails before anything is compiled, with a message naming the key.
"""
import ml_collections


def get_base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 260            # byte tokenizer: 256 bytes + PAD/BOS/EOS/<AC>
  m.d_model = 128
  m.n_layers = 2
  m.n_heads = 4
  m.n_kv_heads = 2
  m.head_dim = 0                # 0: d_model // n_heads
  m.mlp_dim = 0                 # 0: 8/3 d_model rounded up to a multiple of 64
  m.rope_theta = 10000.0
  m.norm_eps = 1e-6
  m.mixer = 'attention'         # name or comma pattern cycled over layers: 'sliding,attention'
  m.window = 0                  # sliding-window size (mixer 'sliding')
  m.segment_len = 0             # 0: whole sequence as one segment
  m.dtype = 'float32'           # compute dtype; params and memory states stay fp32
  m.tie_embeddings = True
  m.scale_embeddings = True     # multiply embeddings by sqrt(d_model)
  m.remat = 'block'             # none | block | segment
  m.attention_impl = 'xla'      # xla: jax.nn.dot_product_attention | masked: einsum + mask
  # Method sections: each memory method's keys, documented in its models/ module.
  m.titans = ml_collections.ConfigDict()     # models/titans.py
  m.infini = ml_collections.ConfigDict()     # models/infini.py
  m.anchor = ml_collections.ConfigDict()     # models/anchor.py

  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'           # stdlib | glob:PATTERN | tfds:NAME[:FEATURE] | synthetic:TASK
  d.tfds_data_dir = ''
  d.seq_len = 256
  d.eval_batches = 8

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 16             # global batch (sequences)
  t.steps = 1000
  t.lr = 3e-3
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.log_every = 10
  t.eval_every = 200
  t.ckpt_every = 200
  t.keep_ckpts = 3
  t.async_ckpt = True
  t.peak_flops = 0.0            # per device; 0: measured with a matmul at start-up
  t.init_from = ''              # checkpoint dir (or workdir) to initialise the model from

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: the rest
  # logical axis -> mesh axes. Models speak only the logical names.
  c.axis_rules = (
      ('batch', ('data', 'fsdp')), ('seq', None), ('embed', 'fsdp'), ('vocab', 'tensor'),
      ('heads', 'tensor'), ('kv_heads', 'tensor'), ('head_dim', None), ('mlp', 'tensor'),
      ('norm', None),
  )
  c.distributed = False         # call jax.distributed.initialize() (multi-host / multi-process)

  c.decode = de = ml_collections.ConfigDict()
  de.policy = 'none'            # none | keep_all | recency (eviction policy)
  de.window = 256               # recency window
  de.capacity = 0               # KV slots per layer; 0: prompt + new tokens
  de.prefill_chunk = 0          # read the prompt in pieces (policy acts on each); 0: at once
  de.max_new_tokens = 64
  de.temperature = 0.0          # 0: greedy

  c.namm = ml_collections.ConfigDict()       # models/namm.py (eviction network)
  c.evolve = ml_collections.ConfigDict()     # evolve.py (NAMM search)

  c.eval = e = ml_collections.ConfigDict()
  e.tasks = ('passkey', 'niah', 'mqar')
  e.lengths = (512,)
  e.depths = (0.1, 0.5, 0.9)
  e.examples = 8                # per (task, length, depth) cell
  e.buckets = 4                 # loss by position bucket
  return c


def apply_preset(config, presets, arg):
  """Updates `config` with the preset named by the `--config=file.py:ARG` suffix."""
  arg = arg or 'tiny'
  if arg not in presets:
    raise ValueError(f'--config preset {arg!r} unknown; one of {sorted(presets)}')
  for section, values in presets[arg].items():
    config[section].update(values)
  return config


def get_config(arg=None):
  """The defaults alone (used to type `--config.x=y` overrides, e.g. by evaluate.py)."""
  del arg
  return get_base_config()
