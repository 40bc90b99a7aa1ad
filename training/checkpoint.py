"""Orbax checkpoints: model + optimizer + data iterator + config, async, keep N.

All checkpoint I/O lives here. A step directory is only visible to `latest_step` once
orbax has finalised it, so a run killed mid-save resumes from the previous one.
"""
import os

import grain
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def _dir(path):
  path = os.path.abspath(path)
  sub = os.path.join(path, 'checkpoints')
  return sub if os.path.isdir(sub) else path


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

  def save(self, step, *, model, opt=None, data_iter=None, config=None):
    items = dict(model=ocp.args.StandardSave(model))
    if opt is not None:
      items['opt'] = ocp.args.StandardSave(opt)
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items['config'] = ocp.args.JsonSave(config)
    self.mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, *, model, opt=None, data_iter=None, step=None, config=False):
    """Restores onto the given abstract states (shape/dtype/sharding: any mesh)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no complete checkpoint in {self.directory}')
    items = dict(model=ocp.args.StandardRestore(model))
    if opt is not None:
      items['opt'] = ocp.args.StandardRestore(opt)
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    if config:
      items['config'] = ocp.args.JsonRestore()
    try:
      return step, self.mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:   # orbax raises many types for damaged files
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} is unreadable or incomplete '
          f'({type(e).__name__}: {str(e)[:300]}). Nothing was deleted: move that step '
          f'folder aside to resume from an earlier one.') from e

  def restore_model(self, cfg, mesh, step=None):
    """(graphdef, model state, step): the model of `cfg`'s architecture, sharded on `mesh`
    by cfg.axis_rules (any mesh; any mixer with the same parameters)."""
    from training import mesh as meshlib
    from training.loop import model_ctor
    graphdef, abs_state, _ = meshlib.abstract_state(model_ctor(cfg), mesh, meshlib.axis_rules(cfg))
    step, restored = self.restore(model=abs_state, step=step)
    return graphdef, restored.model, step

  def read_config(self, step=None):
    step = self.latest_step() if step is None else step
    try:
      return self.mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as e:
      raise CheckpointError(f'cannot read the config of step {step} in {self.directory}: {e}') from e

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.close()
