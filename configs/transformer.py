"""Plain Llama-style transformer (causal attention) on the embedded corpus.

  python train.py --config=configs/transformer.py:tiny --workdir=/tmp/tiny
Presets: tiny (CPU, minutes), small (one GPU), 1b (paper-size: compile/inspect only on CPU).
"""
from configs.base import apply_preset, get_base_config

PRESETS = {
    'tiny': dict(model=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2),
                 data=dict(seq_len=128),
                 train=dict(batch_size=16, steps=300, lr=3e-3, warmup_steps=30, log_every=10,
                            eval_every=100, ckpt_every=100)),
    'small': dict(model=dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4),
                  data=dict(seq_len=1024),
                  train=dict(batch_size=32, steps=20000, lr=1e-3, warmup_steps=1000,
                             eval_every=1000, ckpt_every=1000)),
    '1b': dict(model=dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_dim=8192,
                          rope_theta=500000.0, dtype='bfloat16'),
               data=dict(seq_len=4096),
               train=dict(batch_size=256, steps=100000, lr=3e-4, warmup_steps=2000,
                          eval_every=2000, ckpt_every=1000)),
}


def get_config(arg=None):
  return apply_preset(get_base_config(), PRESETS, arg)
