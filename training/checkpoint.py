"""Orbax checkpoints of a run directory: named items (pytrees, a grain iterator) + the config.

All checkpoint I/O lives here, and one class serves every kind of run: train.py saves
`state` (the TrainState: model, optimizer, step) and `data` (the grain iterator); evolve.py
saves `state` (the evolution's arrays). A step directory is only visible to `latest_step`
once orbax has finalised it, so a run killed mid-save resumes from the previous one.
"""
import os

import grain
import orbax.checkpoint as ocp
import jax


class CheckpointError(RuntimeError):
  pass


def _dir(path):
  path = os.path.abspath(path)
  sub = os.path.join(path, 'checkpoints')
  return sub if os.path.isdir(sub) else path


def _is_iterator(x):
  return isinstance(x, (grain.DatasetIterator, grain.DataLoaderIterator))


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
    """Saves each item (a pytree of arrays, or a grain iterator) and the config dict."""
    args = {name: grain.checkpoint.CheckpointSave(x) if _is_iterator(x) else
            ocp.args.StandardSave(x) for name, x in items.items()}
    self.mngr.save(step, args=ocp.args.Composite(config=ocp.args.JsonSave(config), **args),
                   force=True)

  def restore(self, step=None, **templates):
    """(step, restored items): each named item onto its template, an abstract pytree (shape,
    dtype, sharding: any mesh; None: as saved) or a grain iterator (its position is set in
    place); `config=None` reads the config dict too."""
    step = self.step(step)
    args = {name: ocp.args.JsonRestore() if name == 'config' else
            grain.checkpoint.CheckpointRestore(t) if _is_iterator(t) else
            ocp.args.StandardRestore(t) for name, t in templates.items()}
    return step, self._restore(step, args)

  def restore_part(self, step, name, template):
    """The subtree `template` (e.g. {'model': ...}) of item `name`, the rest left on disk."""
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), template)
    out = self._restore(step, {name: ocp.args.PyTreeRestore(
        template, restore_args=restore_args, partial_restore=True)})[name]
    # orbax hands back the template's own leaves for parts the item does not have
    missing = {p[0].key for p, x in jax.tree_util.tree_flatten_with_path(out)[0]
               if isinstance(x, jax.ShapeDtypeStruct)}
    if missing:
      raise CheckpointError(f'item {name!r} of step {step} in {self.directory} has no '
                            f'{" / ".join(sorted(missing))}')
    return out

  def _restore(self, step, args):
    try:
      return self.mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:   # orbax raises many types for damaged files
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} is unreadable or incomplete '
          f'({type(e).__name__}: {str(e)[:300]}). Nothing was deleted: move that step '
          f'folder aside to resume from an earlier one.') from e

  def read_config(self, step=None):
    return self.restore(step, config=None)[1].config

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.close()
