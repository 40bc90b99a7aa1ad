"""AnLLM-EP: AnSAN anchor attention, existing end-of-sentence tokens as anchors.

Continued pretraining of a trained full-attention model under the anchor mask (the paper
continues Llama2-7B), same model sizes as configs/transformer.py's presets:
  python train.py --config=configs/transformer.py:tiny --workdir=runs/base
  python train.py --config=configs/anchor_ep.py:tiny --workdir=runs/ep \\
      --config.train.init_from=runs/base
  python evaluate.py --workdir=runs/ep --config.decode.policy=anchor   # pruned KV cache
Anchors: model.anchor.ep_ids (default '.' and '\\n' bytes). Presets: tiny (CPU), small.
"""
from configs.base import apply_preset, get_base_config

PRESETS = {
    # 20% of transformer.py:tiny's 300 steps, at a lower learning rate.
    'tiny': dict(model=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mixer='anchor'),
                 data=dict(seq_len=128),
                 train=dict(batch_size=16, steps=60, lr=1e-3, warmup_steps=5, log_every=10,
                            eval_every=30, ckpt_every=30)),
    'small': dict(model=dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, mixer='anchor'),
                  data=dict(seq_len=1024),
                  train=dict(batch_size=32, steps=3000, lr=3e-4, warmup_steps=50,
                             eval_every=500, ckpt_every=500)),
}


def get_config(arg=None):
  return apply_preset(get_base_config(), PRESETS, arg)
