"""Sliding-window attention transformer, trained segment by segment (constant memory).

  python train.py --config=configs/sliding.py:tiny --workdir=/tmp/swa
"""
from configs.base import apply_preset, get_base_config
from configs.transformer import PRESETS


def get_config(arg=None):
  config = apply_preset(get_base_config(), PRESETS, arg)
  config.model.mixer = 'sliding'
  config.model.window = config.data.seq_len // 4
  config.model.segment_len = config.data.seq_len // 4
  return config
