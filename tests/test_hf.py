"""Hugging Face Llama import / export and tokenizers (models/hf_llama.py, data/hf_tokenizer.py).

Tests marked `hf` build tiny random Llamas with transformers on CPU PyTorch
(requirements-test.txt); .ci/run runs them with the rest.
"""
import glob
import json
import math
import os
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, cli_overrides, cpu_env, tiny_config
from data import pipeline
from data.hf_tokenizer import HFTokenizer, get_tokenizer
from models import decode, hf_llama
from training import mesh as meshlib
from training.config import ConfigError, validate
from training.init_from import load_source
from training.state import model_ctor

VOCAB = 300
CORPUS = os.path.join(sysconfig.get_paths()['stdlib'], 'json')   # 5 files, ~40 KB


# --- fixtures: a tokenizer and tiny Llamas written as transformers writes them -------------

@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory):
  """A byte-level BPE tokenizer.json (300 ids; <unk>, <s>, </s> = 0, 1, 2) trained here."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=['<unk>', '<s>', '</s>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train(sorted(glob.glob(os.path.join(CORPUS, '*.py'))), trainer)
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  tok.save(str(path))
  return str(path)


def make_llama(path, tokenizer_json=None, dtype='float32', shard_size=None, **config):
  """A random LlamaForCausalLM saved with save_pretrained (safetensors). Returns the model.

  initializer_range 0.2 (not 0.02) makes attention sharp, so RoPE and masks matter; the
  norm weights are random so a transposed scale would show.
  """
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2)
  model = LlamaForCausalLM(LlamaConfig(**{**base, **config})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.normal_(1.0, 0.3)
  model = model.to(getattr(torch, dtype))
  kwargs = dict(max_shard_size=shard_size) if shard_size else {}
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  if tokenizer_json:
    import shutil
    shutil.copy(tokenizer_json, os.path.join(path, 'tokenizer.json'))
  return model


def imported(hf_dir, **overrides):
  """(cfg, LM) built through the user path: resolve() with train.init_from=hf:DIR, then
  training/init_from.py load_source on this process's mesh."""
  cfg = tiny_config(**{'train.init_from': f'hf:{hf_dir}', 'data.tokenizer': 'byte', **overrides})
  validate(cfg, jax.device_count())
  mesh = meshlib.make_mesh(cfg)
  state = load_source(cfg, mesh)
  graphdef = nnx.graphdef(nnx.eval_shape(model_ctor(cfg)))
  return cfg, nnx.merge(graphdef, state)


def torch_logits(model, tokens_BxT):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens_BxT))).logits.float().numpy()


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 48))

CASES = {
    'llama2_tied': dict(tie_word_embeddings=True),
    'gqa_sharded': dict(num_key_value_heads=2, shard_size='40KB', rope_theta=10000.0),
    'llama3_rope': dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    'linear_rope': dict(num_key_value_heads=2, rope_scaling=dict(rope_type='linear', factor=4.0)),
}


# --- import ----------------------------------------------------------------------------------

@pytest.mark.hf
@pytest.mark.parametrize('case', sorted(CASES))
def test_imported_logits_match_transformers(case, tmp_path):
  config = dict(CASES[case])
  shard = config.pop('shard_size', None)
  ref = make_llama(tmp_path, shard_size=shard, **config)
  if shard:
    assert os.path.isfile(tmp_path / 'model.safetensors.index.json')
  cfg, model = imported(tmp_path)
  m = cfg.model
  assert (m.d_model, m.n_heads, m.n_kv_heads, m.mlp_dim, m.vocab_size) == (
      64, 4, config.get('num_key_value_heads', 4), 96, VOCAB)
  assert m.tie_embeddings == (case == 'llama2_tied') and not m.scale_embeddings
  ours = np.asarray(model(jnp.asarray(TOKENS))[0])
  want = torch_logits(ref, TOKENS)
  assert ours.shape == want.shape
  np.testing.assert_allclose(ours, want, atol=2e-4 * np.abs(want).max(), rtol=0)
  # The padded vocab rows are zero (so they never win an argmax nor get gradient from init).
  assert not np.asarray(model.embed[...][VOCAB:]).any()
  if 'rope_scaling' in config:   # the scaling is real: without it the logits differ
    with cfg.unlocked():
      cfg.model.rope_scaling.type = 'none'
    plain = nnx.merge(nnx.graphdef(nnx.eval_shape(model_ctor(cfg))), nnx.state(model))
    assert np.abs(np.asarray(plain(jnp.asarray(TOKENS))[0]) - want).max() > 1e-2


