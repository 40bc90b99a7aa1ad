"""The results page in one command: speed, memory, decode and capability of every model kind.

  python bench/run.py --quick --jobs=2   # ~15 min on 2 CPU cores (small lengths, few steps):
                                         # bench/results/run_quick.md
  python bench/run.py --jobs=2      # the full page, ~40 min (2K..64K training, 1M-token streams):
                                    # bench/results/run.md
  python bench/run.py --kinds=plain,titans_mac --sections=train,stream   # a part of it
  python bench/run.py --preset=small --plan=train_tokens=131072,cap_steps=3000 --out=bench/results/gpu
                                    # on a GPU/TPU: width 512, 8 layers, bigger steps
  python -m bench.report            # then regenerate docs/ from bench/results/

Sections (each a function below; all numbers come from running the same jitted code as
train.py / evaluate.py on this machine, nothing is typed in):
  train       training tokens/s, MFU against the matmul peak measured in this run, XLA memory,
              per kind and context length, and the ratio to the plain transformer; a width-512
              plain model for the MFU target.
  ratio       the speed targets' ratios head to head: the kind's and plain's train steps
              alternated for a few rounds (the table's cells are single steps minutes apart).
  stream      inference over long inputs, chunk by chunk with the decode state carried: time
              per token, state bytes and one decode step at each total length; fitted exponents
              (the constant-memory kinds must show ~0).
  decode      per eviction policy on the plain model: decode tokens/s and KV-cache bytes vs
              generated length (and on AnSAN with its anchor policy).
  capability  every kind trained the same number of steps on the corpus mixed with synthetic
              long-context tasks, then held-out loss by position bucket and passkey / S-NIAH /
              MQAR exact match on a (length x depth) grid with held-out seeds; the plain model
              also under each eviction policy at half the cache.
  profile     where the speed target missed by most was measured (else the memory kind slowest
              relative to plain): XLA ops per step under the profiler, parts timed alone, and
              the kind's and plain's steps on one core vs all cores.
Writes OUT.md (the page, with the command, machine, versions, seeds and the targets met or
missed by how much), OUT.json and OUT_*.png.
"""
import dataclasses
import fcntl
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from bench.common import (ROOT, TooBig, alternate, at_length, compile_checked, head_to_head,
                          load_config, machine, measure_train, on_one_core, op_trace,
                          program_bytes, slope, time_calls, train_program, warm_steps)
from data import synthetic
from data.tokenizer import ByteTokenizer
from training import flops
from training.config import resolve, validate

_QUICK = flags.DEFINE_bool('quick', False, 'Small lengths and few steps (~30 min on one CPU core, '
                           '~15 with --jobs=2 on two).')
_KINDS = flags.DEFINE_list('kinds', None, 'Model kinds (default: all of KINDS, and plain_wide, '
                           'the MFU row of the train section). Rows of other kinds stay as an '
                           'earlier run of the same sections wrote them.')
_SECTIONS = flags.DEFINE_list('sections', ['train', 'ratio', 'stream', 'decode', 'capability',
                                          'profile'],
                              'Sections to run; the others stay as an earlier run wrote them '
                              '(empty: only re-render the page).')
_OUT = flags.DEFINE_string('out', '', 'Output path prefix (default bench/results/run, with '
                           '--quick bench/results/run_quick: a quick run never replaces the '
                           'full page).')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where capability runs train (default: a temp dir).')
_NAMM_RUN = flags.DEFINE_string('namm_run', '', 'evolve.py workdir for the NAMM policy (default: '
                                'a random parameter vector drawn like a CMA-ES population member).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of model init, data order and task examples.')
_PRESET = flags.DEFINE_string('preset', 'tiny', "Every kind's config preset (tiny: this CPU; "
                              'small: width 512, 8 layers, for a GPU/TPU). The MFU row stays '
                              'transformer.py:small.')
_PLAN = flags.DEFINE_list('plan', [], 'Plan fields to change, FIELD=VALUE (tuples as 2048:8192), '
                          'e.g. cap_steps=3000,train_tokens=131072; a page of another plan or '
                          'preset starts afresh (see --out).')
_JOBS = flags.DEFINE_integer('jobs', 1, 'Run the sections in this many processes side by side, '
                             'each pinned to its share of the CPU cores (2 on a 2-core '
                             'machine: train, ratio, profile in one, the rest in the other; '
                             'the speed sections then time one core).')

# kind -> (config, overrides), at --preset (':tiny' here): the same width and depth; the
# sliding window is the memory kinds' segment (titans_mac's). 'plain' is full causal attention with the
# blockwise (flash-style) kernel; 'plain_xla' the same model with jax.nn.dot_product_attention
# (materialises the scores; training speed only). 'ansan' trains with the same kernel, its
# anchor rule applied block by block.
CHUNKED = {'model.attention_impl': 'chunked'}
KINDS = {
    'plain': ('configs/transformer.py:tiny', CHUNKED),
    'plain_xla': ('configs/transformer.py:tiny', {'model.attention_impl': 'xla'}),
    'sliding': ('configs/sliding.py:tiny', {}),
    'titans_mac': ('configs/titans_mac.py:tiny', {}),
    'titans_mag': ('configs/titans_mag.py:tiny', {}),
    'titans_mal': ('configs/titans_mal.py:tiny', {}),
    'infini': ('configs/infini.py:tiny', {}),
    'infini_delta': ('configs/infini.py:tiny', {'model.infini.update_rule': 'delta'}),
    'ansan': ('configs/anchor_ep.py:tiny', CHUNKED),
}
# Width 512, 8 layers: the MFU target. No rematerialisation: recomputing the forward in the
# backward costs 8 instead of 6 FLOPs per parameter and token while MFU counts 6 (MaxText's
# convention), and at this size memory does not call for it. The step's tokens (8 x 2048,
# like every row) are accumulated over 4 micro-batches (train.microbatches): in one pass
# every op ran slower per token than at batch 2 (7.3 GiB of XLA buffers, 2.3 GiB in slices);
# interleaved on the 2-core CPU, 4 micro-batches reached 56% of the peak, one pass 41%.
WIDE = ('configs/transformer.py:small',
        dict(CHUNKED, **{'model.remat': 'none', 'train.microbatches': 4}))
TRAIN_ONLY = ('plain_xla', 'plain_wide')
RECURRENT = ('sliding', 'titans_mac', 'titans_mag', 'titans_mal', 'infini', 'infini_delta')
POLICIES = ('keep_all', 'recency', 'h2o', 'l2', 'namm')
MIX = 'mix:stdlib+synthetic:passkey+synthetic:mqar'     # niah needs > 314 bytes: eval only


@dataclasses.dataclass(frozen=True)
class Plan:
  train_lengths: tuple       # every kind
  scale_lengths: tuple       # more points for the scaling fit, SCALE_KINDS only
  train_tokens: int          # per step (batch = tokens / length)
  train_steps: int           # timed steps
  ratio_lengths: tuple       # plain (full attention) trains up to the longest of these
  wide_length: int
  stream_lengths: tuple      # every kind with a constant state (and plain up to its max)
  stream_long: tuple         # SCALE_KINDS only
  stream_plain_max: int      # the plain KV cache grows: stop there
  decode_prompt: int
  decode_new: int
  cap_length: int
  cap_steps: int
  cap_batch: int
  cap_examples: int
  ratio_rounds: int = 5      # head-to-head rounds per speed target


FULL = Plan(train_lengths=(2048, 8192, 32768), scale_lengths=(1024, 65536), train_tokens=16384,
            train_steps=1, ratio_lengths=(2048, 8192, 32768), wide_length=2048,
            stream_lengths=(4096, 32768, 262144), stream_long=(1048576,), stream_plain_max=32768,
            decode_prompt=2048, decode_new=1024, cap_length=256, cap_steps=300, cap_batch=8,
            cap_examples=16)
