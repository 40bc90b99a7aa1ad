"""Titans LMM: the neural memory alone as the sequence mixer (no attention).

  python train.py --config=configs/titans_lmm.py:tiny --workdir=/tmp/lmm
Presets as configs/titans_mac.py (tiny | small | 340m | 760m); model.window is the attention window,
model.segment_len the LM's segment scan (memory use constant in length).
"""
from configs import titans_mac


def get_config(arg=None):
  return titans_mac.get_config(arg, mixer='titans_lmm')