@pytest.mark.hf
def test_hf_model_gives_a_frozen_base_without_a_run(tmp_path, tokenizer_json):
  from training.evolve import load_base
  ref = make_llama(tmp_path, tokenizer_json, num_key_value_heads=2)
  base = load_base(f'hf:{tmp_path}')
  graphdef, state, cfg = base.graphdef, base.state, base.cfg
  assert cfg.data.tokenizer == f'hf:{tmp_path}' and cfg.model.mixer == 'attention'
  want = torch_logits(ref, TOKENS)
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, state)(jnp.asarray(TOKENS))[0]),
                             want, atol=2e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.hf
def test_bf16_checkpoint_imports_exactly_and_exports_bit_exact(tmp_path):
  ref = make_llama(tmp_path / 'src', dtype='bfloat16', num_key_value_heads=2)
  cfg, model = imported(tmp_path / 'src')
  want = ref.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()        # [K*H, D]
  got = np.asarray(model.blocks[1].mixer.wk[...])                            # [D, K, H]
  assert np.array_equal(got.reshape(64, -1).T, want)
  params = {hf_llama.param_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
  hf_llama.export_hf(params, cfg.model, tmp_path / 'out', dtype='bfloat16')
  assert_same_tensors(tmp_path / 'src', tmp_path / 'out')


def assert_same_tensors(a_dir, b_dir):
  """Every tensor of the two checkpoint dirs: same names, dtypes, shapes and bytes."""
  a, b = hf_llama.Checkpoint(str(a_dir)), hf_llama.Checkpoint(str(b_dir))
  assert sorted(a.tensors) == sorted(b.tensors)
  for name in a.tensors:
    x, y = np.asarray(a.tensor(name)), np.asarray(b.tensor(name))
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert x.tobytes() == y.tobytes(), name


@pytest.mark.hf
def test_export_round_trips_bit_exactly_and_loads_in_transformers(tmp_path):
  from transformers import LlamaForCausalLM
  ref = make_llama(tmp_path / 'src', shard_size='40KB',
                   **{**CASES['llama3_rope'], 'num_key_value_heads': 2})
  cfg, model = imported(tmp_path / 'src')
  params = {hf_llama.param_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
  base = hf_llama.read_config(str(tmp_path / 'src'))
  hf_llama.export_hf(params, cfg.model, tmp_path / 'out', base_config=base,
                     max_shard_bytes=60_000)                      # several shards + index
  assert os.path.isfile(tmp_path / 'out' / 'model.safetensors.index.json')
  assert_same_tensors(tmp_path / 'src', tmp_path / 'out')
  back = LlamaForCausalLM.from_pretrained(tmp_path / 'out').eval()
  assert np.array_equal(torch_logits(back, TOKENS), torch_logits(ref, TOKENS))
  # and our own config derivation reads the exported config.json the same way
  assert hf_llama.model_config(str(tmp_path / 'out')) == hf_llama.model_config(
      str(tmp_path / 'src'))


# --- reading slices (no torch) -----------------------------------------------------------------

def test_every_shard_slice_equals_the_slice_of_the_whole(tmp_path):
  cfg = tiny_config(**{'model.vocab_size': VOCAB, 'model.tie_embeddings': False,
                       'model.scale_embeddings': False, 'model.d_model': 32,
                       'model.n_heads': 4, 'model.n_kv_heads': 2, 'model.mlp_dim': 48})
  m = cfg.model
  model = nnx.eval_shape(model_ctor(cfg))
  rng = np.random.RandomState(1)
  shapes = {hf_llama.param_name(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
  params = {n: rng.randn(*s).astype(np.float32) for n, s in shapes.items()}
  for n in ('embed', 'head'):            # padded vocab entries are dropped on export
    params[n][(slice(VOCAB, None),) if n == 'embed' else (slice(None), slice(VOCAB, None))] = 0
  hf_llama.export_hf(params, m, tmp_path)
  ckpt = hf_llama.Checkpoint(str(tmp_path))
  for name, shape in shapes.items():
    whole = ckpt.read(name, shape, tuple(slice(None) for _ in shape), m)
    assert np.array_equal(whole, params[name]), name
    for _ in range(4):                   # random blocks, as a sharding would ask for
      index = []
      for n in shape:
        a = rng.randint(0, n)
        index.append(slice(a, rng.randint(a + 1, n + 1)))
      assert np.array_equal(ckpt.read(name, shape, tuple(index), m), whole[tuple(index)]), name


def test_unsupported_checkpoints_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match='train.init_from.*no config.json'):
    tiny_config(**{'train.init_from': f'hf:{tmp_path}'})
  config = dict(model_type='llama', hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
                rope_scaling=dict(rope_type='yarn', factor=4.0))
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="train.init_from.*'yarn'"):
    tiny_config(**{'train.init_from': f'hf:{tmp_path}'})
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'rope_scaling': None}))
  with pytest.raises(ConfigError, match='train.init_from.*no \\*.safetensors'):
    imported(tmp_path)


