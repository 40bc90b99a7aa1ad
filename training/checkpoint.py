"""Orbax checkpoints of a run directory: named items (pytrees, a grain iterator) + the config.

All checkpoint I/O lives here, and one class serves every kind of run: train.py saves
`state` (the TrainState: model, optimizer, step) and `data` (the grain iterator); evolve.py
saves `state` (the evolution's arrays). A step directory is only visible to `latest_step`
once orbax has finalised it, so a run killed mid-save resumes from the previous one.

Every save also writes a checksum of each array (item `checksums`); a restore recomputes
them and refuses arrays whose bits changed on disk (checkpoints from before the checksums:
the model's arrays must be finite). `restore_newest` falls back from a step that fails to
the newest one that restores, logged, and can set failed steps aside (renamed
STEP.unreadable); nothing is ever deleted.
"""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

_WORD = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


class CheckpointError(RuntimeError):
  pass


def _dir(path):
  path = os.path.abspath(path)
  sub = os.path.join(path, 'checkpoints')
  return sub if os.path.isdir(sub) else path


def _is_iterator(x):
  return isinstance(x, (grain.DatasetIterator, grain.DataLoaderIterator))


def _words(x):
  """The bits of array `x` as uint32 words."""
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, _WORD[x.dtype.itemsize]).astype(jnp.uint32)


@jax.jit
def _sums(tree):
  return jax.tree.map(lambda x: jnp.sum(_words(x), dtype=jnp.uint32), tree)


def checksums(tree):
  """{leaf path: the sum of the leaf's uint32 words mod 2**32}: exact whatever the sharding
  or the reduction order, and changed by any single flipped bit."""
  leaves = jax.tree_util.tree_flatten_with_path(_sums(tree))[0]
  return {jax.tree_util.keystr(path): int(np.asarray(v)) for path, v in leaves}


def _first_line(e, limit=300):
  """An exception's message up to its first line break (TensorStore appends its spec)."""
  text = str(e).split('See full TensorStore details')[0].strip()
  return text.splitlines()[0][:limit] if text else type(e).__name__


def _model_finite(tree):
  """Paths of the model's floating arrays in `tree` that are not all finite."""
  return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if "['model']" in jax.tree_util.keystr(p) and jnp.issubdtype(x.dtype, jnp.floating)
          and not bool(jnp.isfinite(x).all())]


