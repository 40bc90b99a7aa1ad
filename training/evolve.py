"""NAMM evolution: an evosax strategy searches the scorer parameters of a frozen base LM.

Protocol (SakanaAI/evo-memory memory_trainer.py; arXiv 2410.13166 section 3):
  * generation 0 ("iteration 0") runs the keep-all policy (zero parameters) over the
    training pool of every task: per-prompt full-cache reference scores, and the
    normalisation statistics of the EMA features pooled over prompts, heads, valid tokens and
    layers. Both are then frozen and saved with every checkpoint.
  * each generation samples `evolve.prompts` pool prompts per task of the current stage
    (the curriculum `evolve.stages`, `evolve.generations` each); every member runs on the
    same prompts; a task's normalised score is mean(score) / mean(full-cache score) on those
    prompts; fitness = mean over tasks (minus `evolve.cache_weight` x the mean cache
    fraction: 0 is the official score-only fitness). evosax minimises: it is told -fitness.
  * scores: retrieval tasks (passkey / niah / mqar) = teacher-forced answer-token accuracy,
    every answer token predicted from the evicted cache; corpus = exp(-mean nll) of the
    last `CORPUS_TARGET` tokens of a held-out text window.
  * the population is evaluated by one jitted program vmapped over the members' NAMM
    parameters (the policy pytree's theta), its member axis sharded over a 1-D 'pop' mesh
    (strategy state replicated: ask/tell run outside it).
  * every `evolve.eval_every` generations the strategy mean (official `prefer_mean_to_best`)
    is validated on the whole training pool of the current stage's tasks (as official: val =
    the training prompts) and on the held-out prompts (reported only). The shipped solution
    (`best_val`, official `ckpt.pt` on the best val score) is the mean with the best val
    fitness within the latest stage (a mean scored on fewer tasks in an earlier stage is not
    comparable); the current mean and the best member seen are saved too.
Checkpoints (training/checkpoint.py, workdir/checkpoints): item `state` (strategy state,
generation, normalisation statistics, reference scores, best_val / mean / best parameters)
and the config. `load_namm` reads the shipped policy for decode.policy=namm. Re-running resumes;
keys are fold_in(seed, generation) and prompt samples depend only on (seed, generation), so a
resumed run continues identically.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, serialization
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from data import pipeline, synthetic
from models import decode, namm as nammlib, registry
from models.eviction import ratio_keep
from training import mesh as meshlib
from training.checkpoint import Checkpointer, CheckpointError
from training.config import ConfigError
from training.metrics import MetricWriter
from training.preemption import Preemption
from training.run import load_run

CORPUS_TARGET = 32          # scored tokens at the end of a corpus window


# --- Base model ----------------------------------------------------------------------------

def load_base(source, step=None):
  """The frozen base LM (training/run.py Run) of a train.py run or `hf:DIR`, on one device."""
  cfg = ml_collections.ConfigDict(dict(mesh=dict(data=1, fsdp=1, tensor=1)))
  return load_run(source, step, mesh=meshlib.make_mesh(cfg, jax.devices()[:1]))


# --- Tasks ---------------------------------------------------------------------------------

def task_examples(task, n, length, seed, split, source='stdlib', tokenizer='byte'):
  """{'tokens': int32 [n, L'], 'context': C, 'question': Q}: prefill tokens[:, :C] under the
  policy, then tokens[:, C:-1] as one chunk (no eviction) predicts targets tokens[:, C+1:];
  the prompt tokens[:, :C+1] ends with its question of (at most) Q tokens (0: none)."""
  if task.startswith('ruler:'):
    return ruler_examples(task[len('ruler:'):], n, length, seed, split, tokenizer)
  if task == 'corpus':
    split_name = 'train' if split == 'train' else 'eval'
    tokens = pipeline.make_eval_batches(source, length, n, 1, split=split_name)[0]
    return dict(tokens=np.asarray(tokens, np.int32), context=length - CORPUS_TARGET, question=0)
  b = synthetic.make_task_batch(task, n, length, depth=None, seed=seed, split=split)
  prompt_len = int(b['prompt_len_B'][0])
  assert (b['prompt_len_B'] == prompt_len).all()
  return dict(tokens=b['tokens_BxL'], context=prompt_len - 1,
              question=int(b['question_len_B'].max()))


ANSWER_TOKENS = 32          # room left for a RULER answer after its prompt


def ruler_examples(task, n, length, seed, split, tokenizer):
  """RULER examples (data/ruler.py) in the base's tokenizer, teacher forced: each prompt
  (left-padded to one length) then its answer, ' ' + the references joined by ', ', cut to
  the shortest answer of the set (one array, one context). Seeds: train below
  ruler.HELD_OUT, eval above evaluate.py's."""
  from data import ruler
  from data.hf_tokenizer import get_tokenizer
  from data.ruler import HELD_OUT, filler_id
  from training.ruler_eval import left_pad
  tok = get_tokenizer(tokenizer)
  filler = filler_id(tok)
  if filler is None:
    raise ConfigError(f'evolve.stages: ruler:{task} needs a one-token newline to align its '
                      f'prompts; {tokenizer} has none')
  first = (2 * HELD_OUT if split == 'eval' else 0) + seed * 100_000
  # teacher forced: no generation, the answer's tokens (up to ANSWER_TOKENS) follow the prompt
  examples = [ruler.example(task, length, tok, first + i, max_new_tokens=ANSWER_TOKENS)
              for i in range(n)]
  answers = [tok.encode(' ' + ', '.join(e.references))[:ANSWER_TOKENS] for e in examples]
  k = min(len(a) for a in answers)
  prompts = left_pad(examples, filler)
  tokens = np.concatenate([prompts, np.stack([a[:k] for a in answers])], 1)
  return dict(tokens=tokens.astype(np.int32), context=prompts.shape[1] - 1,
              question=max(e.question_tokens for e in examples))


def corpus_source(base_cfg):
  """The text the corpus task reads: the base LM's training text, or stdlib if that was
  synthetic or a mix (a mix's windows would include synthetic examples)."""
  source = base_cfg.data.source
  return source if pipeline.is_text(source) else 'stdlib'


def make_task_sets(cfg, tasks, split, n, source, tokenizer='byte'):
  return {t: task_examples(t, n, cfg.evolve.length, cfg.seed, split, source, tokenizer)
          for t in tasks}


def stage_tasks(ev, stage):
  return [t.strip() for t in ev.stages[stage].split(',')]


def all_tasks(ev):
  return list(dict.fromkeys(t for i in range(len(ev.stages)) for t in stage_tasks(ev, i)))


# --- The population program ----------------------------------------------------------------

def read_under_policy(context, question):
  """Tokens of a task set read under the policy: the context C (scored from there on), or,
  with its question of Q tokens after the compression, the C + 1 - Q before it."""
  return context + 1 - question if question else context


def make_scorer(graphdef, contexts, chunk, questions=None):
  """score(model_state, policy, {task: tokens}) -> ({task: score_B}, cache_frac_L (per layer),
  stats_3xF): one member (a policy pytree) on every task (contexts: {task: C}, static). The
  context is prefilled in chunks of `chunk` (the NAMM update interval; 0: at once) under the
  policy. With `questions` ({task: Q}, kvpress's query-agnostic setting) the prompt's last Q
  tokens (its question) are not: they follow the compression, with the answer; the chunks
  are then aligned to end with the context, so that the last compression sees all of it."""

  def run_task(model, policy, tokens_BxL, C, Q, task):
    B, L = tokens_BxL.shape
    E = read_under_policy(C, Q)
    state = decode.init_state(model, B, L, policy)
    _, state = decode.prefill(model, tokens_BxL[:, :E], state, policy, chunk, align_end=bool(Q))
    pos_BxA = jnp.broadcast_to(jnp.arange(E, L - 1, dtype=jnp.int32), (B, L - 1 - E))
    logits_BxAxV, _ = model(tokens_BxL[:, E:-1], state, pos_BxA)
    logits_BxAxV = logits_BxAxV[:, C - E:]
    target_BxA = tokens_BxL[:, C + 1:]
    if task == 'corpus':
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_BxAxV), target_BxA[..., None], -1)
      score_B = jnp.exp(-nll[..., 0].mean(-1))
    else:
      score_B = (logits_BxAxV.argmax(-1) == target_BxA).mean(-1)
    kv = [s for s in state if registry.is_kv_cache(s)]
    frac_L = jnp.stack([s.size_BxK().mean() for s in kv]) / E
    return score_B, frac_L, nammlib.pooled_stats(state)

  def score(model_state, policy, tokens):
    model = nnx.merge(graphdef, model_state)
    out = {t: run_task(model, policy, tokens[t], contexts[t], (questions or {}).get(t, 0), t)
           for t in tokens}
    scores = {t: o[0] for t, o in out.items()}
    frac_L = jnp.mean(jnp.stack([o[1] for o in out.values()]), 0)
    stats = sum(o[2] for o in out.values())
    return scores, frac_L, stats

  return score


