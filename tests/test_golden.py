"""Golden numbers pinned before the seams were redesigned (issue 28): the tiny default's
training losses and every mixer's / policy's decode outputs must not move.

The goldens were computed by commit 73911e8's code (before the redesign) under this suite's
XLA flags (tests/conftest.py). `python tests/test_golden.py --record` rewrites them from the
current code: only for a change of numbers that is meant.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cpu_env

GOLDEN = os.path.join(ROOT, 'tests', 'golden')
# (config file, decode policy keys[, prompt]): each mixer with the policies that act on it.
# L2 reads key norms, and RoPE preserves norms: a repeated token's keys tie exactly in layer 0,
# broken by rounding only (the decode flipped with the run's compilation). So its prompt has 64
# distinct tokens (norm gaps >= 2e-4) and the 24 generated ones (one token repeated) stay in the
# recent window (its golden, too, was computed by 73911e8's code).
DECODE_CASES = {
    'attention': ('transformer', {}),
    'attention_keep_all': ('transformer', {'policy': 'keep_all'}),
    'attention_recency': ('transformer', {'policy': 'recency', 'window': 16}),
    'attention_h2o': ('transformer', {'policy': 'h2o', 'budget': 24, 'recent': 4}),
    'attention_l2': ('transformer', {'policy': 'l2', 'budget': 40, 'recent': 24}, 'distinct'),
    'attention_namm': ('transformer', {'policy': 'namm', 'prefill_chunk': 16}),
    'sliding': ('sliding', {}),
    'titans_mac': ('titans_mac', {}),
    'titans_mag': ('titans_mag', {}),
    'titans_mal': ('titans_mal', {}),
    'titans_lmm': ('titans_lmm', {}),
    'infini': ('infini', {}),
    'anchor': ('anchor_ep', {}),
    'anchor_pruned': ('anchor_ep', {'policy': 'anchor'}),
}
PROMPT, NEW = 64, 24
TEXT = b'def f(x):\n  return x + 1.\nclass A.\n  pass. ' * 4


def prompt_tokens(kind='text'):
  """[1, PROMPT] int32: code-like text (anchors, repeats) or 64 distinct byte ids."""
  if kind == 'distinct':
    return np.random.default_rng(0).permutation(256)[None, :PROMPT].astype(np.int32)
  return np.frombuffer(TEXT, np.uint8)[None, :PROMPT].astype(np.int32)


def decode_outputs(name):
  """Greedy continuation (tokens) and its final logits of a seed-0 tiny model of the case."""
  import importlib
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import models
  from models import decode
  from training.config import resolve
  from training.policy import make_policy
  file, dec, *prompt_kind = DECODE_CASES[name]
  cfg = resolve(importlib.import_module(f'configs.{file}').get_config('tiny'))
  cfg.model.d_model, cfg.model.head_dim, cfg.model.mlp_dim = 64, 0, 0
  cfg = resolve(cfg)
  cfg.namm.update_interval = 16
  cfg.decode.update(dec)
  policy = make_policy(cfg)
  model = models.build(cfg.model, rngs=nnx.Rngs(0))
  prompt = jnp.asarray(prompt_tokens(*prompt_kind))
  tokens, state = decode.generate(model, prompt, jax.random.key(0), n_new=NEW, policy=policy,
                                  prefill_chunk=cfg.decode.prefill_chunk)
  logits, _ = model(tokens[:, -1:], state, jnp.full((1, 1), PROMPT + NEW, jnp.int32),
                    policy=policy)
  return dict(tokens=np.asarray(tokens[0, PROMPT:]).tolist(),
              logits=np.asarray(logits[0, 0], np.float64).tolist())


def train_losses(workdir):
  """Loss at every logged step (10..300) and the eval losses of the tiny default, xla
  attention (the backend of the recording)."""
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         f'--config={os.path.join(ROOT, "configs/transformer.py")}:tiny', f'--workdir={workdir}',
         '--config.model.attention_impl=xla']
  subprocess.run(cmd, env=cpu_env(), cwd=ROOT, check=True, capture_output=True, timeout=600)
  from training.metrics import read_metrics
  rows = read_metrics(workdir)
  return {key: {str(s): r[key] for s, r in sorted(rows.items()) if key in r}
          for key in ('loss', 'eval_loss')}


def _golden(name):
  with open(os.path.join(GOLDEN, name)) as f:
    return json.load(f)


@pytest.mark.parametrize('name', sorted(DECODE_CASES))
def test_decode_outputs_unchanged(name):
  want, got = _golden('decode.json')[name], decode_outputs(name)
  assert got['tokens'] == want['tokens']
  np.testing.assert_allclose(got['logits'], want['logits'], atol=1e-5, rtol=0)


def test_tiny_default_losses_unchanged(tmp_path):
  """The README's run (train.py, tiny preset): its losses as recorded, well below the
  unigram baseline it logs first; its config.json and TensorBoard events written."""
  from data import pipeline
  from training.metrics import read_metrics
  want, got = _golden('train_tiny.json'), train_losses(str(tmp_path / 'run'))
  for key in want:
    assert sorted(got[key], key=int) == sorted(want[key], key=int), key
    diff = max(abs(got[key][s] - want[key][s]) for s in want[key])
    assert diff <= 1e-6, (key, diff)
  unigram = pipeline.unigram_entropy('stdlib')
  assert read_metrics(tmp_path / 'run')[0]['unigram_loss'] == pytest.approx(unigram)
  assert got['eval_loss']['300'] < 0.6 * unigram, (got['eval_loss'], unigram)
  assert (tmp_path / 'run' / 'tb').is_dir() and (tmp_path / 'run' / 'config.json').is_file()


if __name__ == '__main__' and sys.argv[1:] == ['--record']:
  import tempfile
  os.environ.update(cpu_env())
  os.makedirs(GOLDEN, exist_ok=True)
  with open(os.path.join(GOLDEN, 'decode.json'), 'w') as f:
    json.dump({n: decode_outputs(n) for n in sorted(DECODE_CASES)}, f)
  with open(os.path.join(GOLDEN, 'train_tiny.json'), 'w') as f:
    json.dump(train_losses(os.path.join(tempfile.mkdtemp(), 'run')), f, indent=1)
