"""Titans MAL (memory as a layer): neural memory, then sliding-window attention over [persistent || x + memory].

  python train.py --config=configs/titans_mal.py:tiny --workdir=/tmp/mal
Presets as configs/titans_mac.py (tiny | small | 340m | 760m); model.window is the attention window,
model.segment_len the LM's segment scan (memory use constant in length).
"""
from configs import titans_mac


def get_config(arg=None):
  return titans_mac.get_config(arg, mixer='titans_mal')
