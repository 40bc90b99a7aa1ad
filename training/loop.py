"""The training loop: build, restore, step, log, evaluate, checkpoint. train.py calls it."""
import json
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from data import pipeline
from data.tokenizer import ByteTokenizer
from training import flops, mesh as meshlib
from training.checkpoint import Checkpointer, CheckpointError
from training.config import xla_options
from training.init_from import init_model_from
from training.metrics import MetricWriter, Progress
from training.preemption import Preemption
from training.run import SHAPE_KEYS, check_shapes
from training.state import model_ctor, train_state_ctor
from training.step import make_eval_step, make_optimizer, make_train_step


class InMesh:
  """A jitted step traced (called or lowered) under its mesh and the logical axis rules, so
  that the model's activation constraints (models/layers.py constrain) take effect."""

  def __init__(self, fn, mesh, rules):
    self.fn, self.mesh, self.rules = fn, mesh, rules

  def _within(self, fn, *args):
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return fn(*args)

  def __call__(self, *args):
    return self._within(self.fn, *args)

  def lower(self, *args):
    return self._within(self.fn.lower, *args)


def train_step_for(cfg, graphdef, schedule, shardings, batch_sh, pad_id=ByteTokenizer.PAD):
  """The jitted train step with the config's train knobs (microbatches, xla_options), traced
  under the mesh and the config's axis rules: one place for train.py, compile_only and the
  benchmarks."""
  return InMesh(make_train_step(graphdef, schedule, shardings, batch_sh, pad_id,
                                cfg.train.microbatches, xla_options(cfg.train),
                                cfg.train.loss_positions),
                batch_sh.mesh, meshlib.axis_rules(cfg))


def check_loss_positions(weights_BxL, k):
  """train.loss_positions = k scores each row's k highest-weight targets only: a row that
  weighs more would silently lose some, so it is an error instead."""
  n = int((np.asarray(weights_BxL) != 0).sum(1).max()) if k else 0
  if n > k:
    raise ValueError(f'config.train.loss_positions={k}, but a batch row weighs {n} targets: '
                     'set it to at least the most targets a row has, or 0 (every position)')