QUICK = Plan(train_lengths=(512, 2048), scale_lengths=(), train_tokens=4096, train_steps=2,
             ratio_lengths=(2048,), wide_length=512, stream_lengths=(1024, 4096),
             stream_long=(16384,), stream_plain_max=16384, decode_prompt=256, decode_new=128,
             cap_length=256, cap_steps=40, cap_batch=8, cap_examples=4, ratio_rounds=2)
SCALE_KINDS = ('plain', 'titans_mac', 'infini')


def make_plan():
  """QUICK or FULL with the --plan changes."""
  plan, fields = QUICK if _QUICK.value else FULL, dataclasses.fields(Plan)
  changes = {}
  for item in _PLAN.value:
    field, _, value = item.partition('=')
    try:
      old = getattr(plan, field)
      changes[field] = (tuple(int(v) for v in value.split(':')) if isinstance(old, tuple)
                        else type(old)(value))
    except (AttributeError, ValueError):
      raise SystemExit(f'--plan: {item!r}: expected FIELD=VALUE (tuples as 2048:8192) with '
                       f'FIELD one of {[f.name for f in fields]}') from None
  return dataclasses.replace(plan, **changes)


def kind_config(kind, **more):
  spec, overrides = WIDE if kind == 'plain_wide' else KINDS[kind]
  if kind == 'sliding':                       # window = segment = the memory kinds' segment
    C = kind_config('titans_mac').model.segment_len
    overrides = {'model.window': C, 'model.segment_len': C}
  cfg = load_config(spec.replace(':tiny', ':' + _PRESET.value), dict(overrides, **more))
  cfg.seed = _SEED.value
  return resolve(cfg)


def model_shape(cfg):
  m = cfg.model
  return dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
              n_kv_heads=m.n_kv_heads, segment_len=m.segment_len, vocab=m.vocab_size,
              xla_options=cfg.train.xla_options)


def describe(models):
  """'d_model 128, 2 layers, ..., 2 KV heads (infini 4), ...': the kinds' common shape, the
  exceptions in brackets."""
  parts = []
  for key, text in (('d_model', 'd_model {}'), ('n_layers', '{} layers'), ('n_heads', '{} heads'),
                    ('n_kv_heads', '{} KV heads'), ('vocab', 'vocabulary {}'),
                    ('segment_len', 'memory kinds and sliding: segments/windows of {} tokens')):
    values = {k: m[key] for k, m in models.items() if m.get(key)}
    if values:
      common = max(set(values.values()), key=list(values.values()).count)
      odd = ', '.join(f'{k} {v}' for k, v in values.items() if v != common)
      parts.append(text.format(common) + (f' ({odd})' if odd else ''))
  options = {}
  for k, m in models.items():
    if m.get('xla_options'):
      options.setdefault(m['xla_options'], []).append(k)
  return ', '.join(parts) + ''.join(
      f"; {', '.join(ks)} compile the train step with `train.xla_options={o}` (see their config)"
      for o, ks in options.items())


def format_guess(task, n=64):
  """Answer-token accuracy of a guess that knows a task's answer format but not the needle:
  its non-digit bytes right and a tenth of its digits (held-out examples)."""
  answers = [ByteTokenizer().decode(synthetic.make_example(
      task, synthetic.example_seed(0, i, 'eval'), 1024)['answer']) for i in range(n)]
  return np.mean([np.mean([0.1 if ch.isdigit() else 1.0 for ch in a]) for a in answers])


def init_model(cfg):
  from training.state import model_ctor
  return model_ctor(cfg)()


def state_bytes(layer_states, batch):
  return sum(x.nbytes for x in jax.tree.leaves(layer_states)) // batch


# --- train ---------------------------------------------------------------------------------

def train_section(kinds, plan, peak):
  rows = []
  jobs = [(k, L) for k in kinds for L in sorted(
      plan.train_lengths + (plan.scale_lengths if k in SCALE_KINDS else ()))
          if k in KINDS and not (k.startswith('plain') and L > max(plan.ratio_lengths))]
  if 'plain_wide' in kinds:                 # (full attention stops at the last ratio length)
    jobs.append(('plain_wide', plan.wide_length))
  for kind, L in jobs:
    row = dict(kind=kind, length=L)
    if kind == 'plain_wide':   # the MFU target, strictly: the step is the fastest of 3, the
      row['best_of'] = 3       # peak the highest of the run's and two taken around the steps
      row['peak'] = max(peak, flops.measure_peak_flops(repeats=20))
    try:
      if kind == 'plain':      # at each remat setting (plain_configs), the faster kept
        runs = [dict(measure_train(at_length(cfg, L, plan.train_tokens), peak, plan.train_steps),
                     remat=cfg.model.remat) for cfg in plain_configs()]
        row.update(max(runs, key=lambda r: r['tokens_per_s']))
        row['remat_other'] = [dict(remat=r['remat'], tokens_per_s=r['tokens_per_s'])
                              for r in runs if r['remat'] != row['remat']]
      else:
        row.update(measure_train(at_length(kind_config(kind), L, plan.train_tokens),
                                 row.get('peak', peak), plan.train_steps, row.get('best_of', 1)))
      if kind == 'plain_wide':
        after = flops.measure_peak_flops(repeats=20)
        row['mfu'] *= row['peak'] / max(row['peak'], after)
        row['peak'] = max(row['peak'], after)
    except TooBig as e:
      row['skipped'] = str(e)
    rows.append(row)
    log(f"train {kind:13s} L={L:6d} " + (
        row['skipped'] if 'skipped' in row else
        f"{row['tokens_per_s']:9.0f} tok/s MFU {100 * row['mfu']:5.1f}% "
        f"{row['memory_mib']:8.1f} MiB (compile {row['compile_s']:.0f}s)"
        + ''.join(f"; remat {o['remat']}: {o['tokens_per_s']:.0f} tok/s"
                  for o in row.get('remat_other', []))))
  plain = {r['length']: r.get('tokens_per_s') for r in rows if r['kind'] == 'plain'}
  for r in rows:
    if plain.get(r['length']) and 'tokens_per_s' in r and r['kind'] != 'plain_wide':
      r['vs_plain'] = r['tokens_per_s'] / plain[r['length']]
  return rows


def plain_configs():
  """Plain at its preset's model.remat and without rematerialisation: the reference for the
  memory kinds is the faster of the two."""
  remats = dict.fromkeys([kind_config('plain').model.remat, 'none'])
  return [kind_config('plain', **{'model.remat': r}) for r in remats]


def ratio_section(kinds, plan):
  """The speed targets' ratios head to head: at each target length the kinds' train steps
  and plain's alternate for plan.ratio_rounds rounds (bench.common.head_to_head); plain runs
  at its preset's model.remat and without rematerialisation, and the faster of the two is
  the reference (its steps shared by the kinds). ratio = that plain's median step time /
  the kind's (the kind at its preset; the same tokens per step)."""
  rows = []
  plains_cfg = plain_configs()
  plain_remats = [c.model.remat for c in plains_cfg]
  ratio_kinds = {k: kind_config(k) for k in RATIO_KINDS if k in kinds}
  for L in target_lengths(plan) if ratio_kinds else ():
    new = [dict(kind=k, length=L, rounds=plan.ratio_rounds, kind_remat=c.model.remat)
           for k, c in ratio_kinds.items()]
    try:
      times = head_to_head([at_length(c, L, plan.train_tokens)
                            for c in [*ratio_kinds.values(), *plains_cfg]], plan.ratio_rounds)
      plains = times[len(new):]
      fast = int(np.argmin([np.median(t) for t in plains]))
      for row, kind_s in zip(new, times):
        row.update(kind_s=kind_s, plain_remat=plain_remats[fast], plain_s=plains[fast],
                   plain_other=[dict(remat=r, s=t) for r, t in zip(plain_remats, plains)
                                if r != plain_remats[fast]],
                   ratio=float(np.median(plains[fast]) / np.median(kind_s)))
    except TooBig as e:
      for row in new:
        row['skipped'] = str(e)
    for row in new:
      log(f"ratio {row['kind']:11s} L={L:6d} " + (
          row.get('skipped') or f"{row['ratio']:.2f}x plain (steps {step_times(row)})"))
    rows += new
  return sorted(rows, key=lambda r: (RATIO_KINDS.index(r['kind']), r['length']))


