"""Preemption: SIGTERM (how clusters preempt) or SIGINT (Ctrl-C) asks the run to finish its
current step, save a checkpoint at it, flush its metrics and exit 0; the same command then
resumes there. Several processes stop at the same step: they agree at the next check."""
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Context manager: inside, the signals set a flag instead of killing the process."""

  def __init__(self):
    self.received, self._old = None, {}

  def __enter__(self):
    try:
      self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
    except ValueError:              # not the main thread: signals keep their default action
      logging.warning('preemption: not the main thread, signals not handled')
    return self

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    logging.warning('%s: finishing the current step, then saving and exiting', self.received)

  def saved(self, where):
    """Logs that the run stopped at `where` ('step 12') with a checkpoint saved."""
    logging.warning('%s: stopped at %s, checkpoint saved; rerun the same command to resume',
                    self.received or 'another process', where)

  def requested(self, sync=True):
    """Whether to stop now. With several processes, only at `sync` points (a collective):
    every process gets the same answer."""
    if jax.process_count() == 1:
      return self.received is not None
    if not sync:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.asarray(flags).any())
