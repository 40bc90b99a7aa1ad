"""Titans MAC (memory as a context, models/titans.py): segment attention over
[persistent || retrieved memory || segment] with a deep neural memory written per segment.

  python train.py --config=configs/titans_mac.py:tiny --workdir=/tmp/mac
Presets: tiny (CPU, minutes), small (one GPU), 340m and 760m (paper Table 5 sizes: compile only
on CPU).
"""
from configs.base import apply_preset, get_base_config

# CPU note: XLA sends each dot and reduction to YNNPACK by default. At batch 1 the memory's
# per-chunk contractions are tiny ([4, 16, 64]) and each YNNPACK call took ~20 us, half of a
# step's op time: `--config.train.xla_options=xla_cpu_experimental_ynn_fusion_type=` (XLA's
# own kernels) made steps at 4K x batch 1 1.12x faster (MAC; MAG 1.17x, MAL 1.12x; medians of
# interleaved steps), but at 2K x batch 8 0.89x, so the default stays. At batch 1 the step is
# a chain of such tiny ops and gains nothing from a second core, where full attention's large
# matmuls do (bench/results/run.md, profile: the step on one core vs on all). What does use
# a second core is a second XLA device: XLA_FLAGS=--xla_force_host_platform_device_count=2
# (mesh.data=-1 splits the batch over both) made steps at 2K x batch 8 1.36x faster (3.54 s
# -> 2.60 s; plain 1.22x, 2.20 s -> 1.80 s; medians of 4 interleaved rounds).
PRESETS = {
    'tiny': dict(model=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=64,
                            window=64, titans=dict(chunk=16, expansion=2, persistent=8)),
                 data=dict(seq_len=256),
                 train=dict(batch_size=8, steps=300, lr=3e-3, warmup_steps=30, log_every=10,
                            eval_every=100, ckpt_every=100)),
    'small': dict(model=dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, segment_len=256,
                             window=256, titans=dict(chunk=16, expansion=4, persistent=32)),
                  data=dict(seq_len=2048),
                  train=dict(batch_size=32, steps=20000, lr=1e-3, warmup_steps=1000,
                             eval_every=1000, ckpt_every=1000)),
    # Paper 340M (NeurIPS Table 5): 24 blocks, 1024 wide, 16 heads, C = 512, N_p = 128,
    # b = 16, L_M = 2, train length 4K, 0.5M-token batches, lr 1.5e-3.
    '340m': dict(model=dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, segment_len=512,
                            window=2048, vocab_size=32000, dtype='bfloat16', remat='block',
                            titans=dict(chunk=16, depth=2, expansion=4, persistent=128)),
                 data=dict(seq_len=4096),
                 train=dict(batch_size=128, steps=30000, lr=1.5e-3, warmup_steps=1000,
                            eval_every=2000, ckpt_every=1000)),
}
# Paper 760M (NeurIPS Table 5): 24 blocks, 1536 wide, 16 heads, lr 1.25e-3, 30B tokens (60K
# steps of 0.5M); the rest as 340M.
PRESETS['760m'] = dict(model=dict(PRESETS['340m']['model'], d_model=1536),
                       data=PRESETS['340m']['data'],
                       train=dict(PRESETS['340m']['train'], lr=1.25e-3, steps=60000))
MIXER = 'titans_mac'


def get_config(arg=None, mixer=MIXER):
  config = apply_preset(get_base_config(), PRESETS, arg)
  config.model.mixer = mixer
  return config
