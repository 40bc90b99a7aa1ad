"""Section decode: per eviction policy on the plain model (and AnSAN with its anchor
policy), decode tokens/s and KV-cache bytes vs generated length; NAMM's update in parts."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import alternate, log, time_calls
from bench.side_by_side.kinds import POLICIES, init_model

DECODE_ROUNDS = 5


def corpus_prompt(batch, length):
  """Returns a [batch, length] array of held-out corpus tokens."""
  from data import pipeline
  return pipeline.make_eval_batches('stdlib', length - 1, batch, 1)[0]


def policy_overrides(name, budget, interval, namm_run):
  """Returns the config overrides for eviction policy `name` keeping `budget` tokens per
  head, acting every `interval` tokens (prefill chunk; NAMM update interval); NAMM's
  parameters from evolve.py workdir `namm_run` (if any)."""
  o = {'decode.policy': name, 'decode.window': budget, 'decode.budget': budget,
       'decode.recent': max(budget // 8, 1), 'decode.prefill_chunk': interval,
       'namm.update_interval': interval}
  if name == 'namm' and namm_run:
    o['decode.namm_run'] = namm_run
  return o


def make_policy_for(cfg, seed):
  """Returns cfg's eviction policy; NAMM without a run: a random parameter vector drawn
  (from `seed`) like a CMA-ES population member."""
  from training.policy import make_policy
  policy = make_policy(cfg)
  if cfg.decode.policy == 'namm' and not cfg.decode.namm_run:
    theta = 0.065 * np.random.default_rng(seed).standard_normal(policy.n_params)
    return policy.replace(theta=jnp.asarray(theta, jnp.float32))
  return policy


def decode_program(cfg, prompt_BxP, n_new, seed, capacity=0, policy=None):
  """Prefill under the policy (cfg's, or `policy`) into `capacity` slots (default: prompt +
  n_new), then n_new greedy steps compiled. Returns (run, row): run() runs the steps once
  (for timing: the prefill is not timed) and row = {kv_bytes: KV-cache bytes per sequence in
  use after each step, state_bytes: bytes of the whole decode state as allocated, prompt,
  batch}.

  models.decode.generate runs the same prefill and steps, but as one program (the prefill
  would be timed with the steps) that keeps no cache size per step: its parts (init_state,
  prefill, sample, step) are called here as it calls them, with the KV slots in use recorded
  at every step."""
  from models import decode, registry
  model = init_model(cfg)
  graphdef, params = nnx.split(model)
  policy = make_policy_for(cfg, seed) if policy is None else policy
  B, P = prompt_BxP.shape
  capacity = capacity or P + n_new

  @jax.jit
  def prefill(params, prompt_BxP):
    m = nnx.merge(graphdef, params)
    state = decode.init_state(m, B, capacity, policy)
    return decode.prefill(m, prompt_BxP, state, policy, cfg.decode.prefill_chunk)

  @jax.jit
  def steps(params, logits_BxV, state):
    m = nnx.merge(graphdef, params)

    def body(carry, i):
      logits_BxV, state = carry
      tok_B = decode.sample(logits_BxV, None)                    # greedy
      logits_BxV, state = decode.step(m, tok_B, jnp.full((B,), P + i, jnp.int32), state, policy)
      kv_L = jnp.stack([s.size_BxK().mean() for s in state if registry.is_kv_cache(s)])
      return (logits_BxV, state), kv_L
    return jax.lax.scan(body, (logits_BxV, state), jnp.arange(n_new))

  logits, state = prefill(params, prompt_BxP)
  steps = steps.lower(params, logits, state).compile()
  _, kv_NxL = steps(params, logits, state)
  token_bytes_L = [s.token_bytes() for s in state if registry.is_kv_cache(s)]
  kv_bytes_N = np.asarray(kv_NxL) @ np.asarray(token_bytes_L, np.float64)
  return (lambda: steps(params, logits, state)[1],
          dict(kv_bytes=kv_bytes_N.tolist(), state_bytes=registry.nbytes(state) / B, prompt=P,
               batch=B))


def namm_update_parts(policy, B, K, S, kept):
  """Returns the ms of one NAMM update of one layer's full cache [B, K, S], part by part:
  the features (ring -> STFT -> EMA, recency), the BAM scorer, the keep rule; and of a whole
  update when only `kept` slots per head hold tokens (the valid slots gathered into a
  smaller bucket)."""
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


def decode_section(kinds, plan, setup):
  """Returns the decode rows: per policy, tokens/s and ms per step (the fastest of
  DECODE_ROUNDS rounds, each running every policy once in turn), the KV bytes per step; on
  NAMM's row also its update timed in parts (update_ms)."""
  rows = []
  B, P, budget = 4, plan.decode_prompt, plan.decode_prompt // 2
  prompt = jnp.asarray(corpus_prompt(B, P))
  interval = max(P // 8, 16)
  jobs = [('plain', p) for p in POLICIES] if 'plain' in kinds else []
  if 'ansan' in kinds:
    jobs.append(('ansan', 'anchor'))
  cfgs = [setup.config(kind, **policy_overrides(name, budget, interval, setup.namm_run))
          for kind, name in jobs]
  programs = [decode_program(cfg, prompt, plan.decode_new, setup.seed) for cfg in cfgs]
  seconds = [min(ts) for ts in alternate([run for run, _ in programs], DECODE_ROUNDS)]
  for (kind, name), cfg, (_, r), sec in zip(jobs, cfgs, programs, seconds):
    r = dict(kind=kind, policy=name, budget=budget if name in ('recency', 'h2o', 'l2') else None,
             tokens_per_s=B * plan.decode_new / sec, ms_per_step=1e3 * sec / plan.decode_new,
             rounds=DECODE_ROUNDS, **r)
    if name == 'namm':
      full = next(x for x in rows if x['policy'] == 'keep_all')
      kept = int(round(r['kv_bytes'][-1] / full['kv_bytes'][-1] * (P + plan.decode_new)))
      r['update_ms'] = namm_update_parts(make_policy_for(cfg, setup.seed), B,
                                         cfg.model.n_kv_heads, P + plan.decode_new, kept)
      r['update_ms'].update(layers=cfg.model.n_layers, every=interval)
    rows.append(r)
    log(f"decode {kind}/{name:9s} {r['tokens_per_s']:8.1f} tok/s "
        f"KV {r['kv_bytes'][0] / 2**10:8.1f} -> {r['kv_bytes'][-1] / 2**10:8.1f} KiB")
  return rows
