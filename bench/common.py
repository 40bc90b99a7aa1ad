"""Shared pieces of the benchmarks: configs by spec, the real train step timed, memory, fits.

Every timing here runs the same jitted code as train.py / evaluate.py; nothing is modelled.
"""
import contextlib
import importlib.util
import json
import os
import platform
import shlex
import time

import jax
import numpy as np
from absl import logging

from training import flops, mesh as meshlib
from training.config import key_node, resolve, validate
from training.loop import train_step_for
from training.state import model_ctor, train_state_ctor
from training.step import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec, overrides=None):
  """'configs/x.py[:preset]' -> its ConfigDict, with {'section.key': value} overrides."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_cfg', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(arg or None), overrides)


def apply_overrides(cfg, overrides=None):
  """cfg with {'section.key': value} set in place; string values (from a command line) are
  converted to the type of the key's current value."""
  for key, value in (overrides or {}).items():
    node, leaf = key_node(cfg, key)
    if isinstance(value, str):                                        # from a command line
      value = value.strip('\'"')
      if not isinstance(node[leaf], str):
        value = value == 'True' if isinstance(node[leaf], bool) else type(node[leaf])(value)
    node[leaf] = value
  return cfg


def load_json(path, default):
  """The JSON file at `path`, or `default` if there is none (a study's results so far)."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return default


def save_json(path, obj):
  """Writes `obj` to `path` through a temporary file: a kill never leaves half a file."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


class Preempted(Exception):
  """A run in this process stopped at SIGTERM / SIGINT (checkpoint saved): the study stops
  too, recording nothing of it; rerunning its command resumes the run."""


def run_study(main):
  """Runs a study's main(); a Preempted run ends it like train.py: a warning, exit 0."""
  try:
    main()
  except Preempted as e:
    logging.warning('%s; rerun the same command to resume', e)


def train_command(command):
  """Runs a `python train.py --config=FILE[:PRESET] --workdir=W --config.k=v ...` command
  in this process (training.loop.train: a finished run returns at once); its seconds.
  Raises Preempted if a signal stopped it before its end."""
  from training.loop import train
  args = dict(a[2:].split('=', 1) for a in shlex.split(command)[2:])
  overrides = {k[len('config.'):]: v for k, v in args.items() if k.startswith('config.')}
  cfg = resolve(load_config(args['config'], overrides))
  validate(cfg, jax.device_count())
  t0 = time.time()
  if train(cfg, args['workdir']).get('preempted'):
    raise Preempted(f'{args["workdir"]}: stopped by a signal, checkpoint saved')
  return time.time() - t0


