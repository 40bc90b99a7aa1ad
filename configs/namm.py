"""NAMM: evolve the eviction network of a frozen base LM (train.py run) with evosax.

  python train.py --config=configs/namm.py:base_tiny --workdir=runs/base   # a base LM
  python evolve.py --config=configs/namm.py:tiny --workdir=runs/namm --config.evolve.base=runs/base
  python evaluate.py --workdir=runs/base --config.decode.policy=namm \
      --config.decode.namm_run=runs/namm --config.decode.prefill_chunk=64

Presets: tiny (CPU, minutes), small (one GPU), paper (official hyper-parameters: update
interval 512, CMA-ES pop 32, sigma0 0.065; LongBench-scale prompts need a GPU host).
base_tiny trains a small LM on passkey retrieval + text for the tiny evolution.

The spec's CPU task set (data/synthetic.py kv: key -> value among random filler letters with
distractor keys; kv4: four pairs, one queried; kvlocal: a local control), staged
a -> a+b -> a+b+c, on base LMs trained on those tasks only:
  python train.py --config=configs/namm.py:base_tasks --workdir=runs/base_tasks
  python train.py --config=configs/namm.py:base_tasks_b --workdir=runs/base_tasks_b
  for s in 0 1 2; do python evolve.py --config=configs/namm.py:tasks \
      --workdir=runs/namm_tasks_s$s --config.seed=$s --config.evolve.base=runs/base_tasks; done
  python bench/namm.py --base=runs/base_tasks --transfer_base=runs/base_tasks_b \
      --runs=runs/namm_tasks_s0,runs/namm_tasks_s1,runs/namm_tasks_s2
On kvpress's protocol (bench/compression.py): a NAMM evolved with the question after the
compression and every member at one ratio's budget, then the ratio sweep:
  python evolve.py --config=configs/namm.py:tasks --workdir=runs/namm_qa75_s0 --config.seed=0 \
      --config.evolve.base=runs/base_tasks --config.evolve.query_agnostic=True \
      --config.evolve.compression_ratio=0.75 --config.evolve.cache_weight=0
  python -m bench.compression --base=runs/base_tasks --prompts=384 \
      --namm_run=runs/namm_tasks_s0,namm_r75=runs/namm_qa75_s0
"""
from configs.base import apply_preset, get_base_config

BASE_DATA = 'mix:stdlib+synthetic:passkey'
TASK_DATA = 'mix:synthetic:kv+synthetic:kv4+synthetic:kvlocal'
PRESETS = {
    'tiny': dict(namm=dict(update_interval=64),
                 evolve=dict(population=16, stages=('passkey', 'passkey,corpus'),
                             generations=(20, 20), length=320, prompts=4, pool=16,
                             eval_prompts=16, eval_every=10, ckpt_every=5, log_every=1)),
    'small': dict(namm=dict(update_interval=128),
                  evolve=dict(population=32, stages=('passkey', 'passkey,niah',
                                                     'passkey,niah,corpus'),
                              generations=(100, 100, 100), length=1024, prompts=16, pool=64,
                              eval_prompts=64, eval_every=10, ckpt_every=10)),
    'paper': dict(namm=dict(update_interval=512),
                  evolve=dict(population=32, sigma0=0.065, stages=('passkey', 'passkey,niah',
                                                                   'passkey,niah,corpus'),
                              generations=(300, 300, 300), length=4096, prompts=64, pool=256,
                              eval_prompts=64, eval_every=10, ckpt_every=10)),
    # kv (a: key -> value among filler letters, lone distractor keys), kv4 (b: four pairs, one
    # queried), kvlocal (c: the pair among the last tokens, so only recent tokens matter).
    # Sep-CMA-ES: a diagonal covariance (full CMA-ES decomposes a 4172 x 4172 one).
    # cache_weight: the base solves these with the full cache, so the official score-only
    # fitness gives no reason to evict (with 0, on an earlier version of these tasks, the
    # CMA mean kept 96% of the cache after 20 generations). CMA-ES ranks members, so a small
    # weight acts as a tie-break among equal scores (0.02 and 0.05: the same first 30
    # generations).
    'tasks': dict(namm=dict(update_interval=64),
                  evolve=dict(population=16, strategy='sep_cma_es', cache_weight=0.05,
                              stages=('kv', 'kv,kv4', 'kv,kv4,kvlocal'),
                              generations=(20, 20, 30), length=320, prompts=8, pool=64,
                              eval_prompts=32, eval_every=5, ckpt_every=5, log_every=1)),
    # A base LM for the tiny evolution: 4 layers, GQA 4/2 heads, the stdlib corpus mixed
    # with passkey retrieval at 320 (so both fitness tasks are in its training distribution).
    'base_tiny': dict(model=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
                      data=dict(source=BASE_DATA, seq_len=320),
                      train=dict(batch_size=16, steps=2000, lr=3e-3, warmup_steps=50,
                                 log_every=50, eval_every=200, ckpt_every=200)),
    # A second base LM (other depth and head count) for zero-shot transfer.
    'base_tiny_b': dict(model=dict(d_model=128, n_layers=3, n_heads=8, n_kv_heads=4),
                        data=dict(source=BASE_DATA, seq_len=320),
                        train=dict(batch_size=16, steps=1000, lr=3e-3, warmup_steps=50,
                                   log_every=50, eval_every=200, ckpt_every=200)),
    # Base LMs for 'tasks': trained on those tasks' answer tokens only (data.loss=answer), at
    # 128 tokens (at the evolution's 320 they miss some far needles: the full-cache scores
    # in bench/results/namm.md).
    'base_tasks': dict(model=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
                       data=dict(source=TASK_DATA, seq_len=128, loss='answer'),
                       train=dict(batch_size=16, steps=1500, lr=1e-3, warmup_steps=50,
                                  log_every=50, eval_every=250, ckpt_every=250),
                       eval=dict(tasks=('kv', 'kv4', 'kvlocal'), lengths=(128, 320))),
    'base_tasks_b': dict(model=dict(d_model=128, n_layers=3, n_heads=8, n_kv_heads=4),
                         data=dict(source=TASK_DATA, seq_len=128, loss='answer'),
                         train=dict(batch_size=16, steps=1000, lr=1e-3, warmup_steps=50,
                                    log_every=50, eval_every=250, ckpt_every=250),
                         eval=dict(tasks=('kv', 'kv4', 'kvlocal'), lengths=(128, 320))),
}


def get_config(arg=None):
  return apply_preset(get_base_config(), PRESETS, arg)
