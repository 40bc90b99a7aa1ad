"""Section capability: every kind trained the same steps on the corpus mixed with synthetic
long-context tasks, then held-out loss by position and task exact match; the plain model
also under each eviction policy at half the cache."""
import os
import time

import jax
import numpy as np

from bench.common import log
from bench.side_by_side.decoding import make_policy_for, policy_overrides
from bench.side_by_side.kinds import MIX, POLICIES, TRAIN_ONLY
from training.config import resolve, validate


def capability_config(kind, plan, setup):
  """Returns kind's resolved config training plan.cap_steps steps on MIX at plan.cap_length."""
  L = plan.cap_length
  cfg = setup.config(kind)
  cfg.data.source, cfg.data.seq_len = MIX, L
  if cfg.model.segment_len:
    cfg.model.segment_len = min(cfg.model.segment_len, L)
  t = cfg.train
  t.steps, t.batch_size = plan.cap_steps, plan.cap_batch
  t.warmup_steps = max(plan.cap_steps // 10, 1)
  t.log_every, t.eval_every = max(plan.cap_steps // 10, 1), plan.cap_steps
  t.ckpt_every, t.async_ckpt = plan.cap_steps, False
  if kind == 'ansan':
    t.lr = 3e-3                             # trained from scratch here, not continued
  cfg = resolve(cfg)
  validate(cfg, jax.device_count())
  return cfg


def capability_section(kinds, plan, setup, workdir):
  """Returns the capability rows: per kind (trained under `workdir`/KIND) and policy
  ('none': the model's own state), the train seconds, held-out loss by position bucket (no
  policy only), the task cells of the (task x length x depth) grid and the cache used."""
  from training import evaluation, loop
  rows = []
  L = plan.cap_length
  for kind in [k for k in kinds if k not in TRAIN_ONLY]:
    cfg = capability_config(kind, plan, setup)
    run_dir = os.path.join(workdir, kind)
    t0 = time.time()
    loop.train(cfg, run_dir)
    train_s = time.time() - t0
    policies = [('none', 0)] + ([(p, L // 2) for p in POLICIES if p != 'keep_all']
                                if kind == 'plain' else [])
    for name, budget in policies:
      overrides = {'data.source': 'stdlib', 'eval.lengths': (L, 2 * L),
                   'eval.examples': plan.cap_examples, 'eval.depths': (0.1, 0.5, 0.9)}
      if name != 'none':
        overrides.update(policy_overrides(name, budget, 64, setup.namm_run))
      ev, _ = evaluation.load(run_dir, overrides=overrides)
      if name == 'namm' and not setup.namm_run:
        ev.policy = make_policy_for(ev.cfg, setup.seed)
      cells = ev.tasks()
      row = dict(kind=kind, policy=name, steps=plan.cap_steps, train_s=train_s,
                 loss=ev.loss() if name == 'none' else None, tasks=cells,
                 cache=ev.cache() if name != 'none' else None)
      rows.append(row)
      acc = {task: np.mean([c['accuracy'] for c in cells if c['task'] == task
                            and c['accuracy'] is not None]) for task in ev.cfg.eval.tasks}
      log(f"capability {kind}/{name}: " + (f"loss {row['loss']['loss']:.3f} " if row['loss']
          else '') + ' '.join(f'{k} {v:.2f}' for k, v in acc.items()))
  return rows
