"""The subword stand-in (configs/standin.py): tokenizer built offline, model trained by
train.py, exported by export_hf.py, loaded by transformers' Auto classes with the same
logits; and the RULER suite under its tokenizer."""
import os

import numpy as np
import pytest

from data import build_tokenizer, ruler
from data.hf_tokenizer import get_tokenizer


pytestmark = pytest.mark.xdist_group('standin')    # one worker builds the fixture


@pytest.fixture(scope='module')
def standin(tmp_path_factory):
  """The tiny stand-in, built as configs/standin.py documents: tokenizer, train.py, export."""
  from configs.standin import get_config
  from training.config import resolve, validate
  from training.hf_export import export_checkpoint
  from training.loop import train
  tmp_path = tmp_path_factory.mktemp('standin')
  tok_dir = build_tokenizer.build(str(tmp_path / 'tok'), vocab_size=512, sources_=('pydoc',))
  cfg = get_config('tiny')
  cfg.data.tokenizer = f'hf:{tok_dir}'
  cfg.train.update(peak_flops=1e9, async_ckpt=False)
  cfg = resolve(cfg)
  validate(cfg, 1)
  metrics = train(cfg, str(tmp_path / 'lm'))
  assert np.isfinite(metrics['loss'])
  export_checkpoint(str(tmp_path / 'lm'), str(tmp_path / 'hf'))
  return tmp_path


@pytest.mark.hf
def test_tiny_standin_builds_exports_and_loads_in_transformers(standin):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from training.run import load_run
  tmp_path = standin
  assert os.path.isfile(tmp_path / 'hf' / 'tokenizer.json')
  hf_tok = AutoTokenizer.from_pretrained(tmp_path / 'hf')
  ours = get_tokenizer(f'hf:{tmp_path / "hf"}')
  text = 'The special magic number for cover-succeeded is: 1234567.'
  ids = ours.encode(text, bos=True)
  assert hf_tok(text)['input_ids'] == ids.tolist()            # BOS added by both
  assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
  hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  with torch.no_grad():
    theirs = hf_model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()[0]
  run = load_run(str(tmp_path / 'lm'))
  mine = np.asarray(run.model()(ids[None])[0][0])[:, :theirs.shape[-1]]
  np.testing.assert_allclose(mine, theirs, atol=2e-4 * np.abs(theirs).max())
  # the RULER suite speaks this tokenizer: lengths are counted in its tokens
  ex = ruler.example('niah_single_2', 1024, ours, seed=0)
  assert 0.9 * 1024 <= len(ex.prompt_ids) + ex.max_new_tokens <= 1024
  assert len(ex.text.encode()) > 1.5 * len(ex.prompt_ids)      # subword, not bytes


def test_byte_level_synthetic_tasks_refuse_a_subword_tokenizer(tmp_path):
  """data/synthetic.py writes byte ids: training on it with an hf: tokenizer is an error
  naming data.source (evaluate.py skips those tasks, pointing to ruler.tasks)."""
  from conftest import tiny_config
  from training.config import ConfigError, validate
  tok_dir = build_tokenizer.build(str(tmp_path), vocab_size=300, sources_=('pydoc',))
  cfg = tiny_config(**{'data.tokenizer': f'hf:{tok_dir}', 'model.vocab_size': 384,
                       'data.source': 'mix:stdlib+synthetic:passkey'})
  with pytest.raises(ConfigError, match=r"config.data.source: 'mix:stdlib\+synthetic:passkey': "
                     r'the synthetic tasks are written in byte ids'):
    validate(cfg, 1)
  cfg.data.source = 'stdlib'
  validate(cfg, 1)


