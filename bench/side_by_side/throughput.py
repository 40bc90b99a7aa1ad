"""Sections train, ratio and stream: training tokens/s per kind and length, the speed
targets' ratios head to head, and inference over long inputs with the state carried."""
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import (TooBig, at_length, compile_checked, head_to_head, log, measure_train,
                          program_bytes, slope, time_calls)
from bench.side_by_side.kinds import KINDS, RECURRENT, SCALE_KINDS, init_model, state_bytes
from bench.side_by_side.targets import RATIO_KINDS, target_lengths
from training import flops


def train_section(kinds, plan, peak, setup, saved=lambda rows: None):
  """Returns the train rows (each also handed to saved(rows so far) as it is measured, so a
  killed run keeps them): per kind and length, tokens/s, MFU (against `peak`, FLOP/s),
  XLA memory, compile time and the ratio to plain (vs_plain); plain at the faster of its
  remat settings (the other in remat_other); plain_wide at plan.wide_length, the fastest of
  3 steps against the highest of three peaks."""
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
                     remat=cfg.model.remat) for cfg in setup.plain_configs()]
        row.update(max(runs, key=lambda r: r['tokens_per_s']))
        row['remat_other'] = [dict(remat=r['remat'], tokens_per_s=r['tokens_per_s'])
                              for r in runs if r['remat'] != row['remat']]
      else:
        row.update(measure_train(at_length(setup.config(kind), L, plan.train_tokens),
                                 row.get('peak', peak), plan.train_steps, row.get('best_of', 1)))
      if kind == 'plain_wide':
        after = flops.measure_peak_flops(repeats=20)
        row['mfu'] *= row['peak'] / max(row['peak'], after)
        row['peak'] = max(row['peak'], after)
    except TooBig as e:
      row['skipped'] = str(e)
    rows.append(row)
    saved(rows)
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


def ratio_section(kinds, plan, setup):
  """Returns the ratio rows: the speed targets' ratios head to head: at each target length
  the kinds' train steps and plain's alternate for plan.ratio_rounds rounds
  (bench.common.head_to_head); plain runs at its preset's model.remat and without
  rematerialisation, and the faster of the two is the reference (its steps shared by the
  kinds). ratio = that plain's median step time / the kind's (the kind at its preset; the
  same tokens per step)."""
  rows = []
  plains_cfg = setup.plain_configs()
  plain_remats = [c.model.remat for c in plains_cfg]
  ratio_kinds = {k: setup.config(k) for k in RATIO_KINDS if k in kinds}
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
  """Returns a ratio row's step times: '<the kind's> s vs <plain's> s' (plain's remat
  named, and its slower setting's times in brackets, where the row has them)."""
  times = lambda ts: ' '.join(f'{t:.2f}' for t in ts) + ' s'
  text = f"{times(row['kind_s'])} vs {times(row['plain_s'])}"
  if 'plain_remat' in row:
    text += f" (plain remat {row['plain_remat']}" + ''.join(
        f"; remat {o['remat']}: {times(o['s'])}" for o in row['plain_other']) + ')'
  return text


def stream_one(cfg, n_tokens, chunk, block_tokens):
  """Reads n_tokens (batch 1) chunk by chunk with the state carried; then one decode step.
  Returns {us_per_token, state_bytes, program_mib, decode_step_ms}."""
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


def stream_section(kinds, plan, setup):
  """Returns (rows, fits): per recurrent kind (and plain up to plan.stream_plain_max) and
  total length, stream_one's numbers; per kind, the fitted exponents in length of the
  state bytes, the decode step and the time per token."""
  rows = []
  for kind in [k for k in kinds if k in RECURRENT or k == 'plain']:
    for n in plan.stream_lengths + (plan.stream_long if kind in SCALE_KINDS else ()):
      if kind == 'plain' and n > plan.stream_plain_max:
        continue
      cfg = setup.config(kind)
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
