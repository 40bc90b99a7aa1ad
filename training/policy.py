"""The decode policy of a config: the policy registered under decode.policy
(models/registry.py) built from the config, or, for decode.policy=namm with decode.namm_run,
the NAMM evolved by that evolve.py run (its parameters, statistics and `namm` keys)."""
from models import registry
from models.eviction import ratio_keep
from models.presses import check_ratio_policy
from training.evolve import load_namm


def ratio_budget(cfg, prompt_tokens):
  """cfg with the policy's budget set to keep (1 - decode.compression_ratio) of a prompt of
  `prompt_tokens` (kvpress's protocol: the ratio of the prompt's KV removed), or cfg itself
  when the ratio is 0."""
  de = cfg.decode
  if not de.compression_ratio:
    return cfg
  check_ratio_policy(de.policy)
  keep = ratio_keep(de.compression_ratio, prompt_tokens)
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.decode.budget = keep
    cfg.decode.window = keep - (cfg.decode.sinks if de.policy == 'streaming_llm' else 0)
    cfg.decode.recent = min(cfg.decode.recent, keep)
    cfg.decode.snap_window = min(cfg.decode.snap_window, keep)
  return cfg


def make_policy(cfg, prompt_tokens=None):
  """A policy pytree, or None for decode.policy=none; with decode.compression_ratio and
  `prompt_tokens`, its budget keeps (1 - ratio) of them."""
  de = cfg.decode
  if prompt_tokens is not None:
    cfg = ratio_budget(cfg, prompt_tokens)
  if de.policy == 'namm' and de.namm_run:
    policy = load_namm(de.namm_run, de.namm_which)
  else:
    policy = registry.policy(de.policy).build(cfg)
  if de.policy == 'namm' and cfg.decode.compression_ratio and prompt_tokens is not None:
    # the evolved scorer ranks, the ratio sets how many it keeps (instead of its threshold)
    policy = policy.replace(budget=int(cfg.decode.budget))
  return policy
