"""The decode policy of a config: the policy registered under decode.policy
(models/registry.py) built from the config, or, for decode.policy=namm with decode.namm_run,
the NAMM evolved by that evolve.py run (its parameters, statistics and `namm` keys)."""
from models import registry
from training.evolve import load_namm


def make_policy(cfg):
  """A policy pytree, or None for decode.policy=none."""
  de = cfg.decode
  if de.policy == 'namm' and de.namm_run:
    return load_namm(de.namm_run, de.namm_which)
  return registry.policy(de.policy).build(cfg)