def step_times(row):
  """A ratio row's step times: '<the kind's> s vs <plain's> s' (plain's remat named, and its
  slower setting's times in brackets, where the row has them)."""
  times = lambda ts: ' '.join(f'{t:.2f}' for t in ts) + ' s'
  text = f"{times(row['kind_s'])} vs {times(row['plain_s'])}"
  if 'plain_remat' in row:
    text += f" (plain remat {row['plain_remat']}" + ''.join(
        f"; remat {o['remat']}: {times(o['s'])}" for o in row['plain_other']) + ')'
  return text


# --- stream --------------------------------------------------------------------------------

def stream_one(cfg, n_tokens, chunk, block_tokens):
  """Reads n_tokens (batch 1) chunk by chunk with the state carried; then one decode step."""
  model = init_model(cfg)
  graphdef, params = nnx.split(model)
  state0 = model.init_state(1, n_tokens)
  n_chunks = block_tokens // chunk

  @jax.jit
  def block(params, state, tokens_1xN, start):
    m = nnx.merge(graphdef, params)
    toks = tokens_1xN.reshape(1, n_chunks, chunk).swapaxes(0, 1)
    pos = (start + jnp.arange(block_tokens, dtype=jnp.int32)).reshape(n_chunks, 1, chunk)

    def body(s, xs):
      logits, s = m(xs[0], s, xs[1])
      return s, logits[:, -1].argmax(-1)
    return jax.lax.scan(body, state, (toks, pos))

  @jax.jit
  def one_step(params, state, token_1, pos_1):
    logits, state = nnx.merge(graphdef, params)(token_1[:, None], state, pos_1[:, None])
    return logits, state

  tokens = jax.random.randint(jax.random.key(0), (1, block_tokens), 0, 256)
  compiled = compile_checked(block.lower(params, state0, tokens, 0))
  jax.block_until_ready(compiled(params, state0, tokens, 0))     # warm-up, untimed
  t0 = time.perf_counter()
  state = state0
  for start in range(0, n_tokens, block_tokens):
    state, _ = compiled(params, state, tokens, start)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  tok, pos = jnp.zeros((1,), jnp.int32), jnp.full((1,), n_tokens, jnp.int32)
  one_step = one_step.lower(params, state, tok, pos).compile()
  step_s = time_calls(lambda: one_step(params, state, tok, pos)[0], 5, True)
  return dict(us_per_token=1e6 * seconds / n_tokens, state_bytes=state_bytes(state, 1),
              program_mib=program_bytes(compiled) / 2**20, decode_step_ms=1e3 * step_s)


def stream_section(kinds, plan):
  rows = []
  for kind in [k for k in kinds if k in RECURRENT or k == 'plain']:
    for n in plan.stream_lengths + (plan.stream_long if kind in SCALE_KINDS else ()):
      if kind == 'plain' and n > plan.stream_plain_max:
        continue
      cfg = kind_config(kind)
      chunk = cfg.model.segment_len or 256
      row = dict(kind=kind, tokens=n, chunk=chunk)
      try:
        row.update(stream_one(cfg, n, chunk, min(n, 16 * 1024)))
      except TooBig as e:
        row['skipped'] = str(e)
      rows.append(row)
      log(f"stream {kind:13s} N={n:8d} " + (row['skipped'] if 'skipped' in row else
          f"{row['us_per_token']:8.1f} us/token state {row['state_bytes']:>12,d} B "
          f"step {row['decode_step_ms']:.2f} ms"))
  fits = {}
  for kind in dict.fromkeys(r['kind'] for r in rows):
    rs = [r for r in rows if r['kind'] == kind and 'skipped' not in r]
    xs = [r['tokens'] for r in rs]
    fits[kind] = dict(state_exp=slope(xs, [r['state_bytes'] for r in rs]),
                      step_exp=slope(xs, [r['decode_step_ms'] for r in rs]),
                      per_token_exp=slope(xs, [r['us_per_token'] for r in rs]))
  return rows, fits


# --- decode --------------------------------------------------------------------------------

def corpus_prompt(batch, length):
  from data import pipeline
  return pipeline.make_eval_batches('stdlib', length - 1, batch, 1)[0]


def policy_overrides(name, budget, interval):
  """Config overrides for eviction policy `name` keeping `budget` tokens per head, acting
  every `interval` tokens (prefill chunk; NAMM update interval)."""
  o = {'decode.policy': name, 'decode.window': budget, 'decode.budget': budget,
       'decode.recent': max(budget // 8, 1), 'decode.prefill_chunk': interval,
       'namm.update_interval': interval}
  if name == 'namm' and _NAMM_RUN.value:
    o['decode.namm_run'] = _NAMM_RUN.value
  return o


def make_policy_for(cfg):
  from training.policy import make_policy
  policy = make_policy(cfg)
  if cfg.decode.policy == 'namm' and not cfg.decode.namm_run:
    theta = 0.065 * np.random.default_rng(_SEED.value).standard_normal(policy.n_params)
    return policy.replace(theta=jnp.asarray(theta, jnp.float32))
  return policy


def decode_program(cfg, prompt_BxP, n_new):
  """Prefill under the policy, then n_new greedy steps compiled: (run, row) where run() runs
  the steps once (for timing) and row holds the KV bytes per step."""
  from models import decode, registry
  model = init_model(cfg)
  graphdef, params = nnx.split(model)
  policy = make_policy_for(cfg)
  B, P = prompt_BxP.shape
  chunk = cfg.decode.prefill_chunk

  @jax.jit
  def prefill(params, prompt_BxP):
    m = nnx.merge(graphdef, params)
    state = decode.init_state(m, B, P + n_new, policy)
    return decode.prefill(m, prompt_BxP, state, policy, chunk)

  @jax.jit
  def steps(params, logits_BxV, state):
    m = nnx.merge(graphdef, params)

    def body(carry, i):
      logits, state = carry
      tok = logits.argmax(-1).astype(jnp.int32)
      logits, state = decode.step(m, tok, jnp.full((B,), P + i, jnp.int32), state, policy)
      kv = jnp.stack([s.size_BxK().mean() for s in state if registry.is_kv_cache(s)])
      return (logits, state), kv
    return jax.lax.scan(body, (logits_BxV, state), jnp.arange(n_new))

  logits, state = prefill(params, prompt_BxP)
  steps = steps.lower(params, logits, state).compile()
  _, kv_NxL = steps(params, logits, state)
  token_bytes = [s.token_bytes() for s in state if registry.is_kv_cache(s)]
  kv_bytes_N = np.asarray(kv_NxL) @ np.asarray(token_bytes, np.float64)
  return (lambda: steps(params, logits, state)[1],
          dict(kv_bytes=kv_bytes_N.tolist(), prompt=P, batch=B))


def namm_update_parts(policy, B, K, S, kept):
  """ms of one NAMM update of one layer's full cache [B, K, S], part by part: the features
  (ring -> STFT -> EMA, recency), the BAM scorer, the keep rule; and of a whole update when
  only `kept` slots per head hold tokens (the valid slots gathered into a smaller bucket)."""
  from models import namm as nammlib
  from models.attention import KVCache
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, K, S))
  valid = jnp.ones((B, K, S), bool)
  cache = policy.init(KVCache.empty(B, K, S, 1).replace(pos_BxKxS=pos, valid_BxKxS=valid))
  cache = cache.replace(token_state=dict(cache.token_state, rows=jax.random.uniform(
      jax.random.key(0), cache.token_state['rows'].shape) / S))
  def timed(fn, x):
    """(ms of one call of jitted fn on x, its output): compiled once."""
    f = jax.jit(fn).lower(x).compile()
    return 1e3 * time_calls(lambda: f(x), 1, True, best_of=3), f(x)

  parts = (('features', lambda c: policy.features(c, pos[:, 0, -1])[0]),
           ('bam', lambda z: policy.bam(cache, z)),
           ('keep_rule', lambda score: nammlib.keep_rule(score, valid, pos)))
  out, x = dict(slots=S, kept=kept), cache
  for name, fn in parts:
    out[name], x = timed(fn, x)
  out['total'] = out['features'] + out['bam'] + out['keep_rule']
  sparse = cache.replace(valid_BxKxS=pos >= S - kept)
  out['update_kept'] = timed(lambda c: policy._update(c, pos[:, 0, -1])[0], sparse)[0]
  return out


