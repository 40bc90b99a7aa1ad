"""Run logging: metrics.jsonl + TensorBoard (process 0 only) and a progress line."""
import json
import os
import time

import jax
from absl import logging


class MetricWriter:
  """Appends to WORKDIR/metrics.jsonl and WORKDIR/tb. `resume_step`: the step the run resumes
  from (0: a fresh start); rows an earlier, interrupted process logged after it are dropped
  (metrics.jsonl rewritten, TensorBoard events purged), so every step has one row."""

  def __init__(self, workdir, resume_step=0):
    self.active = jax.process_index() == 0
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if os.path.exists(path):
        with open(path) as f:
          lines = f.readlines()
        # a fresh start (0) keeps nothing: its step-0 rows are written anew
        kept = [l for l in lines if resume_step and json.loads(l)['step'] <= resume_step]
        if len(kept) < len(lines):
          with open(path + '.tmp', 'w') as f:
            f.writelines(kept)
          os.replace(path + '.tmp', path)
          logging.info('metrics: dropped %d rows after step %d', len(lines) - len(kept),
                       resume_step)
      self.jsonl = open(path, 'a')
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=resume_step + 1)

  def write(self, step, metrics):
    if not self.active:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps(dict(step=int(step), time=time.time(), **metrics)) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


def read_metrics(workdir):
  """{step: metrics} from metrics.jsonl; a step logged twice (after a resume) keeps the last."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row['step'], {}).update(row)
  return out


class _QuietLibraries:
  """Drops INFO lines from orbax/grain (dozens per checkpoint); warnings still show."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'etils'))
    return record.levelno >= 30 or not noisy


def quiet_libraries():
  import logging as pylogging
  pylogging.getLogger('absl').addFilter(_QuietLibraries())


def memory_gib():
  """Peak device memory (GPU/TPU allocator) or, on CPU, the process's peak resident size."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux


def _hms(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


class Progress:
  """Rate, MFU and ETA from wall time between log points."""

  def __init__(self, start_step, total_steps, tokens_per_step, flops_per_step, peak_flops):
    self.total, self.tokens, self.flops, self.peak = total_steps, tokens_per_step, flops_per_step, peak_flops
    self.t0, self.s0 = time.time(), start_step

  def update(self, step, metrics):
    now = time.time()
    dt = max(now - self.t0, 1e-9) / max(step - self.s0, 1)
    self.t0, self.s0 = now, step
    metrics.update(tokens_per_s=self.tokens / dt, step_time_s=dt,
                   mfu=self.flops / dt / self.peak if self.peak else 0.0, memory_gib=memory_gib())
    eta = _hms(dt * (self.total - step))
    logging.info('step %d/%d | loss %.4f | %.1fk tok/s | MFU %.2f%% | %.3fs/step | %.2f GiB | ETA %s',
                 step, self.total, metrics['loss'], metrics['tokens_per_s'] / 1e3,
                 100 * metrics['mfu'], dt, metrics['memory_gib'], eta)
    return metrics
