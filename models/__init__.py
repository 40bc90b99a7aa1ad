"""Pure model code (Flax NNX). Speaks logical axis names only, never a mesh; imports nothing
from training/, configs/ or bench/."""


def build(model_cfg, *, rngs):
  """The model of a `model` config section (configs/base.py): the decoder LM with its
  per-layer mixers."""
  from models.lm import LM
  return LM(model_cfg, rngs=rngs)
