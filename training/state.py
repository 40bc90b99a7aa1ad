"""What a training run holds: the TrainState (model + optimizer, whose `step` counts updates),
built from a config, split by nnx into a graphdef and one nnx.State {'model', 'opt'} that is
checkpointed as one orbax item (training/checkpoint.py)."""
from flax import nnx

import models


def model_ctor(cfg):
  """() -> the config's model, initialised from cfg.seed."""
  return lambda: models.build(cfg.model, rngs=nnx.Rngs(cfg.seed))


class TrainState(nnx.Module):
  """The model and its optimizer (AdamW state and the update count `opt.step`)."""

  def __init__(self, model, tx):
    self.model = model
    self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @property
  def step(self):
    return self.opt.step


def train_state_ctor(cfg, tx):
  """() -> TrainState of the config's model and the optimizer `tx`."""
  return lambda: TrainState(model_ctor(cfg)(), tx)
