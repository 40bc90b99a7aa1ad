"""Infini-attention LM (models/infini.py): local attention inside segments of
`model.segment_len` tokens + a compressive memory per layer and head, full BPTT across the
segment scan (rematerialised per segment). The gates (beta) get their own learning rate and no
weight decay via `train.param_groups` (HF reproduction: beta stayed at 0.5 otherwise).

  python train.py --config=configs/infini.py:tiny --workdir=/tmp/infini
  python train.py --config=configs/infini.py:tiny --workdir=/tmp/infini_delta \
      --config.model.infini.update_rule=delta
  python train.py --config=configs/infini.py:local --workdir=/tmp/local   # memory off (baseline)
  # plug and play: continue a trained plain-attention run as Infini (same wq/wk/wv/wo, new gates)
  python train.py --config=configs/infini.py:tiny --workdir=/tmp/conv --config.train.init_from=/tmp/tiny
  python train.py --config=configs/infini.py:paper --workdir=/tmp/x --compile_only

Presets: tiny (CPU minutes: 4 segments of 64), local (tiny without memory), small (one GPU:
8 x 256), paper (the LM runs of the paper: 12 layers, 8 heads x 128, FFN 4096, N = 2048,
32K = 16 segments, batch 64; compile only on CPU).
"""
from configs.base import apply_preset, get_base_config

GATE_LR_MULT = 10.0      # gate lr = 10x the global lr (HF: 0.01 vs 3e-4), no weight decay
GATES = (('mixer/beta$', GATE_LR_MULT, False),)

_TINY = dict(model=dict(mixer='infini', d_model=128, n_layers=2, n_heads=4, n_kv_heads=4,
                        segment_len=64, remat='segment'),
             data=dict(seq_len=256),
             train=dict(batch_size=16, steps=300, lr=3e-3, warmup_steps=30, log_every=10,
                        eval_every=100, ckpt_every=100, param_groups=GATES))
PRESETS = {
    'tiny': _TINY,
    'local': dict(_TINY, model=dict(_TINY['model'], infini=dict(memory=False))),
    'small': dict(model=dict(mixer='infini', d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                             segment_len=256, remat='segment'),
                  data=dict(seq_len=2048),
                  train=dict(batch_size=32, steps=20000, lr=1e-3, warmup_steps=1000,
                             eval_every=1000, ckpt_every=1000, param_groups=GATES)),
    'paper': dict(model=dict(mixer='infini', d_model=1024, n_layers=12, n_heads=8, n_kv_heads=8,
                             head_dim=128, mlp_dim=4096, segment_len=2048, remat='segment',
                             dtype='bfloat16'),
                  data=dict(seq_len=32768),
                  train=dict(batch_size=64, steps=100000, lr=1e-2, warmup_steps=1000,
                             eval_every=2000, ckpt_every=1000, param_groups=GATES)),
}


def get_config(arg=None):
  return apply_preset(get_base_config(), PRESETS, arg)