def at_length(cfg, length, tokens):
  """A resolved copy training at context `length` with ~`tokens` tokens per step."""
  cfg = cfg.copy_and_resolve_references()
  cfg.data.seq_len = length
  cfg.train.batch_size = max(1, tokens // length)
  if cfg.model.segment_len:
    cfg.model.segment_len = min(cfg.model.segment_len, length)
  return resolve(cfg)


def infini_gates(state, model_cfg):
  """sigmoid(beta) per layer and head of an Infini model's nnx state (None for other models
  and for segment-local attention, whose gates are unused)."""
  if model_cfg.mixer != 'infini' or not model_cfg.infini.memory:
    return None
  blocks = state['blocks']
  return [np.asarray(jax.nn.sigmoid(blocks[i]['mixer']['beta'][...])).tolist()
          for i in sorted(blocks.keys())]


def log(msg):
  """Logs msg and prints it (flushed: jobs running side by side interleave their lines)."""
  logging.info(msg)
  print(msg, flush=True)


def machine():
  """One line naming the host, the device and the versions."""
  import flax
  dev = jax.devices()[0]
  return (f'{platform.processor() or platform.machine()} host with {os.cpu_count()} cores; '
          f'{dev.device_kind} x{jax.device_count()}; jax {jax.__version__}, flax {flax.__version__}')


def free_bytes():
  """Memory the next program may use: the device's free memory, or the host's available RAM."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def program_bytes(compiled):
  """Arguments + outputs + temporaries of a compiled program (what XLA will allocate)."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def peak_memory(compiled):
  """(bytes, kind): the device allocator's peak on GPU/TPU, else XLA's buffer sizes."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'], 'device peak'
  return program_bytes(compiled), 'XLA buffers'


class TooBig(Exception):
  """A program that would not fit in memory (skipped, with the reason, rather than crashed)."""


def compile_checked(lowered):
  compiled = lowered.compile()
  need, have = program_bytes(compiled), free_bytes()
  if need > 0.9 * have:
    raise TooBig(f'needs {need / 2**30:.1f} GiB > {have / 2**30:.1f} GiB free')
  return compiled


def time_calls(fn, steps, compiled=False, best_of=1):
  """Seconds per call of fn() (fn returns arrays) after one warm-up call. With `compiled`
  (fn runs an ahead-of-time compiled program, so the warm-up compiles nothing), a warm-up
  slower than 10 s is the measurement itself: warm-up effects are noise at that size.
  `best_of` > 1: the fastest of that many such measurements (for noisy machines)."""
  if best_of > 1:
    return min(time_calls(fn, steps, compiled) for _ in range(best_of))
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  warm = time.perf_counter() - t0
  if compiled and warm > 10:
    return warm
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def op_trace(fn):
  """{ops, op_s, op_median_us, traced_s}: the XLA ops one call of fn runs, from a
  jax.profiler trace: their number, summed and median time (leaf ops; loops are
  containers), and the call's time under the profiler."""
  import glob
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    traced_s = time.perf_counter() - t0
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  ns = [e.duration_ns for plane in data.planes for line in plane.lines
        if line.name.startswith('tf_XLA') or line.name == 'XLA Ops'       # CPU / GPU threads
        for e in line.events
        if '::' not in e.name and not e.name.startswith(('end: ', 'while', 'call', 'conditional'))]
  return dict(ops=len(ns), op_s=sum(ns) / 1e9, op_median_us=float(np.median(ns)) / 1e3,
              traced_s=traced_s)


def train_program(cfg):
  """(one, compiled, compile_s): the real train step at cfg's batch and length, compiled
  (TooBig if it would not fit); one() runs a step on the carried state, returns its loss."""
  validate(cfg, jax.device_count())
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  tx, schedule = make_optimizer(cfg.train)
  graphdef, state, shardings = meshlib.sharded_init(train_state_ctor(cfg, tx), mesh, rules)
  batch_sh = meshlib.batch_sharding(mesh)
  step = train_step_for(cfg, graphdef, schedule, shardings, batch_sh)
  B, L = cfg.train.batch_size, cfg.data.seq_len
  tokens = jax.device_put(jax.random.randint(jax.random.key(0), (B, L + 1), 0, 256), batch_sh)
  weights = jax.device_put(np.ones((B, L), np.float32), batch_sh)
  t0 = time.perf_counter()
  compiled = compile_checked(step.lower(state, tokens, weights))
  compile_s = time.perf_counter() - t0
  box = [state]

  def one():
    box[0], m = compiled(box[0], tokens, weights)
    return m['loss']
  return one, compiled, compile_s


def measure_train(cfg, peak, steps, best_of=1):
  """The real train step at cfg's batch and length: tokens/s, MFU, memory, compile time.
  best_of > 1: the step time is the fastest of that many measurements (see time_calls)."""
  one, compiled, compile_s = train_program(cfg)
  B, L = cfg.train.batch_size, cfg.data.seq_len
  dt = time_calls(one, steps, compiled=True, best_of=best_of)
  fpt = flops.train_flops_per_token(abstract_model(cfg), L)
  mem, mem_kind = peak_memory(compiled)
  return dict(length=L, batch=B, microbatches=cfg.train.microbatches, step_ms=1e3 * dt,
              tokens_per_s=B * L / dt,
              mfu=fpt * B * L / dt / (peak * jax.device_count()), memory_mib=mem / 2**20,
              memory_kind=mem_kind, compile_s=compile_s)


def alternate(runs, rounds):
  """Seconds per call of each run() (each returns arrays), the calls alternated: `rounds`
  rounds, each calling every run once in turn, so a machine whose speed drifts slows them
  alike. Returns one list of `rounds` times per run."""
  times = [[] for _ in runs]
  for _ in range(rounds):
    for run, ts in zip(runs, times):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      ts.append(time.perf_counter() - t0)
  return times


def warm_steps(cfgs):
  """Each config's train step (`train_program`), after one warm-up step each."""
  progs = [train_program(cfg)[0] for cfg in cfgs]
  for one in progs:
    jax.block_until_ready(one())
  return progs


def head_to_head(cfgs, rounds):
  """Seconds per step of each config's train step, alternated (`alternate`, after a warm-up
  step each). Returns one list of `rounds` times per config."""
  return alternate(warm_steps(cfgs), rounds)


@contextlib.contextmanager
def on_cores(n):
  """Inside the block every thread of this process (XLA's thread pools too) runs on the
  first n of the process's cores. Linux keeps an affinity per thread, so each is set."""
  mine = os.sched_getaffinity(0)

  def pin(cores):
    for tid in os.listdir('/proc/self/task'):
      with contextlib.suppress(ProcessLookupError):       # a thread that has just ended
        os.sched_setaffinity(int(tid), cores)
  pin(set(sorted(mine)[:n]))
  try:
    yield
  finally:
    pin(mine)


def on_one_core(fn):
  """fn, run with every thread of the process on one core (`on_cores`)."""
  def run():
    with on_cores(1):
      return jax.block_until_ready(fn())
  return run


def abstract_model(cfg):
  from flax import nnx
  return nnx.eval_shape(model_ctor(cfg))


def slope(xs, ys):
  """Exponent a of a fit ys ~ xs^a (log-log least squares); nan with fewer than two points."""
  ok = [(x, y) for x, y in zip(xs, ys) if y and np.isfinite(y)]
  if len(ok) < 2:
    return float('nan')
  return float(np.polyfit(np.log([x for x, _ in ok]), np.log([y for _, y in ok]), 1)[0])