# --- tokenizers -----------------------------------------------------------------------------------

TEXT = 'def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ünïcode ok\n'


def test_hf_tokenizer_json_round_trip_and_special_ids(tokenizer_json, tmp_path):
  os.symlink(tokenizer_json, tmp_path / 'tokenizer.json')
  (tmp_path / 'config.json').write_text(json.dumps(dict(bos_token_id=1, eos_token_id=[2, 0])))
  tok = HFTokenizer(str(tmp_path))
  assert (tok.vocab_size, tok.BOS, tok.EOS, tok.PAD) == (VOCAB, 1, 2, -1)
  ids = tok.encode(TEXT, bos=True, eos=True)
  assert ids.dtype == np.int32 and ids[0] == 1 and ids[-1] == 2 and len(ids) < len(TEXT)
  assert tok.decode(ids) == TEXT


def test_sentencepiece_tokenizer_model(tmp_path):
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      input=os.path.join(CORPUS, 'decoder.py'), model_prefix=str(tmp_path / 'tokenizer'),
      vocab_size=200, model_type='bpe', bos_id=1, eos_id=2, unk_id=0,
      pad_id=3, minloglevel=2)
  tok = get_tokenizer(f'hf:{tmp_path}')
  assert (tok.vocab_size, tok.BOS, tok.EOS, tok.PAD) == (200, 1, 2, 3)
  text = 'return self.scan_once(s, idx)'
  ids = tok.encode(text, bos=True)
  assert ids[0] == 1 and tok.decode(ids) == text