def global_batch(local_np, sharding):
  """This process's rows -> one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(sharding, local_np)


def train(cfg, workdir):
  """Trains (or resumes) the run in `workdir`. Returns the last logged metrics."""
  workdir = os.path.abspath(workdir)
  t = cfg.train
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  logging.info('mesh %s on %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # --- Data -------------------------------------------------------------------------------
  d = cfg.data
  data_iter = pipeline.make_train_iterator(
      d.source, 'train', d.seq_len, t.batch_size, cfg.seed, jax.process_index(),
      jax.process_count(), d.tfds_data_dir or None, tokenizer=d.tokenizer,
      answer_loss=d.loss == 'answer', read_threads=d.read_threads, prefetch=d.prefetch)
  eval_args = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                   tfds_data_dir=d.tfds_data_dir or None, tokenizer=d.tokenizer,
                   answer_loss=d.loss == 'answer')
  eval_batches = pipeline.make_eval_pairs(d.source, d.seq_len, t.batch_size, d.eval_batches,
                                         **eval_args)
  # --- TrainState (model + optimizer), created sharded -------------------------------------
  tx, schedule = make_optimizer(t)
  graphdef, state, shardings = meshlib.sharded_init(train_state_ctor(cfg, tx), mesh, rules)
  model_graphdef = nnx.graphdef(nnx.merge(graphdef, state).model)
  n_params = flops.param_count(state['model'])
  logging.info('model: %.2fM parameters', n_params / 1e6)

  batch_sh = meshlib.batch_sharding(mesh)

  # --- Restore or initialise ----------------------------------------------------------------
  ckpt = Checkpointer.for_workdir(workdir, keep=t.keep_ckpts, async_save=t.async_ckpt)
  try:                          # closed on every exit: no async save left running
    start = 0
    if ckpt.latest_step() is not None:
      hint = f'; to start from its parameters, train a new workdir with train.init_from={workdir}'

      def resume(step):
        saved = ckpt.read_config(step)
        # sizes first (before orbax fails on them); another mixer may share the parameters
        check_shapes(cfg, saved, hint, keys=tuple(k for k in SHAPE_KEYS if k != 'mixer'))
        try:
          return restore_train_state(ckpt, step, state, shardings, data_iter)
        except CheckpointError:
          check_shapes(cfg, saved, hint)           # a mixer with other parameters: say so
          raise
      # a damaged newest step: the newest good one, the damaged ones set aside
      start, state = ckpt.restore_newest(resume, set_aside=True)
      logging.info('resumed from %s at step %d', ckpt.directory, start)
    elif t.init_from:
      state['model'] = init_model_from(cfg, mesh, state['model'])
    if jax.process_index() == 0:   # only once the data, the config and any restore are good
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(cfg.to_json_best_effort(indent=2))

    pad_id = pipeline.pad_id(d.source, d.tokenizer)
    train_step = train_step_for(cfg, graphdef, schedule, shardings, batch_sh, pad_id)
    eval_step = InMesh(make_eval_step(model_graphdef, shardings['model'], batch_sh, pad_id,
                                      t.loss_positions), mesh, rules)
    for _, w in eval_batches:
      check_loss_positions(w, t.loss_positions)

    def evaluate(model_state):
      """{'eval_loss', 'eval_accuracy'}: per weighted target, nll and greedy exact match."""
      sums = [eval_step(model_state, global_batch(b, batch_sh), global_batch(w, batch_sh))
              for b, w in eval_batches]
      loss, hits, n = (float(sum(x)) for x in zip(*sums))
      return dict(eval_loss=loss / n, eval_accuracy=hits / n)

    # --- Loop -------------------------------------------------------------------------------
    flops_tok = flops.train_flops_per_token(nnx.merge(graphdef, state).model, d.seq_len,
                                            t.loss_positions)
    peak = t.peak_flops or flops.measure_peak_flops()
    tokens_per_step = t.batch_size * d.seq_len
    progress = Progress(start, t.steps, tokens_per_step, flops_tok * tokens_per_step,
                        peak * jax.device_count())
    writer = MetricWriter(workdir, resume_step=start)
    logging.info('%.3g train FLOPs/token; matmul peak %.3g FLOP/s/device', flops_tok, peak)
    if start == 0 and jax.process_index() == 0 and pipeline.is_text(d.source):
      writer.write(0, dict(unigram_loss=pipeline.unigram_entropy(d.source, 'eval',
                                                                  d.tfds_data_dir or None,
                                                                  d.tokenizer)))
    metrics = {}
    pending = None                              # step t's metrics are read after t+1 dispatch
    last_saved = start
    with Preemption() as preemption:       # SIGTERM / SIGINT: save at the current step, exit 0
      for step in range(start + 1, t.steps + 1):
        batch = next(data_iter)
        check_loss_positions(batch['weights'], t.loss_positions)
        tokens = global_batch(batch['tokens'], batch_sh)
        weights = global_batch(batch['weights'], batch_sh)
        state, m = train_step(state, tokens, weights)
        if pending is not None:
          metrics = _finish(pending, ckpt, last_saved)
        pending = (step, m)
        logged = step % t.log_every == 0 or step == t.steps
        if logged:
          metrics = _finish(pending, ckpt, last_saved)
          pending = None
          metrics = progress.update(step, metrics)
          if step % t.eval_every == 0 or step == t.steps:
            metrics.update(evaluate(state['model']))
            logging.info('step %d | eval loss %.4f | eval accuracy %.4f', step,
                         metrics['eval_loss'], metrics['eval_accuracy'])
            if t.stop_at_accuracy and metrics['eval_accuracy'] >= t.stop_at_accuracy:
              metrics['stopped_early'] = 1     # Zoology's early stop: the task is solved
              logging.info('step %d | eval accuracy >= train.stop_at_accuracy=%g: stopping',
                           step, t.stop_at_accuracy)
          writer.write(step, metrics)
        solved = bool(logged and metrics.get('stopped_early'))
        stop = preemption.requested(sync=logged)
        if step % t.ckpt_every == 0 or step == t.steps or stop or solved:
          if pending is not None:
            _finish(pending, ckpt, last_saved)
            pending = None
          ckpt.save(step, state=state, data=data_iter,
                    config=json.loads(cfg.to_json_best_effort()))
          last_saved = step
        if stop:
          preemption.saved(f'step {step}')
          metrics = dict(metrics, preempted=1)     # callers in-process: not finished
        if stop or solved:
          break
    ckpt.wait()
    writer.close()
  finally:
    ckpt.close()
  return metrics


def restore_train_state(ckpt, step, state, shardings, data_iter):
  """The TrainState and the data iterator's position at `step`, onto `state`'s shardings."""
  abs_state = meshlib.abstract(state, shardings)
  if 'state' in ckpt.items(step):
    return ckpt.restore(step, state=abs_state, data=data_iter)[1].state
  # A run directory written before the TrainState: items `model` and `opt`.
  r = ckpt.restore(step, model=abs_state['model'], opt=abs_state['opt'], data=data_iter)[1]
  state['model'], state['opt'] = r.model, r.opt
  return state


def _finish(pending, ckpt, last_saved):
  """Fetches a step's metrics; stops the run (saving nothing more) if it was not finite."""
  step, m = pending
  m = jax.device_get(m)
  if not m['finite']:
    ckpt.wait()
    what = (f'loss={m["loss"]} grad_norm={m["grad_norm"]}' if m['state_finite'] else
            f'the updated parameters or optimizer state (loss={m["loss"]} grad_norm='
            f'{m["grad_norm"]})')
    raise FloatingPointError(
        f'step {step}: {what} is not finite. The update was discarded and no checkpoint was '
        f'written after step {last_saved} (kept). Lower train.lr or check the data.')
  return {k: float(np.asarray(v)) for k, v in m.items() if k not in ('finite', 'state_finite')}


