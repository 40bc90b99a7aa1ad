"""The subword stand-in for a pretrained Llama: a Llama-style LM with a byte-level BPE
tokenizer, both trained here offline, exported to a Hugging Face directory. The benchmarks
use it wherever a paper starts from Llama (continued pretraining with a memory method, NAMM
on its cache, RULER).

  python -m data.build_tokenizer --out=runs/standin/tokenizer          # ~10 s
  python train.py --config=configs/standin.py:base --workdir=runs/standin/lm
  python export_hf.py --workdir=runs/standin/lm --out=runs/standin/hf
  # then, as with any Llama directory:
  python train.py --config=configs/infini.py:tiny --workdir=runs/inf \\
      --config.train.init_from=hf:runs/standin/hf

Presets: base (12.6M parameters: width 384, 4 layers, 6 heads / 2 KV heads, 8192 ids, untied
embeddings; 700 steps of 8 x 512 tokens of the stdlib corpus: 2.6-2.8 s a step on an idle
2-core CPU, about 35 minutes), tiny (seconds; the tests build it).
data.tokenizer is the directory the first command writes (relative to the working
directory).
Stage 2 (retrieval preset, after export of base): measured on 2026-12-04, the model learns
the answers' format but not the lookup: 0 / 100 on niah_single_1, niah_single_2,
niah_multikey_1 and vt at 512 tokens after 400, 600, 750 and 1,020 steps (4 examples each).
A base that retrieves needs more steps than this CPU budget (bench/workflow.py's page says
so while the base scores 0).
"""
from configs.base import apply_preset, get_base_config

PRESETS = {
    'base': dict(model=dict(d_model=384, n_layers=4, n_heads=6, n_kv_heads=2, mlp_dim=1024,
                            vocab_size=8192, tie_embeddings=False, scale_embeddings=False),
                 data=dict(tokenizer='hf:runs/standin/tokenizer', seq_len=512),
                 train=dict(batch_size=8, steps=700, lr=2e-3, warmup_steps=50,
                            log_every=10, eval_every=100, ckpt_every=50)),
    # Stage 2 (after base): the base continued on its corpus mixed with RULER-format
    # retrieval examples (training seeds; the loss on their answers), at the same length.
    'retrieval': dict(model=dict(d_model=384, n_layers=4, n_heads=6, n_kv_heads=2,
                                 mlp_dim=1024, vocab_size=8192, tie_embeddings=False,
                                 scale_embeddings=False),
                      data=dict(tokenizer='hf:runs/standin/tokenizer', seq_len=512, loss='answer',
                                source='mix:stdlib+ruler:niah_single_1,niah_single_2,'
                                       'niah_multikey_1,vt'),
                      train=dict(init_from='runs/standin/lm', batch_size=8, steps=400, lr=1e-3,
                                 warmup_steps=20, log_every=10, eval_every=100, ckpt_every=50)),
    'tiny': dict(model=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                            tie_embeddings=False, scale_embeddings=False),
                 data=dict(tokenizer='hf:runs/standin/tokenizer', seq_len=128),
                 train=dict(batch_size=8, steps=10, lr=3e-3, warmup_steps=2, log_every=5,
                            eval_every=10, ckpt_every=10)),
}


def get_config(arg=None):
  return apply_preset(get_base_config(), PRESETS, arg)