def test_evolve_with_a_ruler_fitness_task_on_the_hf_base(standin):
  """evolve.py on the exported stand-in (hf:DIR) with RULER tasks as fitness: one
  generation; the task sets are teacher-forced RULER examples in the base's tokenizer."""
  from configs.namm import get_config
  from training.config import resolve, validate
  from training.evolve import evolve, ruler_examples
  tok = get_tokenizer(f'hf:{standin / "hf"}')
  sets = ruler_examples('niah_single_1', 3, 512, 0, 'train', f'hf:{standin / "hf"}')
  tokens, C = sets['tokens'], sets['context']
  ex = ruler.example('niah_single_1', 512, tok, 0, max_new_tokens=32)   # row 0: seed 0
  pad = C + 1 - len(ex.prompt_ids)
  assert tokens[0, :C + 1].tolist() == ([tok.BOS] + [int(tok.encode('\n')[0])] * pad +
                                        ex.prompt_ids[1:].tolist())
  answer, k = tok.encode(' ' + ex.references[0]), tokens.shape[1] - C - 1
  assert tokens[0, C + 1:].tolist() == answer[:k].tolist() and 1 <= k <= len(answer)
  held = ruler_examples('niah_single_1', 1, 512, 0, 'eval', f'hf:{standin / "hf"}')
  assert held['tokens'][0, -k:].tolist() != tokens[0, -k:].tolist()   # other seeds (>= 2M)
  cfg = get_config('tiny')
  cfg.namm.update_interval = 32
  cfg.evolve.update(dict(base=f'hf:{standin / "hf"}', population=4, strategy='sep_cma_es',
                         stages=('ruler:niah_single_1',), generations=(1,),
                         length=384, prompts=2, pool=2, eval_prompts=2, eval_every=1,
                         ckpt_every=1))
  cfg = resolve(cfg)
  validate(cfg, 1, check_mesh=False)
  st, metrics = evolve(cfg, str(standin / 'evo'))
  assert int(st['gen']) == 1 and set(st['ref']) == {'ruler:niah_single_1'}
  assert np.isfinite(metrics['best_fitness']) and 0 <= metrics['mean_cache'] <= 1


def test_continued_pretraining_with_each_method_then_ruler(standin):
  """The workflow on the tiny stand-in: train.py --config.train.init_from=hf:DIR with infini,
  anchor_ep, titans_mac and anchor_ac (the architecture and tokenizer come from DIR; AC adds
  the <AC> token past the tokenizer's 512 ids, its embedding from '.'), a few steps each;
  evaluate.py's RULER suite on a continued run through the decode path; the AC model exported
  back to HF with <AC> in its tokenizer."""
  from bench.common import train_command
  from training.evaluation import run
  from training.metrics import read_metrics
  hf = standin / 'hf'
  for name in ('infini', 'anchor_ep', 'titans_mac', 'anchor_ac'):
    w = standin / f'cont_{name}'
    source = 'ac:pydoc' if name == 'anchor_ac' else 'pydoc'
    train_command(f'python train.py --config=configs/{name}.py:tiny --workdir={w} '
                  f'--config.train.init_from=hf:{hf} --config.data.source={source} '
                  '--config.data.seq_len=128 --config.model.segment_len=64 '
                  '--config.train.batch_size=2 --config.train.steps=2 '
                  '--config.train.warmup_steps=1 --config.train.log_every=1 '
                  '--config.train.eval_every=2 --config.train.ckpt_every=2 '
                  '--config.data.eval_batches=1 --config.train.peak_flops=1e9 '
                  '--config.train.async_ckpt=False')
    assert np.isfinite(read_metrics(str(w))[2]['eval_loss']), name
  r = run(str(standin / 'cont_titans_mac'), overrides={
      'ruler.tasks': ('niah_single_1',), 'ruler.lengths': (512,), 'ruler.depths': (0.5,),
      'ruler.examples': 1, 'ruler.max_new_tokens': 8, 'eval.tasks': (), 'data.eval_batches': 1})
  (cell,) = r['ruler']
  assert cell['task'] == 'niah_single_1' and 0 <= cell['score'] <= 1
  assert r['config']['model']['mixer'] == 'titans_mac'
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from training.hf_export import export_checkpoint
  from training.run import load_run
  run = load_run(str(standin / 'cont_anchor_ac'))
  a, tok = run.cfg.model.anchor, get_tokenizer(f'hf:{hf}')
  assert (a.ac_id, run.cfg.model.vocab_size) == (512, 513) and tok.AC == 512
  assert a.ac_init_from == int(tok.encode('.')[0])
  assert tok.encode('One.<AC> Two.').tolist().count(512) == 1
  export_checkpoint(str(standin / 'cont_anchor_ac'), str(standin / 'hf_ac'))
  hf_tok = AutoTokenizer.from_pretrained(standin / 'hf_ac')
  assert hf_tok('One.<AC> Two.')['input_ids'][1:] == tok.encode('One.<AC> Two.').tolist()
  assert AutoModelForCausalLM.from_pretrained(standin / 'hf_ac').config.vocab_size == 513