def compiled_report(compiled, workdir, **fields):
  """The per-device bytes of a compiled program with `fields`, logged and written to
  WORKDIR/compile.json."""
  mem = compiled.memory_analysis()
  report = dict(**fields, per_device_bytes=dict(
      arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
      temp=mem.temp_size_in_bytes, generated_code=mem.generated_code_size_in_bytes))
  logging.info('compiled: %s', json.dumps(report))
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'compile.json'), 'w') as f:
      json.dump(report, f, indent=1)
  return report


def decode_compile_only(cfg, workdir=None):
  """Lowers and compiles decoding as evaluate.py runs it (models.decode.generate: a prompt of
  data.seq_len tokens read in decode.prefill_chunk pieces under decode.policy, then
  decode.max_new_tokens greedy steps, batch train.batch_size), with abstract parameters: the
  per-device memory of a paper-size inference setup, checked on CPU. The cache holds
  decode.capacity slots (0: the prompt and the new tokens; with decode.compression_ratio,
  the kept tokens, one prefill piece and the new tokens). A NAMM without decode.namm_run is
  the freshly initialised scorer (its shapes are all that compile). Returns the report, also written to
  WORKDIR/compile.json."""
  from models import decode
  from training.policy import make_policy, ratio_budget
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  graphdef, abs_params, _ = meshlib.abstract_state(model_ctor(cfg), mesh, rules)
  de = cfg.decode
  B, P, new = cfg.train.batch_size, cfg.data.seq_len, de.max_new_tokens
  policy = make_policy(cfg, P)
  capacity = de.capacity
  if not capacity and de.compression_ratio and policy is not None:
    capacity = ratio_budget(cfg, P).decode.budget + (de.prefill_chunk or P) + new
  prompt = jax.ShapeDtypeStruct((B, P), jax.numpy.int32, sharding=meshlib.batch_sharding(mesh))

  @jax.jit
  def generate(params, prompt_BxP):
    return decode.generate(nnx.merge(graphdef, params), prompt_BxP, jax.random.key(0),
                           n_new=new, capacity=capacity, policy=policy,
                           prefill_chunk=de.prefill_chunk)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = generate.lower(abs_params, prompt).compile()
  return compiled_report(compiled, workdir, mesh=dict(mesh.shape),
                         params=flops.param_count(abs_params), program='decode', batch=B,
                         prompt=P, new_tokens=new, capacity=capacity or P + new,
                         policy=de.policy, compression_ratio=de.compression_ratio)


def compile_only(cfg, workdir=None):
  """Lowers and compiles the train step on the current devices without allocating the
  model (abstract shapes only): checks a paper-size config's sharding and memory on CPU.
  Returns the report (mesh, parameters, FLOPs, per-device bytes), also written to
  WORKDIR/compile.json."""
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  tx, schedule = make_optimizer(cfg.train)
  graphdef, abs_state, shardings = meshlib.abstract_state(train_state_ctor(cfg, tx), mesh, rules)
  batch_sh = meshlib.batch_sharding(mesh)
  B, L = cfg.train.batch_size, cfg.data.seq_len
  tokens = jax.ShapeDtypeStruct((B, L + 1), jax.numpy.int32, sharding=batch_sh)
  weights = jax.ShapeDtypeStruct((B, L), jax.numpy.float32, sharding=batch_sh)
  step = train_step_for(cfg, graphdef, schedule, shardings, batch_sh)
  compiled = step.lower(abs_state, tokens, weights).compile()
  flops_tok = flops.train_flops_per_token(nnx.eval_shape(model_ctor(cfg)), cfg.data.seq_len,
                                          cfg.train.loss_positions)
  return compiled_report(compiled, workdir, mesh=dict(mesh.shape),
                         params=flops.param_count(abs_state['model']),
                         model_flops_per_step=flops_tok * cfg.train.batch_size * cfg.data.seq_len)
