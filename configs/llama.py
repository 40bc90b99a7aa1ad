"""Continued pretraining of a Hugging Face Llama-family model directory (config.json +
*.safetensors + tokenizer.json or tokenizer.model), e.g. Llama 2/3, Mistral-style GQA.

  python train.py --config=configs/llama.py:/path/to/Llama-3.2-1B --workdir=/tmp/llama
  python train.py --config=configs/llama.py:/path/to/dir --workdir=W --config.model.mixer=infini \
      --config.model.segment_len=512

The argument is the directory: the config sets train.init_from=hf:DIR, and training/config.py
`resolve` fills every architecture key (sizes, vocab, RoPE theta and scaling, norm eps, tied
embeddings) from DIR/config.json; data.tokenizer 'auto' uses DIR's tokenizer. Any other config
file works the same way with `--config.train.init_from=hf:DIR` (e.g. configs/infini.py:small).
The training values below are continued-pretraining defaults (small lr, short warmup).
"""
from configs.base import get_base_config


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/llama.py needs the model directory: --config=configs/llama.py:DIR')
  c = get_base_config()
  c.train.init_from = f'hf:{arg}'
  c.model.dtype = 'bfloat16'
  c.data.seq_len = 2048
  c.train.update(dict(batch_size=16, steps=1000, lr=3e-5, warmup_steps=50, min_lr_ratio=0.1,
                      weight_decay=0.0, eval_every=200, ckpt_every=200))
  return c