def test_token_stream_keeps_ids_above_65535(tmp_path):
  """Llama 3 has 128256 ids: the stream must not be uint16."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'w{i}': 70000 + i for i in range(10)}}
  vocab.update({f'pad{i}': i for i in range(3, 70000)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'config.json').write_text(json.dumps(dict(bos_token_id=1, eos_token_id=2)))
  (tmp_path / 'doc.txt').write_text(' '.join(f'w{i % 10}' for i in range(50)))
  stream = pipeline.token_stream(f'glob:{tmp_path}/*.txt', 'train', None, f'hf:{tmp_path}')
  assert stream.dtype == np.int32 and stream.max() == 70009
  assert list(stream[:4]) == [1, 70000, 70001, 70002] and stream[-1] == 2


# --- train.py / evaluate.py end to end ---------------------------------------------------------

@pytest.mark.hf
def test_continued_pretraining_8_devices_fsdp_then_evaluate(tmp_path, tokenizer_json):
  """train.py imports the Llama sharded over fsdp=8 (step 1's loss is the transformers
  model's loss on the same batch), trains, and evaluate.py reports the same held-out loss
  as the run's last evaluation, decoding a sample with the imported tokenizer."""
  import torch
  hf_dir = tmp_path / 'llama'
  ref = make_llama(hf_dir, tokenizer_json, num_key_value_heads=2)
  cfg = tiny_config(**{'train.steps': 4, 'train.eval_every': 4, 'train.ckpt_every': 4,
                       'train.lr': 1e-3, 'data.source': f'glob:{CORPUS}/*.py',
                       'train.init_from': f'hf:{hf_dir}'})     # model.* from config.json
  workdir = tmp_path / 'run'
  env = cpu_env(8)
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         f'--config={ROOT}/configs/llama.py:{hf_dir}', f'--workdir={workdir}',
         *cli_overrides(cfg), '--config.mesh.data=1', '--config.mesh.fsdp=8']
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "'fsdp': 8" in proc.stderr
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['d_model'] == 64 and saved['data']['tokenizer'] == f'hf:{hf_dir}'
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  loss = {r['step']: r for r in rows}
  # Step 1's loss: the imported weights on the first batch the pipeline gives.
  batch = next(pipeline.make_train_iterator(
      f'glob:{CORPUS}/*.py', 'train', 64, 8, 0, tokenizer=f'hf:{hf_dir}'))['tokens']
  with torch.no_grad():
    logits = ref(torch.tensor(batch[:, :-1]).long()).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                             torch.tensor(batch[:, 1:]).long().reshape(-1)).item()
  assert loss[1]['loss'] == pytest.approx(want, rel=1e-4)
  assert loss[4]['loss'] < loss[1]['loss']

  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'evaluate.py'), f'--workdir={workdir}',
       '--sample=def ', '--config.decode.temperature=0.8', '--config.decode.top_p=0.9',
       '--config.decode.max_new_tokens=8', '--config.eval.lengths=(128,)',
       '--config.eval.examples=2', '--config.eval.tasks=("passkey",)'],
      env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads((workdir / 'eval' / 'eval_step4.json').read_text())
  assert report['loss']['loss'] == pytest.approx(loss[4]['eval_loss'], rel=1e-4)
  assert report['loss']['perplexity'] == pytest.approx(math.exp(report['loss']['loss']))
  assert 'perplexity' in out.stdout
  assert isinstance(report['sample']['continuation'], str)

  # export_hf.py's path: the trained checkpoint -> a directory transformers loads, with the
  # tokenizer beside it, computing the same logits as the restored mnemax model.
  from transformers import LlamaForCausalLM
  from training import evaluation
  from training.hf_export import export_checkpoint
  assert export_checkpoint(workdir, tmp_path / 'exported') == 4
  assert os.path.isfile(tmp_path / 'exported' / 'tokenizer.json')
  ev, _ = evaluation.load(workdir)
  ours = np.asarray(nnx.merge(ev.graphdef, ev.state)(jnp.asarray(TOKENS))[0])
  theirs = torch_logits(LlamaForCausalLM.from_pretrained(tmp_path / 'exported').eval(), TOKENS)
  np.testing.assert_allclose(ours, theirs, atol=2e-4 * np.abs(theirs).max(), rtol=0)
  assert np.abs(theirs - torch_logits(ref, TOKENS)).max() > 1e-3      # it did train


def test_sampling_with_top_p_keeps_the_nucleus():
  """decode.sample with temperature / top_p: only tokens inside the nucleus are drawn."""
  logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  drawn = np.asarray(decode.sample(logits_BxV, keys, temperature=1.0, top_p=0.7))
  assert set(drawn.tolist()) == {0, 1}
  drawn = np.asarray(decode.sample(logits_BxV, keys, temperature=1.0, top_p=1.0))
  assert set(drawn.tolist()) == {0, 1, 2, 3}