def pop_mesh(ev):
  n = jax.device_count() if ev.pop_devices == -1 else ev.pop_devices
  return jax.make_mesh((n,), ('pop',), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def make_population_eval(graphdef, contexts, chunk, mesh, questions=None):
  """Jitted: (model_state, policy with theta [P, D], tokens) -> ({task: [P, B]}, frac_PxL,
  stats_Px3xF): vmapped over the policy's theta (members), sharded over the 'pop' axis;
  mu, sigma, model and prompts shared and replicated (a single member, as in the keep-all
  pass and the held-out checks, is replicated too). Called with one task at a time, so each
  task compiles once per shape: the generations of every stage share one, the single-member
  calls another."""
  score = make_scorer(graphdef, contexts, chunk, questions)

  @jax.jit
  def run(model_state, policy, tokens):
    theta_PxD = policy.theta
    split = theta_PxD.shape[0] % mesh.shape['pop'] == 0
    theta_PxD = jax.lax.with_sharding_constraint(
        theta_PxD, NamedSharding(mesh, P('pop') if split else P()))
    members = policy.replace(theta=0, mu=None, sigma=None)          # vmap axes
    return jax.vmap(score, in_axes=(None, members, None))(
        model_state, policy.replace(theta=theta_PxD), tokens)

  return run


def normalised_fitness(scores, refs):
  """Mean over tasks of mean(score) / mean(full-cache score) (eps 1e-7, as official).
  scores: {task: [P, B]}, refs: {task: [B]} -> [P]."""
  per_task = [scores[t].mean(-1) / max(float(np.mean(refs[t])), 1e-7) for t in scores]
  return jnp.mean(jnp.stack(per_task), 0)


# --- Strategy ------------------------------------------------------------------------------

def make_strategy(ev, n_dims):
  import evosax.algorithms as ea
  solution = jnp.zeros(n_dims)
  if ev.strategy == 'open_es':
    es = ea.Open_ES(ev.population, solution, optimizer=optax.adam(ev.lr),
                    std_schedule=optax.constant_schedule(ev.sigma0))
    return es, es.default_params
  cls = dict(cma_es=ea.CMA_ES, sep_cma_es=ea.Sep_CMA_ES, snes=ea.SNES)[ev.strategy]
  es = cls(ev.population, solution)
  return es, es.default_params.replace(std_init=jnp.asarray(ev.sigma0, jnp.float32))


# --- Checkpoints ---------------------------------------------------------------------------

def load_namm(run, which='best_val', gen=None):
  """The NAMM policy shipped by an evolve.py run: its `which` parameters (best_val | mean |
  best), normalisation statistics and `namm` hyper-parameters."""
  ck = Checkpointer.open(run)
  try:
    _, r = ck.restore_newest(lambda g: ck.restore(g, state=None, config=None)[1], gen)
  except CheckpointError as e:
    raise CheckpointError(f'decode.namm_run: {e}') from None
  finally:
    ck.close()
  s = r.state
  return nammlib.from_config(r.config['namm'], np.asarray(s[which]), np.asarray(s['mu']),
                             np.asarray(s['sigma']))


# --- The loop ------------------------------------------------------------------------------

def stage_of(gen, generations):
  """Stage index of 1-based generation `gen` (the last stage beyond the total)."""
  ends = np.cumsum(generations)
  return int(min(np.searchsorted(ends, gen, side='left'), len(generations) - 1))


def sample_batch(pool, tasks, n, seed, gen):
  rng = np.random.default_rng([seed, gen])
  idx = {t: np.sort(rng.choice(len(pool[t]['tokens']), n, replace=False)) for t in tasks}
  return {t: pool[t]['tokens'][idx[t]] for t in tasks}, idx


class Evolution:
  """Everything one evolve.py run holds; `run()` does the generations."""

  def __init__(self, cfg, workdir, base=None):
    self.cfg, self.ev = cfg, cfg.evolve
    self.workdir = os.path.abspath(workdir)
    base = base or load_base(self.ev.base)
    self.graphdef, model_state, self.base_cfg = base.graphdef, base.state, base.cfg
    # buckets=1: vmapped over members, the valid-slot compaction's switch would run every branch
    self.policy = nammlib.from_config(cfg.namm).replace(buckets=1)
    self.mesh = pop_mesh(self.ev)
    if self.ev.population % self.mesh.shape['pop']:
      raise ValueError(f'config.evolve.population: {self.ev.population} is not divisible by '
                       f'the pop mesh size {self.mesh.shape["pop"]}')
    self.model_state = jax.device_put(model_state, NamedSharding(self.mesh, P()))
    source = corpus_source(self.base_cfg)
    tasks = all_tasks(self.ev)
    tok = self.base_cfg.data.tokenizer
    self.pool = make_task_sets(cfg, tasks, 'train', self.ev.pool, source, tok)
    self.held = make_task_sets(cfg, tasks, 'eval', self.ev.eval_prompts, source, tok)
    self.contexts = {t: self.pool[t]['context'] for t in tasks}
    self.questions = ({t: self.pool[t]['question'] for t in tasks} if self.ev.query_agnostic
                      else None)
    # with a ratio, each task's budget: (1 - ratio) of the tokens read under the policy
    self.budgets = {t: ratio_keep(self.ev.compression_ratio, read_under_policy(
        c, (self.questions or {}).get(t, 0))) if self.ev.compression_ratio else 0
                    for t, c in self.contexts.items()}
    self.es, self.es_params = make_strategy(self.ev, self.policy.n_params)
    self._programs = {}

  def program(self, task):
    if task not in self._programs:
      self._programs[task] = make_population_eval(
          self.graphdef, {task: self.contexts[task]}, self.policy.update_interval, self.mesh,
          self.questions and {task: self.questions[task]})
    return self._programs[task]

  def evaluate(self, theta_PxD, mu, sigma, tokens, budget=True):
    """({task: scores [P, B]}, cache fraction [P] (mean over tasks), stats [P, 3, F]);
    budget=False: the official keep rule even with evolve.compression_ratio (keep-all pass).

    Prompts go in slices of `evolve.prompts`, and 2 .. population - 1 members are padded to
    the population size, so every call reuses one of two compiled programs per task (the
    population's, and the single member's of the keep-all pass and held-out checks)."""
    theta_PxD = jnp.asarray(theta_PxD)
    n_pop, n = theta_PxD.shape[0], self.ev.prompts
    if 1 < n_pop < self.ev.population:
      theta_PxD = jnp.concatenate(
          [theta_PxD, jnp.broadcast_to(theta_PxD[:1], (self.ev.population - n_pop,) +
                                       theta_PxD.shape[1:])])
    policy = self.policy.replace(theta=theta_PxD, mu=jnp.asarray(mu), sigma=jnp.asarray(sigma))
    scores, fracs, stats = {}, [], 0
    for t, tok in tokens.items():
      member = policy.replace(budget=self.budgets[t] if budget else 0)
      parts = [self.program(t)(self.model_state, member, {t: tok[i:i + n]})
               for i in range(0, len(tok), n)]
      scores[t] = np.concatenate([np.asarray(p[0][t]) for p in parts], 1)[:n_pop]
      fracs.append(np.mean([np.asarray(p[1]) for p in parts], 0)[:n_pop])
      stats = stats + sum(np.asarray(p[2]) for p in parts)[:n_pop]
    return scores, np.mean(fracs, 0).mean(-1), stats

  def keep_all_pass(self):
    """Generation 0: full-cache reference scores (train pool and held-out) and the frozen
    normalisation statistics (train pool only)."""
    F = self.policy.n_feat
    zeros, mu0, sigma0 = jnp.zeros((1, self.policy.n_params)), jnp.zeros(F), jnp.ones(F)
    ref, _, stats = self.evaluate(zeros, mu0, sigma0,
                                  {t: v['tokens'] for t, v in self.pool.items()}, budget=False)
    mu, sigma = nammlib.mean_std(jnp.asarray(stats[0]))
    held_ref, _, _ = self.evaluate(zeros, mu0, sigma0,
                                   {t: v['tokens'] for t, v in self.held.items()}, budget=False)
    return dict(mu=np.asarray(mu), sigma=np.asarray(sigma),
                ref={t: v[0] for t, v in ref.items()},
                held_ref={t: v[0] for t, v in held_ref.items()})

  def initial_state(self):
    es_state = self.es.init(jax.random.key(self.cfg.seed), jnp.zeros(self.policy.n_params),
                            self.es_params)
    D = self.policy.n_params
    return dict(gen=np.int32(0), es=serialization.to_state_dict(es_state),
                mu=np.zeros(self.policy.n_feat, np.float32),
                sigma=np.ones(self.policy.n_feat, np.float32),
                ref={t: np.zeros(self.ev.pool, np.float32) for t in self.pool},
                held_ref={t: np.zeros(self.ev.eval_prompts, np.float32) for t in self.held},
                mean=np.zeros(D, np.float32), best=np.zeros(D, np.float32),
                best_fitness=np.float32(-np.inf), best_val=np.zeros(D, np.float32),
                best_val_fitness=np.float32(-np.inf), best_val_stage=np.int32(-1),
                best_val_gen=np.int32(0))

  def score_one(self, theta_D, st, sets, refs):
    """Normalised score per task and mean cache fraction of one parameter vector on all
    prompts of `sets` ({task: token array}), against full-cache scores `refs`."""
    scores, frac, _ = self.evaluate(np.asarray(theta_D)[None], st['mu'], st['sigma'], sets)
    per_task = {t: float(scores[t][0].mean() / max(float(np.mean(refs[t])), 1e-7))
                for t in scores}
    return per_task, float(frac[0])

  def validate(self, st, stage, metrics):
    """The official val of the mean (whole training pool of the stage's tasks) and the
    held-out report; keeps the mean with the best val fitness of the latest stage."""
    tasks = stage_tasks(self.ev, stage)
    per_task, frac = self.score_one(st['mean'], st, {t: self.pool[t]['tokens'] for t in tasks},
                                    st['ref'])
    fitness = np.float32(np.mean(list(per_task.values())) - self.ev.cache_weight * frac)
    if stage != int(st['best_val_stage']) or fitness > st['best_val_fitness']:
      st.update(best_val=np.array(st['mean']), best_val_fitness=fitness,
                best_val_stage=np.int32(stage), best_val_gen=np.int32(st['gen']))
    metrics.update(val_fitness=float(fitness), val_cache=frac,
                   best_val_fitness=float(st['best_val_fitness']),
                   best_val_gen=int(st['best_val_gen']))
    held, frac = self.score_one(st['mean'], st, {t: v['tokens'] for t, v in self.held.items()},
                                st['held_ref'])
    metrics.update({f'heldout_{t}': v for t, v in held.items()})
    metrics.update(heldout_score=float(np.mean(list(held.values()))), heldout_cache=frac)

  def generation(self, st, es_state):
    """One generation (1-based st['gen'] + 1). Returns the new es_state and metrics."""
    ev = self.ev
    gen = int(st['gen']) + 1
    stage = stage_of(gen, ev.generations)
    tasks = stage_tasks(ev, stage)
    tokens, idx = sample_batch(self.pool, tasks, ev.prompts, self.cfg.seed, gen)
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), gen)
    k_ask, k_tell = jax.random.split(key)
    pop_PxD, es_state = self.es.ask(k_ask, es_state, self.es_params)
    scores, frac_P, _ = self.evaluate(pop_PxD, st['mu'], st['sigma'], tokens)
    refs = {t: st['ref'][t][idx[t]] for t in tasks}
    score_P = np.asarray(normalised_fitness(scores, refs))
    fit_P = score_P - ev.cache_weight * frac_P
    es_state, _ = self.es.tell(k_tell, pop_PxD, jnp.asarray(-fit_P), es_state, self.es_params)
    # the best member seen: evosax's own record (it minimises -fitness)
    st['best_fitness'] = np.float32(-es_state.best_fitness)
    st['best'] = np.asarray(es_state.best_solution, np.float32)
    st['mean'] = np.asarray(self.es.get_mean(es_state), np.float32)
    st['gen'] = np.int32(gen)
    best = int(fit_P.argmax())
    return es_state, dict(stage=stage, best_fitness=float(fit_P[best]),
                          mean_fitness=float(fit_P.mean()), mean_cache=float(frac_P.mean()),
                          best_score=float(score_P[best]), best_cache=float(frac_P[best]))

  def run(self):
    ev, cfg = self.ev, self.cfg
    total = int(sum(ev.generations))
    ck = Checkpointer.for_workdir(self.workdir, keep=ev.keep_ckpts, async_save=False)
    config_json = json.loads(cfg.to_json_best_effort())
    template = self.initial_state()
    start = ck.latest_step()
    if start is not None:      # a damaged newest generation: the newest good one
      start, st = ck.restore_newest(
          lambda g: dict(ck.restore(g, state=jax.device_get(template))[1].state), set_aside=True)
      logging.info('resumed evolution at generation %d from %s', start, self.workdir)
    else:
      st = template
      t0 = time.time()
      st.update(self.keep_all_pass())
      logging.info('keep-all pass (%.1fs): full-cache scores %s; normalisation frozen',
                   time.time() - t0, {t: round(float(np.mean(v)), 4) for t, v in st['ref'].items()})
      ck.save(0, state=jax.device_get(st), config=config_json)
    es_template = self.es.init(jax.random.key(cfg.seed), jnp.zeros(self.policy.n_params),
                               self.es_params)
    es_state = serialization.from_state_dict(es_template, st['es'])
    es_state = jax.tree.map(jnp.asarray, es_state)
    writer = MetricWriter(self.workdir, resume_step=int(st['gen']))
    metrics, t_last, g_last = {}, time.time(), int(st['gen'])
    with Preemption() as preemption:     # SIGTERM / SIGINT: save this generation, exit 0
      while int(st['gen']) < total:
        es_state, metrics = self.generation(st, es_state)
        gen = int(st['gen'])
        if gen % ev.log_every == 0 or gen == total:
          dt = time.time() - t_last
          metrics['evals_per_s'] = (gen - g_last) * ev.population / max(dt, 1e-9)
          t_last, g_last = time.time(), gen
        if gen % ev.eval_every == 0 or gen == total:
          self.validate(st, metrics['stage'], metrics)
        if gen % ev.log_every == 0 or gen == total:
          logging.info('gen %d/%d stage %d | fitness best %.4f mean %.4f | cache %.3f | %.1f evals/s%s',
                       gen, total, metrics['stage'], metrics['best_fitness'],
                       metrics['mean_fitness'], metrics['mean_cache'],
                       metrics.get('evals_per_s', 0.0),
                       f" | val {metrics['val_fitness']:.4f} (best {metrics['best_val_fitness']:.4f})"
                       f" | held-out {metrics['heldout_score']:.4f} at cache "
                       f"{metrics['heldout_cache']:.3f}" if 'heldout_score' in metrics else '')
        writer.write(gen, metrics)
        stop = preemption.requested()
        if gen % ev.ckpt_every == 0 or gen == total or stop:
          st['es'] = serialization.to_state_dict(jax.device_get(es_state))
          ck.save(gen, state=jax.device_get(st), config=config_json)
        if stop:
          preemption.saved(f'generation {gen}')
          break
    ck.close()
    writer.close()
    if jax.process_index() == 0:
      plot_metrics(self.workdir)
    return st, metrics