class Checkpointer:

  def __init__(self, directory, *, keep=3, async_save=True, read_only=False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'no checkpoint directory at {self.directory}')
    self.mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only))

  @classmethod
  def for_workdir(cls, workdir, **kw):
    return cls(os.path.join(os.path.abspath(workdir), 'checkpoints'), **kw)

  @classmethod
  def open(cls, path):
    """Read-only access to a workdir or its checkpoints/ folder."""
    return cls(_dir(path), read_only=True)

  def latest_step(self):
    return self.mngr.latest_step()

  def step(self, step=None):
    """The latest (or the given) complete step, with clear errors."""
    steps = sorted(self.mngr.all_steps())
    if not steps:
      raise CheckpointError(f'no complete checkpoint in {self.directory}')
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f'no step {step} in {self.directory}; it has steps {steps}')
    return step

  def items(self, step):
    """Names of the items saved at `step` (e.g. {'state', 'data', 'config'})."""
    return {name for name in os.listdir(os.path.join(self.directory, str(step)))
            if os.path.isdir(os.path.join(self.directory, str(step), name))}

  def save(self, step, *, config, **items):
    """Saves each item (a pytree of arrays, or a grain iterator), their checksums and the
    config dict."""
    args = {name: grain.checkpoint.CheckpointSave(x) if _is_iterator(x) else
            ocp.args.StandardSave(x) for name, x in items.items()}
    sums = {name: checksums(x) for name, x in items.items() if not _is_iterator(x)}
    self.mngr.save(step, args=ocp.args.Composite(
        config=ocp.args.JsonSave(config), checksums=ocp.args.JsonSave(sums), **args),
                   force=True)

  def restore(self, step=None, **templates):
    """(step, restored items): each named item onto its template, an abstract pytree (shape,
    dtype, sharding: any mesh; None: as saved) or a grain iterator (its position is set in
    place); `config=None` reads the config dict too."""
    step = self.step(step)
    args = {name: ocp.args.JsonRestore() if name == 'config' else
            grain.checkpoint.CheckpointRestore(t) if _is_iterator(t) else
            ocp.args.StandardRestore(t) for name, t in templates.items()}
    out, sums = self._restore_with_sums(step, args)
    self._verify(step, {name: out[name] for name, t in templates.items()
                        if name != 'config' and not _is_iterator(t)}, sums)
    return step, out

  def restore_part(self, step, name, template, hint=''):
    """The subtree `template` (e.g. {'model': ...}) of item `name`, the rest left on disk;
    `hint` ends the error if the item lacks a part."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), template)
    out, sums = self._restore_with_sums(step, {name: ocp.args.PyTreeRestore(
        template, restore_args=restore_args, partial_restore=True)})
    out = out[name]
    # orbax hands back the template's own leaves for parts the item does not have
    missing = {p[0].key for p, x in jax.tree_util.tree_flatten_with_path(out)[0]
               if isinstance(x, jax.ShapeDtypeStruct)}
    if missing:
      raise CheckpointError(f'item {name!r} of step {step} in {self.directory} has no '
                            f'{" / ".join(sorted(missing))}{hint}')
    self._verify(step, {name: out}, sums)
    return out

  def _restore_with_sums(self, step, args):
    """(the restored items `args`, the checksums saved with them ({} if none), read in the
    same restore)."""
    if 'checksums' not in self.items(step):
      return self._restore(step, args), {}
    out = self._restore(step, {**args, 'checksums': ocp.args.JsonRestore()})
    return out, out['checksums']

  def _verify(self, step, restored, saved):
    """CheckpointError if a restored array differs from its `saved` checksum (or, saved
    without checksums, a model array is not finite)."""
    for name, tree in restored.items():
      if name in saved:
        got = checksums(tree)
        bad = [path for path, value in got.items() if saved[name].get(path, value) != value]
        why = 'differ from the checksums saved with them: its files changed after saving'
      else:
        bad, why = _model_finite({name: tree}), 'are not finite'
      if bad:
        raise CheckpointError(f'checkpoint step {step} in {self.directory}: {len(bad)} '
                              f'array(s) of item {name!r} {why} (e.g. {bad[0]})')

  def restore_newest(self, restore, step=None, set_aside=False):
    """(step, restore(step)) for `step`, or else for the newest step on which `restore`
    does not raise CheckpointError (unreadable or damaged): each failure is logged and the
    next older step tried. set_aside: failed steps are renamed STEP.unreadable (never
    deleted), so that a resumed run can save those steps again."""
    if step is not None:
      return self.step(step), restore(self.step(step))
    failed = []
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        out = restore(step)
      except CheckpointError as e:
        logging.error('%s; trying the step before', e)     # shown even by evaluate.py
        failed.append((step, e))
        continue
      if failed:
        logging.error('restored step %d of %s instead of the newest step %d', step,
                      self.directory, failed[0][0])
        if set_aside:
          self._set_aside([s for s, _ in failed])
      return step, out
    if failed:
      raise failed[0][1]
    raise CheckpointError(f'no complete checkpoint in {self.directory}')

  def _set_aside(self, steps):
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        os.rename(path, f'{path}.unreadable')
        logging.warning('set %s aside as %s.unreadable (nothing deleted)', path, path)
    multihost_utils.sync_global_devices('checkpoint set aside')
    self.mngr.reload()

  def _restore(self, step, args):
    try:
      return self.mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:   # orbax raises many types for damaged files
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} is unreadable or incomplete '
          f'({type(e).__name__}: {_first_line(e)})') from e

  def read_config(self, step=None):
    return self.restore(step, config=None)[1].config

  @classmethod
  def saved_config(cls, path, step=None):
    """The config saved with a workdir's latest (or given) step, read and closed."""
    ck = cls.open(path)
    try:
      return ck.read_config(step)
    finally:
      ck.close()

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.close()
