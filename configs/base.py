"""Every config key mnemax knows, with defaults. Experiment files start from this.

A method's own keys live with the method (models/registry.py) and are added here. Unknown
keys are an error (see training/config.py), so a typo in a config file or in
`--config.x=y` fails before anything is compiled, with a message naming the key.
"""
import ml_collections

from models import registry


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
  # Attention backend of every mixer's training chunk (models/ops/attention.py; a cache or an
  # explicit mask take the dense masked path, a persistent prefix chunked or dense): auto: the
  # fastest correct one for the platform and dtype (chunked on CPU, cudnn on GPU for
  # bf16/fp16 else xla, splash on TPU) | xla: jax.nn.dot_product_attention (dense [B, heads,
  # T, T] scores) | chunked: blockwise flash attention in pure JAX, O(T * block) memory |
  # cudnn: cuDNN fused attention (GPU, bf16/fp16) | splash: TPU Pallas splash attention |
  # masked: einsum + mask (the decode path's math, a reference).
  m.attention_impl = 'auto'
  m.attention_block = 256       # chunked / splash: query / key block size in tokens (256: the
                                # fastest of 128..1024 in a CPU sweep at 2K and 8K context)
  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'           # stdlib | pydoc | glob:PATTERN | tfds:NAME[:FEATURE] |
                                # synthetic:TASK | mix:A+B+... (data/sources.py) |
                                # zoology:mqar[:pairs=8,vocab=8192,..] (data/zoology.py) |
                                # ruler:TASK,TASK,.. (RULER examples in the run's tokenizer)
  d.tfds_data_dir = ''
  d.tokenizer = 'auto'          # byte | hf:DIR (tokenizer.json / tokenizer.model) | auto: the
                                # train.init_from=hf:DIR model's own, else byte
  d.seq_len = 256
  d.eval_batches = 8            # held-out batches scored; 0: every window of the split
  d.read_threads = 2            # grain threads reading batches ahead of the step
  d.prefetch = 2                # batches read ahead (host memory: prefetch x batch)
  d.loss = 'all'                # all | answer: task examples (synthetic:, ruler:) train on
                                # their answer tokens only (text parts of a mix on every token)

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
  t.loss_positions = 0          # k > 0: the head and loss run at each row's k highest-weight
                                # targets only (exact when a row weighs <= k, checked; Zoology
                                # MQAR: its pairs); 0: every position
  t.stop_at_accuracy = 0.0      # stop once eval accuracy (greedy, weighted targets) >= this
                                # (0: never; Zoology MQAR stops at 0.99)
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
  de.policy = 'none'            # none | keep_all | recency | streaming_llm | tova | snapkv |
                                # pyramidkv | adakv | h2o | l2 | keydiff | random | namm |
                                # anchor (models/eviction.py, presses.py, namm.py, anchor.py)
  de.capacity = 0               # KV slots per layer; 0: prompt + new tokens
  de.compression_ratio = 0.0    # > 0: the policy keeps (1 - this) of each prompt's tokens per
                                # head (kvpress's ratio; RULER cells; budget-based policies)
  de.prefill_chunk = 0          # read the prompt in pieces (policy acts on each); 0: at once
  de.max_new_tokens = 64
  de.temperature = 0.0          # 0: greedy
  de.top_p = 1.0                # nucleus sampling (with temperature > 0); 1: off

  c.evolve = ev = ml_collections.ConfigDict()   # evolve.py (NAMM search; training/evolve.py)
  ev.base = ''                  # train.py workdir of the frozen base LM
  ev.strategy = 'cma_es'        # cma_es | sep_cma_es | snes | open_es
  ev.population = 32
  ev.sigma0 = 0.065
  ev.lr = 0.01                  # open_es only (adam)
  ev.cache_weight = 0.0         # fitness -= this x mean cache fraction (0: official, score only)
  ev.query_agnostic = False     # the prompt's question read after the compression (kvpress's
                                # protocol, bench/compression.py) instead of with the context
  ev.compression_ratio = 0.0    # > 0: members keep (1 - ratio) of the context (NAMM.budget)
                                # instead of the tokens they score >= 0 (one NAMM per ratio)
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
  e.split = 'eval'              # split of data.source evaluate.py scores: eval | train | all
                                # (every file: a corpus or a single file held out whole)

  c.ruler = r = ml_collections.ConfigDict()    # RULER's suite in evaluate.py (data/ruler.py)
  r.tasks = ()                  # e.g. ('niah_single_1', 'niah_multikey_1', 'vt', 'cwe', 'fwe'):
                                # RULER's names (data/ruler.py TASKS); (): the suite is skipped
  r.lengths = (1024,)           # prompt + generation, in the run's tokenizer's tokens
  r.depths = ()                 # needle depths 0..1 (a cell each); (): RULER's, drawn per needle
  r.examples = 4                # held-out examples per (task, length, depth) cell
  r.max_new_tokens = 0          # 0: RULER's per task (niah 128, vt 30, cwe 120, fwe 50)
  r.num_needle_k = 0            # the tasks' parameters; 0: each task's own (RULER's
  r.num_needle_v = 0            # synthetic.yaml): needles' keys, values per key, keys asked,
  r.num_needle_q = 0
  r.num_hops = 0                # variable tracking: hops per chain, chains
  r.num_chains = 0

  # Each method's own keys (model.titans, model.infini, model.anchor, namm, decode.budget,
  # ...): registered with the method in its models/ module (models/registry.py).
  for key, default in registry.config_keys().items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = ml_collections.ConfigDict(default) if isinstance(default, dict) else default
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