def plot_metrics(workdir):
  """workdir/evolve.png: fitness (best / mean / held-out) and cache fraction per generation."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from training.metrics import read_metrics
  rows = read_metrics(workdir)
  gens = sorted(g for g in rows if 'mean_fitness' in rows[g])
  if not gens:
    return
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
  for key in ('best_fitness', 'mean_fitness'):
    a.plot(gens, [rows[g][key] for g in gens], label=key)
  held = [g for g in gens if 'heldout_score' in rows[g]]
  val = [g for g in held if 'val_fitness' in rows[g]]
  a.plot(val, [rows[g]['val_fitness'] for g in val], 's-', label='val fitness (mean, pool)')
  a.plot(held, [rows[g]['heldout_score'] for g in held], 'o-', label='held-out (mean)')
  a.axhline(1.0, color='gray', lw=0.5)
  a.set(xlabel='generation', ylabel='normalised score', title='fitness')
  a.legend(fontsize=7)
  b.plot(gens, [rows[g]['mean_cache'] for g in gens], label='population mean')
  b.plot(held, [rows[g]['heldout_cache'] for g in held], 'o-', label='held-out (mean)')
  b.set(xlabel='generation', ylabel='cache / context', title='mean cache size', ylim=(0, 1.05))
  b.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'evolve.png'), dpi=100)
  plt.close(fig)


def evolve(cfg, workdir, base=None):
  """Runs (or resumes) the evolution in `workdir`. Returns (final state dict, last metrics).
  The workdir is created (config.json written) only once the base LM has loaded."""
  evolution = Evolution(cfg, workdir, base)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
  return evolution.run()
