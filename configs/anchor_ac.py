"""AnLLM-AC: AnSAN anchor attention with an <AC> token after every sentence end.

The data source gets the 'ac:' prefix (data/ac.py inserts "<AC>"; the byte tokenizer maps it
to id 259, an HF tokenizer to a new id one past its own, the model's vocabulary grown by that
row; export_hf.py adds "<AC>" to the exported tokenizer). Converting a trained model
(train.init_from, also hf:DIR) copies the embedding of model.anchor.ac_init_from ('.') into
<AC>'s, as the paper does:
  python train.py --config=configs/anchor_ac.py:tiny --workdir=runs/ac \\
      --config.train.init_from=runs/base
  python evaluate.py --workdir=runs/ac --config.decode.policy=anchor
Presets: tiny (CPU), small; sizes match configs/transformer.py's.
"""
from configs import anchor_ep
from configs.base import apply_preset, get_base_config

PRESETS = {name: dict(p, model=dict(p['model'], anchor=dict(mode='ac')),
                      data=dict(p['data'], source='ac:stdlib'))
           for name, p in anchor_ep.PRESETS.items()}


def get_config(arg=None):
  return apply_preset(get_base_config(), PRESETS, arg)