DECODE_ROUNDS = 5


def decode_section(kinds, plan):
  rows = []
  B, P, budget = 4, plan.decode_prompt, plan.decode_prompt // 2
  prompt = jnp.asarray(corpus_prompt(B, P))
  interval = max(P // 8, 16)
  jobs = [('plain', p) for p in POLICIES] if 'plain' in kinds else []
  if 'ansan' in kinds:
    jobs.append(('ansan', 'anchor'))
  cfgs = [kind_config(kind, **policy_overrides(name, budget, interval)) for kind, name in jobs]
  programs = [decode_program(cfg, prompt, plan.decode_new) for cfg in cfgs]
  seconds = [min(ts) for ts in alternate([run for run, _ in programs], DECODE_ROUNDS)]
  for (kind, name), cfg, (_, r), sec in zip(jobs, cfgs, programs, seconds):
    r = dict(kind=kind, policy=name, budget=budget if name in ('recency', 'h2o', 'l2') else None,
             tokens_per_s=B * plan.decode_new / sec, ms_per_step=1e3 * sec / plan.decode_new,
             rounds=DECODE_ROUNDS, **r)
    if name == 'namm':
      full = next(x for x in rows if x['policy'] == 'keep_all')
      kept = int(round(r['kv_bytes'][-1] / full['kv_bytes'][-1] * (P + plan.decode_new)))
      r['update_ms'] = namm_update_parts(make_policy_for(cfg), B, cfg.model.n_kv_heads,
                                         P + plan.decode_new, kept)
      r['update_ms'].update(layers=cfg.model.n_layers, every=interval)
    rows.append(r)
    log(f"decode {kind}/{name:9s} {r['tokens_per_s']:8.1f} tok/s "
        f"KV {r['kv_bytes'][0] / 2**10:8.1f} -> {r['kv_bytes'][-1] / 2**10:8.1f} KiB")
  return rows


# --- capability ----------------------------------------------------------------------------

def capability_section(kinds, plan, workdir):
  from training import evaluation, loop
  rows = []
  L = plan.cap_length
  for kind in [k for k in kinds if k not in TRAIN_ONLY]:
    cfg = kind_config(kind)
    cfg.data.source, cfg.data.seq_len = MIX, L
    if cfg.model.segment_len:
      cfg.model.segment_len = min(cfg.model.segment_len, L)
    t = cfg.train
    t.steps, t.batch_size = plan.cap_steps, plan.cap_batch
    t.warmup_steps = max(plan.cap_steps // 10, 1)
    t.log_every, t.eval_every = max(plan.cap_steps // 10, 1), plan.cap_steps
    t.ckpt_every, t.async_ckpt = plan.cap_steps, False
    if kind == 'ansan':
      t.lr = 3e-3                             # trained from scratch here, not continued
    cfg = resolve(cfg)
    validate(cfg, jax.device_count())
    run_dir = os.path.join(workdir, kind)
    t0 = time.time()
    loop.train(cfg, run_dir)
    train_s = time.time() - t0
    policies = [('none', 0)] + ([(p, L // 2) for p in POLICIES if p != 'keep_all']
                                if kind == 'plain' else [])
    for name, budget in policies:
      overrides = {'data.source': 'stdlib', 'eval.lengths': (L, 2 * L),
                   'eval.examples': plan.cap_examples, 'eval.depths': (0.1, 0.5, 0.9)}
      if name != 'none':
        overrides.update(policy_overrides(name, budget, 64))
      ev, _ = evaluation.load(run_dir, overrides=overrides)
      if name == 'namm' and not _NAMM_RUN.value:
        ev.policy = make_policy_for(ev.cfg)
      cells = ev.tasks()
      row = dict(kind=kind, policy=name, steps=plan.cap_steps, train_s=train_s,
                 loss=ev.loss() if name == 'none' else None, tasks=cells,
                 cache=ev.cache() if name != 'none' else None)
      rows.append(row)
      acc = {task: np.mean([c['accuracy'] for c in cells if c['task'] == task
                            and c['accuracy'] is not None]) for task in ev.cfg.eval.tasks}
      log(f"capability {kind}/{name}: " + (f"loss {row['loss']['loss']:.3f} " if row['loss']
          else '') + ' '.join(f'{k} {v:.2f}' for k, v in acc.items()))
  return rows


# --- profile -------------------------------------------------------------------------------

CORE_ROUNDS = 2


def profile_section(kind, L, why, plain_remat, plan):
  """The train step of `kind` at length L: timed, run once under the profiler (how many XLA
  ops, how long each), and split into parts by timing fwd+bwd of each alone at the same
  batch and length: one block's mixer, its neural memory (Titans), its MLP. With more than
  one core: the kind's and plain's (at model.remat = plain_remat) steps on one core and on
  all (`core_scaling`)."""
  cfg = at_length(kind_config(kind), L, plan.train_tokens)
  plain_remat_over = {'model.remat': plain_remat} if plain_remat else {}
  plain = at_length(kind_config('plain', **plain_remat_over), L, plan.train_tokens)
  step = whole_step(kind, cfg, plain, plan)
  model = init_model(cfg)
  B, D = cfg.train.batch_size, cfg.model.d_model
  x = jax.random.normal(jax.random.key(0), (B, L, D))
  tok = jax.random.randint(jax.random.key(1), (B, L), 0, 256)       # token-dependent masks
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  blk = model.blocks[0]
  C = cfg.model.segment_len or L
  seg = lambda a: a.reshape(B, L // C, C, *a.shape[2:]).swapaxes(0, 1)
  # each segment recomputed in the backward pass where the kind's model.remat does (without,
  # a part's residuals for every segment made it slower alone than the whole step)
  remat = jax.checkpoint if cfg.model.remat != 'none' else (lambda f: f)

  def mixer_loss(mixer, x):
    state = mixer.init_state(B, L - C)
    if C == L:
      return mixer(x, state, pos, tokens_BxT=tok)[0].sum()

    def body(s, inp):
      y, s = mixer(inp[0], s, inp[1], tokens_BxT=inp[2])
      return s, y.sum()
    return jax.lax.scan(remat(body), state, (seg(x), seg(pos), seg(tok)))[1].sum()

  def memory_loss(memory, x):           # reads and writes, segment by segment
    def body(s, x_seg):
      reads, s = memory.forward(x_seg, s)
      return s, reads.sum()
    s, reads = jax.lax.scan(remat(body), memory.init_state(B), seg(x))
    return reads.sum() + sum(w.sum() for w in jax.tree.leaves(s.w))

  parts = {'mixer (one layer)': (blk.mixer, mixer_loss)}
  if hasattr(blk.mixer, 'memory'):
    parts['its neural memory (one layer)'] = (blk.mixer.memory, memory_loss)
  parts['MLP (one layer)'] = (blk.mlp, lambda mlp, x: mlp(x).sum())
  out = {}
  for name, (module, loss) in parts.items():
    graphdef, params = nnx.split(module)
    grad = jax.jit(jax.grad(lambda p, x: loss(nnx.merge(graphdef, p), x), argnums=(0, 1)))
    grad = grad.lower(params, x).compile()
    out[name] = 1e3 * time_calls(lambda: grad(params, x), max(plan.train_steps, 2), True)
  return dict(kind=kind, length=L, why=why, batch=B, layers=cfg.model.n_layers, parts_ms=out,
              plain_remat=plain_remat, **step)


def whole_step(kind, cfg, plain_cfg, plan):
  """{step_ms, cores, op_trace's keys}: the train step compiled once, timed, traced and (with
  more than one core) compared with plain's on one core and on all."""
  one = train_program(cfg)[0]
  step_ms = 1e3 * time_calls(one, max(plan.train_steps, 2), compiled=True)
  trace = op_trace(one)
  cores = None
  if len(os.sched_getaffinity(0)) > 1:
    try:
      plain = warm_steps([plain_cfg])
      cores = core_scaling({kind: one, 'plain': plain[0]})
    except TooBig as e:                      # plain's step at L does not fit: no comparison
      log(f'cores: skipped ({e})')
  return dict(step_ms=step_ms, cores=cores, **trace)


def core_scaling(steps):
  """{kind: {'one': [s], 'all': [s]}, 'cores': n}: each warm train step of `steps` ({kind:
  one()}) with every thread on one core and on all n cores of this process, all alternated
  for CORE_ROUNDS rounds."""
  times = alternate([f for one in steps.values() for f in (on_one_core(one), one)], CORE_ROUNDS)
  out = {k: dict(one=times[2 * i], all=times[2 * i + 1]) for i, k in enumerate(steps)}
  log('cores ' + '; '.join(f"{k}: {np.median(v['one']):.2f} s on one core, "
                           f"{np.median(v['all']):.2f} s on all" for k, v in out.items()))
  return dict(out, cores=len(os.sched_getaffinity(0)))


# --- targets -------------------------------------------------------------------------------

RATIO_KINDS = ('titans_mac', 'infini')       # the kinds with speed targets


TARGET_LENGTHS = (2048, 32768)   # the issue's: >= 0.7x plain at 2K, >= 4x full attention at 32K


def target_lengths(plan):
  """The speed targets' lengths (TARGET_LENGTHS) that this plan trains at."""
  return [L for L in TARGET_LENGTHS if L in plan.train_lengths]


def targets(train_rows, stream_fits, decode_rows, plan, ratios=()):
  """The issue's targets that this run measured: [{name, value, met, note}]; speed targets
  also carry where they were measured (kind, length) and measured / target (fraction), from
  the head-to-head `ratios` where there are some, else from the train table."""
  out = []
  h2h = {(r['kind'], r['length']): r['ratio'] for r in ratios if 'ratio' in r}

  def add(name, value, met, note='', **where):
    out.append(dict(name=name, value=value, met=None if met is None else bool(met), note=note,
                    **where))

  def speed(kind, L, name, table, target):
    ratio = h2h.get((kind, L), table)
    add(name, f'{ratio:.2f}x' + (f' head to head ({table:.2f}x in the table)'
                                 if (kind, L) in h2h else ''), ratio >= target,
        '' if ratio >= target else f'{100 * (1 - ratio / target):.0f}% short',
        kind=kind, length=L, fraction=ratio / target)

  tr = {(r['kind'], r['length']): r for r in train_rows}
  L2, Lmax = TARGET_LENGTHS
  run_kinds = {k for k, _ in tr}
  for kind in [k for k in RATIO_KINDS if k in run_kinds]:
    for L in TARGET_LENGTHS:
      r, p = tr.get((kind, L), {}), tr.get(('plain', L), {})
      name = (f'{kind} tokens/s >= 0.7x plain at {L}' if L == L2 else
              f'{kind} >= 4x faster than full attention at {L}')
      if L not in plan.train_lengths:
        add(name, f'not measured: this plan trains at {", ".join(map(str, plan.train_lengths))}',
            None)
      elif L == L2 and 'vs_plain' in r:
        speed(kind, L, name, r['vs_plain'], 0.7)
      elif L == Lmax and 'tokens_per_s' in r and 'tokens_per_s' in p:
        speed(kind, L, name, r['tokens_per_s'] / p['tokens_per_s'], 4)
      elif L == Lmax and 'tokens_per_s' in r:
        add(name, 'plain: ' + p.get('skipped', 'not run'), True,
            'full attention could not run at all')
  w = tr.get(('plain_wide', plan.wide_length), {})
  if 'mfu' in w:
    add(f'plain width 512 step >= 50% of the measured matmul peak (L={plan.wide_length})',
        f"{100 * w['mfu']:.1f}%", w['mfu'] >= 0.5,
        f"peak {w['peak'] / 1e9:.1f} GFLOP/s, the highest of "
        f"{'three' if 'best_of' in w else 'two'} measurements" if 'peak' in w else '')
  for kind, f in stream_fits.items():
    if kind != 'plain':
      add(f'{kind} inference state constant in length (exponent ~0)', f"{f['state_exp']:.3f}",
          abs(f['state_exp']) < 0.05)
  d = {r['policy']: r for r in decode_rows if r['kind'] == 'plain'}
  if 'namm' in d and 'keep_all' in d:
    over = d['namm']['ms_per_step'] / d['keep_all']['ms_per_step'] - 1
    add('NAMM overhead <= 10% of decode time', f'{100 * over:+.1f}%', over <= 0.10,
        f"update every {d['namm']['prompt'] // 8} tokens")
  return out


# --- page ----------------------------------------------------------------------------------

def log(msg):
  logging.info(msg)
  print(msg, flush=True)


def fmt(x, spec):
  return '-' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def page(res, prefix):
  img = lambda part: f'{os.path.relpath(prefix, ROOT)}_{part}.png'   # as docs/ pages link it (bench/report.py)
  P = res['plan']
  runs = {}
  for section, c in sorted(res['commands'].items(), key=lambda item: item[1]['started']):
    runs.setdefault(c['command'], []).append((section, c))
  lines = [f'## Side by side: every model kind ({"quick" if res["quick"] else "full"} run)', '',
           f"{res['machine']}. Seed {res['seed']}. Every kind (configs at preset "
           f"`{res.get('preset', 'tiny')}`): {describe(res.get('models', {}))}. Produced by:", '']
  for command, items in runs.items():
    c = items[0][1]
    minutes = max(i.get('minutes', float('nan')) for _, i in items)   # cumulative per section
    lines.append(f"- `{command}` (sections {', '.join(s for s, _ in items)}; started "
                 f"{c['started']} UTC, {minutes:.0f} min; matmul peak "
                 f"measured in that run {c['peak'] / 1e9:.1f} GFLOP/s/device"
                 + (f"; on {c['cores']} of the host's cores" if 'cores' in c else '') + ')')
  lines.append('')
  t = res.get('targets', [])
  if t:
    lines += ['### Targets', '', '| target | measured | met |', '|---|---|---|']
    met = {True: 'yes', False: '**no**', None: '-'}
    lines += [f"| {x['name']} | {x['value']} | {met[x['met']]}"
              f"{' (' + x['note'] + ')' if x['note'] else ''} |" for x in t]
    h2h = [r for r in res.get('ratio', []) if 'ratio' in r]
    if h2h:
      fair = all('plain_remat' in r for r in h2h)    # older rows: plain at its preset only
      remats = {r['kind']: r.get('kind_remat') or kind_config(r['kind']).model.remat for r in h2h}
      if not fair:
        remats['plain'] = kind_config('plain').model.remat
      remat = ', '.join(f'{k} {v}' for k, v in sorted(remats.items()))
      lines += ['', f"Head to head: the kind's train step and plain's alternated, "
                f"{h2h[0]['rounds']} rounds after a warm-up step each; the ratio of the median "
                'step times (plain / kind). Each kind at its preset\'s `model.remat` '
                f'({remat}: block / segment: each block / segment recomputed in the backward '
                'pass)' + ("; plain at its preset's and without rematerialisation, the faster "
                           'of the two as the reference' if fair else '') + '. Step times: ' + '; '.join(
                    f"{r['kind']} at {r['length']}: {step_times(r)}" for r in h2h) + '.']
    lines.append('')
  rows = res.get('train', [])
  if rows:
    lengths = sorted({r['length'] for r in rows if r['kind'] != 'plain_wide'})
    lines += ['### Training speed', '',
              f"Real train step (the same jitted code as train.py), batch = max(1, "
              f"{P['train_tokens']} / length), "
              f"mean of {P['train_steps']} timed step(s) after a warm-up. Cells: tokens/s "
              '(ratio to plain at that length) / MFU / XLA memory. Each kind at its preset\'s '
              '`model.remat`; plain at its preset\'s and without rematerialisation, the faster '
              'of the two kept (named in its cells). Full attention stops at '
              f"{max(P['ratio_lengths'])} (quadratic).", '',
              '| kind | ' + ' | '.join(f'L = {L}' for L in lengths) + ' |',
              '|---|' + '---|' * len(lengths)]
    for kind in dict.fromkeys(r['kind'] for r in rows):
      cells = []
      for L in lengths:
        r = next((r for r in rows if r['kind'] == kind and r['length'] == L), None)
        if r is None:
          cells.append('')
        elif 'skipped' in r:
          cells.append(f"skipped: {r['skipped']}")
        else:
          ratio = f" ({r['vs_plain']:.2f}x)" if 'vs_plain' in r else ''
          if 'remat_other' in r:              # plain: the faster remat setting, named
            ratio = f" ({r['vs_plain']:.2f}x, remat {r['remat']})"
          cells.append(f"{r['tokens_per_s']:.0f}{ratio} / "
                       f"{100 * r['mfu']:.1f}% / {r['memory_mib']:.0f} MiB")
      if kind == 'plain_wide':
        r = next(r for r in rows if r['kind'] == kind)
        cells = [f"width 512, 8 layers, no remat, L = {r['length']}, batch {r['batch']} in "
                 f"{r.get('microbatches', 1)} micro-batches: " + (r.get('skipped') or
                 f"{r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%" +
                 (f" (fastest of {r['best_of']} steps)" if r.get('best_of', 1) > 1 else ''))
                 ] + [''] * (len(lengths) - 1)
      lines.append(f'| {kind} | ' + ' | '.join(cells) + ' |')
    fits = {k: slope([r['length'] for r in rows if r['kind'] == k and 'step_ms' in r],
                     [1 / r['tokens_per_s'] for r in rows if r['kind'] == k and 'step_ms' in r])
            for k in dict.fromkeys(r['kind'] for r in rows) if k != 'plain_wide'}
    lines += ['', 'Time per training token ~ L^a: ' + ', '.join(
        f'{k} a = {fmt(v, ".2f")}' for k, v in fits.items()) + '.', '',
        f'![training speed]({img("train")})', '']
  rows = res.get('stream', [])
  if rows:
    lines += ['### Inference scaling (state carried chunk by chunk)', '',
              'Batch 1, random tokens, chunks of the segment length (plain: 256 tokens into a '
              'KV cache sized for the whole input). Cells: us per token while reading / decode '
              'state bytes / one decode step after it (ms).', '']
    ns = sorted({r['tokens'] for r in rows})
    lines += ['| kind | ' + ' | '.join(f'{n:,}' for n in ns) + ' | state ~ N^b | step ~ N^c |',
              '|---|' + '---|' * (len(ns) + 2)]
    for kind, f in res['stream_fits'].items():
      cells = []
      for n in ns:
        r = next((r for r in rows if r['kind'] == kind and r['tokens'] == n), None)
        cells.append('' if r is None else f"skipped: {r['skipped']}" if 'skipped' in r else
                     f"{r['us_per_token']:.1f} / {r['state_bytes']:,} / {r['decode_step_ms']:.2f}")
      lines.append(f'| {kind} | ' + ' | '.join(cells) +
                   f" | {fmt(f['state_exp'], '.2f')} | {fmt(f['step_exp'], '.2f')} |")
    lines += ['', f'![inference scaling]({img("stream")})', '']
  rows = res.get('decode', [])
  if rows:
    lines += ['### Decode per eviction policy', '',
              f"Batch {rows[0]['batch']}, a {rows[0]['prompt']}-token corpus prompt, then "
              f"{len(rows[0]['kv_bytes'])} greedy steps; cache capacity prompt + new tokens "
              '(static shapes, so every policy attends over the same slots: the time '
              'difference is the policy itself); time: the fastest of ' +
              (f"{rows[0]['rounds']} rounds, each running every policy once in turn" if 'rounds'
               in rows[0] else 'three runs of each policy') +
              '. Budget = half the prompt; NAMM: ' +
              (f'`{_NAMM_RUN.value}`' if _NAMM_RUN.value else 'a random parameter vector '
               '(sigma 0.065, as a CMA-ES population member), i.e. its cost, not its choices') +
              '.', '', '| kind / policy | tokens/s | ms/step | KV bytes after prefill | '
              'KV bytes at the end |', '|---|---|---|---|---|']
    for r in rows:
      lines.append(f"| {r['kind']} / {r['policy']} | {r['tokens_per_s']:.1f} | "
                   f"{r['ms_per_step']:.2f} | {r['kv_bytes'][0]:,.0f} | {r['kv_bytes'][-1]:,.0f} |")
    u = next((r['update_ms'] for r in rows if 'update_ms' in r), None)
    base = next((r for r in rows if r['policy'] == 'keep_all'), None)
    if u and base:
      every = u['every']
      m = res.get('models', {}).get(base['kind'], dict(n_layers=2, d_model=128))
      small = f"{m['n_layers']}-layer, width-{m['d_model']}"
      per_step = u['total'] * u['layers'] / every
      text = (f"One NAMM update of one layer's {u['slots']}-slot cache (batch "
              f"{rows[0]['batch']}): features (ring -> STFT -> EMA) {u['features']:.0f} ms, "
              f"BAM scorer {u['bam']:.0f} ms, keep rule {u['keep_rule']:.0f} ms. Every "
              f"{every} tokens in each of {u['layers']} layers that is {per_step:.2f} ms "
              f"per step, {100 * per_step / base['ms_per_step']:.0f}% of the keep-all step "
              f"({base['ms_per_step']:.2f} ms): the scorer's cost is set by the cache size, ")
      if 'update_kept' not in u:                  # a page from before the compacted update
        text += f'not the model, so next to this {small} model it dominates.'
      else:
        share = 100 * u['update_kept'] * u['layers'] / every / base['ms_per_step']
        text += (f'not the model, so next to this {small} model it would dominate. '
                 'An update therefore runs on the valid slots only, gathered into the smallest '
                 f"of S/8, S/4, S/2, S slots that holds them: with the {u['kept']} tokens per "
                 f"head this NAMM keeps at the end, one whole update takes "
                 f"{u['update_kept']:.0f} ms, {share:.0f}% of the keep-all step.")
        over = {r['policy']: 100 * (r['ms_per_step'] / base['ms_per_step'] - 1) for r in rows
                if r['kind'] == base['kind']}
        if 'recency' in over:
          rest = over['namm'] - share
          paid = ("every step (the new attention row written into each slot's ring; the "
                  'policy hook, which needs the attention probabilities)')
          text += (f" The other {rest:.0f} points of NAMM's {over['namm']:+.1f}% are paid "
                   f'{paid}' if rest >= 1 else f" NAMM's {over['namm']:+.1f}% leaves nothing "
                   f'measurable for the costs paid {paid}')
          text += (': recency, with no features and no scorer, costs '
                   f"{over['recency']:+.1f}% in the same run.")
      lines += ['', text]
    lines += ['', f'![decode]({img("decode")})', '']
  rows = res.get('capability', [])
  if rows:
    r0 = rows[0]
    tasks = list(dict.fromkeys(c['task'] for c in r0['tasks']))
    lens = sorted({c['length'] for c in r0['tasks']})
    lines += ['### Capability', '',
              f"Each kind trained {r0['steps']} steps (batch {P['cap_batch']}, length "
              f"{P['cap_length']}) on `{MIX}`; held-out loss (nats/byte) on the corpus by "
              'position bucket; exact match on held-out task seeds (teacher forcing; the '
              'plain model under a policy goes through the decode path with half the cache), '
              f"{P['cap_examples']} examples per cell, mean over depths 0.1/0.5/0.9; in brackets "
              'the fraction of answer tokens right.', '',
              '| kind / policy | train s | loss | loss by position | ' +
              ' | '.join(f'{t} @ {n}' for t in tasks for n in lens) + ' |',
              '|---|---|---|---|' + '---|' * (len(tasks) * len(lens))]
    for r in rows:
      accs = []
      for t in tasks:
        for n in lens:
          cs = [c for c in r['tasks'] if c['task'] == t and c['length'] == n
                and c['accuracy'] is not None]
          accs.append(f"{np.mean([c['accuracy'] for c in cs]):.2f} "
                      f"({np.mean([c['token_accuracy'] for c in cs]):.2f})" if cs else 'skipped')
      loss = r['loss']
      lines.append(f"| {r['kind']} / {r['policy']} | {r['train_s']:.0f} | " +
                   (f"{loss['loss']:.3f} | " + ' '.join(f"{b['loss']:.2f}" for b in loss['buckets'])
                    if loss else '- | -') + ' | ' + ' | '.join(accs) + ' |')
    guess = {t: format_guess(t) for t in tasks}
    text = ('A guess that knows the answer format but not the needle (its spaces right, a '
            'tenth of its digits) gets ' + ', '.join(f'{t} {g:.2f}' for t, g in guess.items())
            + ' of the answer tokens, and no exact match.')
    cells = [c for r in rows for c in r['tasks'] if c['accuracy'] is not None]
    if not any(c['accuracy'] for c in cells):
      over = max(c['token_accuracy'] - guess[c['task']] for c in cells)
      text += (f" No kind answers a held-out example after {r0['steps']} steps, and no cell's "
               f'token fraction is more than {over:.2f} above that guess: at this budget the '
               'kinds differ in loss only. The per-method pages below train these tasks long '
               'enough to learn them; `--plan=cap_steps=N` trains longer here.')
    lines += ['', text, '', f'![capability]({img("capability")})', '']
  prof = res.get('profile')
  if prof:
    why = prof.get('why', 'the slowest kind relative to plain at 2048')
    ops = ''
    if 'ops' in prof:
      C = res.get('models', {}).get(prof['kind'], {}).get('segment_len')
      per = (f", {prof['ops'] * C / prof['length'] / prof['layers']:,.0f} per layer and "
             f"{C}-token segment" if C else '')
      ops = (f" One step under the profiler ({1e3 * prof['traced_s']:.0f} ms) ran "
             f"{prof['ops']:,} XLA ops{per}: median {prof['op_median_us']:.1f} us, mean "
             f"{1e6 * prof['op_s'] / prof['ops']:.1f} us, summed {1e3 * prof['op_s']:.0f} ms.")
    lines += [f"### Profile: {prof['kind']} at L = {prof['length']} ({why})", '',
              f"Train step at L = {prof['length']}, batch {prof['batch']}: "
              f"{prof['step_ms']:.0f} ms.{ops} Parts timed alone (forward + backward, same batch "
              'and length, segment by segment, each segment recomputed in the backward pass '
              "where the kind's `model.remat` does; timed alone they need not add up to the "
              'step):', '',
              '| part | ms | x layers, share of the step |', '|---|---|---|']
    for name, ms in prof['parts_ms'].items():
      k = prof['layers']
      lines.append(f"| {name} | {ms:.0f} | {100 * k * ms / prof['step_ms']:.0f}% |")
    lines += ['', cores_text(prof), ''] if prof.get('cores') else ['']
  return '\n'.join(lines)


def cores_text(prof):
  """The profile's core scaling in words (medians of the alternated steps)."""
  c, kind, n = prof['cores'], prof['kind'], prof['cores']['cores']
  med = {k: (np.median(c[k]['one']), np.median(c[k]['all'])) for k in (kind, 'plain')}
  name = {kind: kind, 'plain': 'plain' + (f" (remat {prof['plain_remat']})"
                                            if 'plain_remat' in prof else '')}
  each = '; '.join(f'{name[k]} {one:.2f} s vs {all_:.2f} s ({one / all_:.2f}x from {n - 1} more '
                   f"core{'s' * (n > 2)})" for k, (one, all_) in med.items())
  return (f"Cores: the train step at L = {prof['length']} with every thread of the process on "
          f'one core vs on all {n} (alternated, {len(c[kind]["one"])} rounds, medians): {each}. '
          f"Plain / {kind}: {med['plain'][0] / med[kind][0]:.2f}x on one core, "
          f"{med['plain'][1] / med[kind][1]:.2f}x on {n}.")


def plots(res, prefix):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [r for r in res.get('train', []) if 'tokens_per_s' in r and r['kind'] != 'plain_wide']
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in dict.fromkeys(r['kind'] for r in rows):
      rs = [r for r in rows if r['kind'] == kind]
      axes[0].plot([r['length'] for r in rs], [r['tokens_per_s'] for r in rs], 'o-', label=kind)
      axes[1].plot([r['length'] for r in rs], [r['memory_mib'] for r in rs], 'o-', label=kind)
    for ax, title in zip(axes, ('training tokens/s', 'XLA memory per step (MiB)')):
      ax.set(xscale='log', yscale='log', xlabel='context length', title=title)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_train.png', dpi=90)
  rows = [r for r in res.get('stream', []) if 'state_bytes' in r]
  if rows:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for kind in dict.fromkeys(r['kind'] for r in rows):
      rs = [r for r in rows if r['kind'] == kind]
      xs = [r['tokens'] for r in rs]
      for ax, key in zip(axes, ('us_per_token', 'state_bytes', 'decode_step_ms')):
        ax.plot(xs, [r[key] for r in rs], 'o-', label=kind)
    for ax, title in zip(axes, ('us per token (reading)', 'decode state bytes',
                                'one decode step (ms)')):
      ax.set(xscale='log', yscale='log', xlabel='tokens read', title=title)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_stream.png', dpi=90)
  rows = res.get('decode', [])
  if rows:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
      ax.plot(np.arange(1, len(r['kv_bytes']) + 1), np.asarray(r['kv_bytes']) / 2**10,
              label=f"{r['kind']}/{r['policy']} ({r['tokens_per_s']:.0f} tok/s)")
    ax.set(xlabel='generated tokens', ylabel='KV cache (KiB per sequence)',
           title='KV cache while decoding')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_decode.png', dpi=90)
  rows = [r for r in res.get('capability', []) if r['loss']]
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in rows:
      b = r['loss']['buckets']
      axes[0].plot([(x['start'] + x['end']) / 2 for x in b], [x['loss'] for x in b], 'o-',
                   label=r['kind'])
    axes[0].set(xlabel='position', ylabel='held-out loss (nats/byte)', title='loss by position')
    axes[0].legend(fontsize=7)
    allrows = res['capability']
    tasks = list(dict.fromkeys(c['task'] for c in allrows[0]['tasks']))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
      acc = [np.mean([c['accuracy'] for c in r['tasks'] if c['task'] == task
                      and c['accuracy'] is not None] or [np.nan]) for r in allrows]
      axes[1].bar(np.arange(len(allrows)) + i * width, acc, width, label=task)
    axes[1].set_xticks(np.arange(len(allrows)) + 0.4 - width / 2,
                       [f"{r['kind']}/{r['policy']}" for r in allrows], rotation=60, fontsize=7)
    axes[1].set(ylim=(0, 1), title='task exact match (mean over grid)')
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_capability.png', dpi=90)
  plt.close('all')


SECTION_KEYS = dict(train=('train',), ratio=('ratio',), stream=('stream', 'stream_fits'),
                    decode=('decode',),
                    capability=('capability',), profile=('profile',))
# Minutes of each section of a full run on one core of this 2-core host (a --jobs=2 run,
# 2026-12-04: 61 min, ratio then 26 min; 13.5 since the kinds share plain's steps); only
# used to share the sections out between --jobs processes (2: a full run took 40 min).
SECTION_COST = dict(train=28, ratio=14, stream=6, decode=9, capability=30, profile=1)


def share_sections(sections, jobs):
  """Sections in `jobs` groups of about equal cost, longest first; profile goes with train
  (it reads train's rows). Each group keeps the page's section order."""
  units = [[s] + (['profile'] if s == 'train' and 'profile' in sections else [])
           for s in sections if s != 'profile']
  if 'profile' in sections and 'train' not in sections:
    units.append(['profile'])
  groups, load = [[] for _ in range(jobs)], [0] * jobs
  for unit in sorted(units, key=lambda u: -sum(SECTION_COST[s] for s in u)):
    i = load.index(min(load))
    groups[i] += unit
    load[i] += sum(SECTION_COST[s] for s in unit)
  return [[s for s in SECTION_KEYS if s in g] for g in groups if g]


def run_jobs(groups):
  """One `bench/run.py --sections=GROUP --jobs=1` process per group, each pinned to its own
  slice of this process's cores; they merge into the same page (save() locks the file)."""
  cores = sorted(os.sched_getaffinity(0))
  share = max(len(cores) // len(groups), 1)
  args = [a for a in sys.argv[1:] if not a.startswith(('--jobs', '--sections'))]
  procs = []
  for i, group in enumerate(groups):
    mine = set(cores[(i * share) % len(cores):][:share])
    cmd = [sys.executable, os.path.abspath(__file__), *args, '--jobs=1',
           '--sections=' + ','.join(group)]
    log(f"job {i}: sections {','.join(group)} on cores {sorted(mine)}")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, preexec_fn=lambda m=mine: os.sched_setaffinity(
        0, m)))
  failed = [g for g, p in zip(groups, procs) if p.wait()]
  if failed:
    raise SystemExit(f'bench/run.py: the job(s) running {failed} failed (see above)')


def merged(path, res, sections, kinds):
  """res laid over the sections of an earlier run of the same plan written at `path` (read
  now, so runs of different sections may go on side by side); in the sections run, the
  earlier rows of kinds not run are kept (and that run's command listed for them)."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  same = lambda r: (r.get('quick'), r.get('preset', 'tiny'))
  plan = {k: json.loads(json.dumps(v)) for k, v in res['plan'].items()}
  if (not old or same(old) != same(res)            # another plan or preset: a page of its own
      or any(plan.get(k, v) != v for k, v in old['plan'].items())):
    return res
  res['models'] = dict(old.get('models', {}), **res['models'])
  for name in [n for n in SECTION_KEYS if n not in sections]:        # a stable order
    for key in SECTION_KEYS[name]:
      if key in old:
        res[key] = old[key]
    res['commands'].update({key: c for key, c in old.get('commands', {}).items()
                            if key.split(' (')[0] == name})
  for name in [n for n in SECTION_KEYS if n in sections]:
    kept = False
    for key in SECTION_KEYS[name]:
      if isinstance(old.get(key), list) and isinstance(res.get(key), list):
        rows = [r for r in old[key] if r.get('kind') not in kinds]
        res[key], kept = rows + res[key], kept or bool(rows)
      elif key == 'stream_fits' and key in old:
        res[key] = dict({k: f for k, f in old[key].items() if k not in kinds}, **res.get(key, {}))
    if not kept:
      continue
    earlier = [c for key, c in old.get('commands', {}).items()
               if key.split(' (')[0] == name and not set(c.get('kinds', ['?'])) <= set(kinds)]
    for i, c in enumerate(earlier):
      res['commands'][name + ' (other kinds' + (f' {i + 1})' if i else ')')] = c
  return res


def main(argv):
  del argv
  t0 = time.time()
  plan = make_plan()
  kinds = _KINDS.value or list(KINDS) + ['plain_wide']
  for k in kinds:
    if k not in KINDS and k != 'plain_wide':
      raise SystemExit(f'--kinds: unknown kind {k!r}; one of {sorted(KINDS) + ["plain_wide"]}')
  prefix = os.path.join(ROOT, _OUT.value or 'bench/results/run' + '_quick' * _QUICK.value)
  res = dict(quick=_QUICK.value, preset=_PRESET.value, plan=dataclasses.asdict(plan),
             models={k: model_shape(kind_config(k)) for k in kinds if k in KINDS},
             machine=machine(),
             seed=_SEED.value, commands={}, kinds=kinds)
  if _JOBS.value > 1 and len(_SECTIONS.value) > 1:
    run_jobs(share_sections(_SECTIONS.value, _JOBS.value))
    save(prefix, res, [], plan)               # the page of everything the jobs wrote
    log(f'wrote {prefix}.md/.json/_*.png in {(time.time() - t0) / 60:.1f} min '
        f'({_JOBS.value} jobs)')
    return
  peak = flops.measure_peak_flops()
  command = ' '.join(['python bench/run.py'] + sys.argv[1:])
  log(f"{res['machine']}; matmul peak {peak / 1e9:.1f} GFLOP/s")
  sections = _SECTIONS.value
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  done = []
  for name, run in (('train', lambda: {'train': train_section(kinds, plan, peak)}),
                    ('ratio', lambda: {'ratio': ratio_section(kinds, plan)}),
                    ('stream', lambda: dict(zip(('stream', 'stream_fits'),
                                                stream_section(kinds, plan)))),
                    ('decode', lambda: {'decode': decode_section(kinds, plan)}),
                    ('capability', lambda: {'capability': capability_section(
                        kinds, plan, _WORKDIR.value or tempfile.mkdtemp(prefix='mnemax-bench-'))}),
                    ('profile', lambda: {'profile': profile_section(
                        *worst_gap(res, prefix + '.json', plan), plan)})):
    if name in sections:     # (set here: a save() before lists the earlier run's command)
      res['commands'][name] = dict(command=command, peak=peak, kinds=kinds,
                                   started=time.strftime('%Y-%m-%d %H:%M'),
                                   cores=len(os.sched_getaffinity(0)))
      res.update(run())
      res['commands'][name]['minutes'] = (time.time() - t0) / 60
      done.append(name)
      res = save(prefix, res, done, plan)      # after every section: a crash loses only one
  if not done:                                 # --sections= : only re-render the page
    save(prefix, res, done, plan)
  log(f'wrote {prefix}.md/.json/_*.png in {(time.time() - t0) / 60:.1f} min')


def worst_gap(res, path, plan):
  """(kind, length, why, plain's remat) to profile: where the speed target missed by most
  was measured; with every speed target met, the memory kind slowest relative to plain at
  2048 (this run's train and ratio rows, else an earlier run's); plain's model.remat is
  the one its train row at that length ran (the faster; None: its preset's)."""
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  rows = res.get('train') or old.get('train')
  if not rows:
    raise SystemExit('profile: no train rows (run --sections=train first)')
  ratios = res.get('ratio') or old.get('ratio', [])
  missed = [t for t in targets(rows, {}, [], plan, ratios) if 'fraction' in t and not t['met']]
  if missed:
    t = min(missed, key=lambda t: t['fraction'])
    kind, L, why = t['kind'], t['length'], f"the target missed by most: {t['name']}, {t['value']}"
  else:
    L = TARGET_LENGTHS[0]
    r = min([r for r in rows if r['length'] == L and 'vs_plain' in r
             and not r['kind'].startswith('plain')], key=lambda r: r['vs_plain'])
    kind, why = r['kind'], f'the slowest kind relative to plain at {L}'
  plain = next((r for r in rows if r['kind'] == 'plain' and r['length'] == L), {})
  return kind, L, why, plain.get('remat')


def save(prefix, res, sections, plan):
  """Writes OUT.json / OUT.md / OUT_*.png from res laid over the other sections on disk
  (under a lock: jobs running other sections merge into the same files)."""
  with open(prefix + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    res = merged(prefix + '.json', res, sections, res['kinds'])
    res['targets'] = targets(res.get('train', []), res.get('stream_fits', {}),
                             res.get('decode', []), plan, res.get('ratio', []))
    with open(prefix + '.json', 'w') as f:
      json.dump(res, f, indent=1, default=str)
    plots(res, prefix)
    with open(prefix + '.md', 'w') as f:
      f.write(page(res, prefix) + '\n')
  return res


if __name__ == '__main__':
  app.run(main)
