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
  # RoPE frequency scaling as in HF config.json: type none | linear (factor) | llama3 (Llama 3.1:
  # all four keys). Filled from the checkpoint with train.init_from=hf:DIR (models/hf_llama.py).
  m.rope_scaling = ml_collections.ConfigDict(dict(
      type='none', factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192))
  m.norm_eps = 1e-6
  m.mixer = 'attention'         # name or comma pattern cycled over layers: 'sliding,attention'
  m.window = 0                  # sliding-window size (mixer 'sliding')
  m.segment_len = 0             # 0: whole sequence as one segment
  m.dtype = 'float32'           # compute dtype; params and memory states stay fp32
  m.tie_embeddings = True
  m.scale_embeddings = True     # multiply embeddings by sqrt(d_model)
  m.remat = 'block'             # none | block | segment
  # Training attention (one chunk, no cache): xla: jax.nn.dot_product_attention (dense
  # [B, heads, T, T] scores) | chunked: blockwise flash attention in pure JAX, O(T * block)
  # memory (models/chunked_attention.py) | cudnn: cuDNN fused attention (GPU, bf16/fp16) |
  # masked: einsum + mask (the decode path's code, a reference).
  m.attention_impl = 'xla'
  m.attention_block = 256       # chunked: query / key block size in tokens (256: the fastest
                                # of 128..1024 in a CPU sweep at 2K and 8K context)
  # Method sections: each memory method's keys, documented in its models/ module.
  m.titans = ti = ml_collections.ConfigDict()   # models/titans.py (mixers titans_*)
  ti.chunk = 16                 # b: tokens per memory chunk (gradients at the chunk start)
  ti.depth = 2                  # L_M: memory MLP layers (1: linear memory)
  ti.expansion = 4              # memory MLP hidden width = expansion * head_dim
  ti.persistent = 16            # N_p learned persistent tokens (MAC/MAG/MAL)
  ti.conv = 4                   # causal depthwise conv kernel on q, k, v (0: none)
  ti.theta_max = 0.1            # cap of the inner learning rate theta
  ti.grad_clip = 1.0            # soft cap of each token's inner gradient norm (0: off)
  ti.gate_bias = (-2.0, 0.0, -5.0)  # initial pre-sigmoid theta, eta, alpha: theta/theta_max
                                # ~ 0.12, eta 0.5, alpha ~ 0.007
  ti.momentum = True            # False: eta = 0 (ablation)
  ti.forget = True              # False: alpha = 0 (ablation)
  ti.mac_write = 'residual'      # MAC write (Eq 24): residual (x + y) | y (attention output only)
  ti.chunk_form = 'closed'      # closed (chunk-end closed form) | scan (per-token + assoc. scan)
  m.infini = inf = ml_collections.ConfigDict()   # models/infini.py (mixer 'infini')
  inf.update_rule = 'linear'    # linear (Eq. 8) | delta (Eq. 9) memory update
  inf.detach = False            # stop gradients into carried (M, z): truncated BPTT (ablation)
  inf.gate_init = 0.0           # beta per head at init; sigmoid(0) = 0.5 mixes memory/local
  inf.memory = True             # False: segment-local attention only (the baseline)
  m.anchor = a = ml_collections.ConfigDict()  # models/anchor.py (mixer 'anchor': AnSAN)
  a.mode = 'ep'                 # ep: existing end-of-sentence ids are anchors | ac: <AC> only
  a.ep_ids = (46, 10)           # EP anchors: bytes of '.' and '\n' (Llama '.': 29889)
  a.ac_id = 259                 # the <AC> id (byte tokenizer); AC data: data.source='ac:...'
  a.ac_init_from = 46           # init_from into AC mode: <AC> embedding := this id's; -1: off
  a.bos_id = 257                # a BOS starts a new document (packing): no attention across
  a.pad_id = 256                # padding: masked as query and as key

  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'           # stdlib | glob:PATTERN | tfds:NAME[:FEATURE] | synthetic:TASK
  d.tfds_data_dir = ''
  d.tokenizer = 'auto'          # byte | hf:DIR (tokenizer.json / tokenizer.model) | auto: the
                                # train.init_from=hf:DIR model's own, else byte
  d.seq_len = 256
  d.eval_batches = 8
  d.loss = 'all'                # all | answer: train on synthetic examples' answer tokens only

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 16             # global batch (sequences)
  t.microbatches = 1            # gradient accumulated over this many slices of the batch
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
  t.xla_options = ''            # 'name=value,...': XLA compile options of the train step
  # Optimizer groups: ((path regex, lr multiplier, weight decay on/off), ...); the first
  # regex found (re.search) in a parameter path like 'blocks/0/mixer/beta' picks its group.
  t.param_groups = ()

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: the rest
  # logical axis -> mesh axes. Models speak only the logical names.
  c.axis_rules = (
      ('batch', ('data', 'fsdp')), ('seq', None), ('embed', 'fsdp'), ('vocab', 'tensor'),
      ('heads', 'tensor'), ('kv_heads', 'tensor'), ('head_dim', None), ('mlp', 'tensor'),
      ('norm', None), ('conv', None), ('gate', None), ('mem_in', None), ('mem_out', None),
      ('persist', None),
  )
  c.distributed = False         # call jax.distributed.initialize() (multi-host / multi-process)

  c.decode = de = ml_collections.ConfigDict()
  de.policy = 'none'            # none | keep_all | recency | h2o | l2 | namm | anchor (eviction)
  de.window = 256               # recency window
  de.capacity = 0               # KV slots per layer; 0: prompt + new tokens
  de.prefill_chunk = 0          # read the prompt in pieces (policy acts on each); 0: at once
  de.max_new_tokens = 64
  de.temperature = 0.0          # 0: greedy
  de.top_p = 1.0                # nucleus sampling (with temperature > 0); 1: off

  # NAMM / baseline policy keys (models/namm.py): h2o and l2 keep `budget` tokens per head,
  # `recent` of them the newest; namm loads an evolve.py run (its shipped mean or best).
  de.budget = 256
  de.recent = 32
  de.namm_run = ''              # evolve.py workdir ('' : zero parameters = keep everything)
  de.namm_which = 'best_val'    # best_val (shipped: best val mean) | mean (last) | best member

  c.namm = n = ml_collections.ConfigDict()   # models/namm.py (eviction network)
  n.update_interval = 512       # new tokens between evictions (official 512; prefill_chunk too)
  n.n_fft = 32                  # STFT window = n_fft (periodic Hann), no centring
  n.hop = 16
  n.gamma = 0.99                # EMA decay per token
  n.rec_dim = 8                 # sinusoidal recency features
  n.max_freq = 50000.0
  n.hidden = 32                 # BAM width (4172 parameters with the defaults)

  c.evolve = ev = ml_collections.ConfigDict()   # evolve.py (NAMM search; training/evolve.py)
  ev.base = ''                  # train.py workdir of the frozen base LM
  ev.strategy = 'cma_es'        # cma_es | sep_cma_es | snes | open_es
  ev.population = 32
  ev.sigma0 = 0.065
  ev.lr = 0.01                  # open_es only (adam)
  ev.cache_weight = 0.0         # fitness -= this x mean cache fraction (0: official, score only)
  ev.stages = ('passkey', 'passkey,niah', 'passkey,niah,corpus')   # task curriculum
  ev.generations = (100, 100, 100)   # per stage
  ev.length = 512               # tokens per prompt (context + answer)
  ev.prompts = 16               # per task per generation (sampled from the pool)
  ev.pool = 64                  # training prompts per task (train split)
  ev.eval_prompts = 32          # held-out prompts per task (eval split)
  ev.eval_every = 10            # generations; validates the mean (training pool; held-out reported)
  ev.ckpt_every = 10
  ev.keep_ckpts = 3
  ev.log_every = 1
  ev.pop_devices = -1           # 'pop' mesh axis size (-1: all devices)

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
