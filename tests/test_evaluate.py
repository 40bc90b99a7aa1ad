"""evaluate.py / training/evaluation.py on a tiny model trained once in-process (CPU)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, cpu_env
from configs.transformer import get_config
from data import synthetic
from flax import nnx
from models.eviction import KeepAll
from training import evaluation
from training.checkpoint import CheckpointError
from training.config import ConfigError, resolve
from training.step import token_nll

# Every test reads the module's one trained run: one test worker runs them all.
pytestmark = pytest.mark.xdist_group('evaluate_run')
SEQ_LEN = 64


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from training.loop import train
  cfg = get_config('tiny')
  cfg.model.update(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2)
  cfg.data.update(seq_len=SEQ_LEN, eval_batches=2)
  cfg.train.update(batch_size=8, steps=6, ckpt_every=3, eval_every=3, log_every=3,
                   peak_flops=1e9, async_ckpt=False)
  cfg.eval.update(tasks=('passkey', 'mqar'), lengths=(96,), depths=(0.25, 0.75), examples=4,
                  buckets=4)
  cfg.decode.max_new_tokens = 8
  path = str(tmp_path_factory.mktemp('run'))
  train(resolve(cfg), path)
  return path


@pytest.fixture(scope='module')
def report(workdir, tmp_path_factory):
  return evaluation.run(workdir, output=str(tmp_path_factory.mktemp('eval')), sample='x = ')


@pytest.fixture(scope='module')
def evaluator(workdir):
  return evaluation.load(workdir)[0]


def test_report_json_and_png(report):
  with open(report['json']) as f:
    saved = json.load(f)
  for key in ('step', 'loss', 'tasks', 'kv_cache', 'config', 'sample'):
    assert key in saved, key
  assert saved['step'] == 6
  assert os.path.getsize(report['png']) > 1000
  assert isinstance(report['sample']['continuation'], str)
  text = evaluation.format_report(report)
  assert 'held-out loss' in text and 'passkey' in text


def test_loss_matches_direct_token_nll(evaluator, report):
  model = nnx.merge(evaluator.graphdef, evaluator.state)
  total, count = 0.0, 0
  for tokens, weights in evaluator.eval_batches():
    assert (weights == 1).all()                                  # data.loss='all'
    nll, mask = token_nll(model, jax.numpy.asarray(tokens))
    total += float((nll * mask).sum())
    count += int(mask.sum())
  loss = report['loss']
  assert np.isfinite(loss['loss'])
  assert abs(loss['loss'] - total / count) < 1e-4
  assert abs(loss['perplexity'] - np.exp(loss['loss'])) < 1e-3
  assert [(b['start'], b['end']) for b in loss['buckets']] == [(0, 16), (16, 32), (32, 48),
                                                               (48, 64)]
  assert abs(np.mean([b['loss'] for b in loss['buckets']]) - loss['loss']) < 1e-4  # no PAD


def test_answer_loss_config_scores_only_the_answers(workdir):
  """data.loss=answer: the held-out loss is the mean nll of the answer tokens alone."""
  ev, _ = evaluation.load(workdir, overrides={'data.source': 'synthetic:kv', 'data.loss': 'answer'})
  model = nnx.merge(ev.graphdef, ev.state)
  total, count = 0.0, 0
  for tokens, weights in ev.eval_batches():
    nll, mask = token_nll(model, jax.numpy.asarray(tokens))
    total += float((nll * mask * weights).sum())
    count += int(weights.sum())
  loss = ev.loss()
  assert count == ev.cfg.train.batch_size * ev.cfg.data.eval_batches    # one answer token each
  assert loss['tokens'] == count and abs(loss['loss'] - total / count) < 1e-4


def test_task_cells(report):
  cells = [(c['task'], c['length'], c['depth']) for c in report['tasks']]
  assert cells == [('passkey', 96, 0.25), ('passkey', 96, 0.75), ('mqar', 96, None)]
  passkey = [c for c in report['tasks'] if c['task'] == 'passkey']
  assert all(0.0 <= c['accuracy'] <= 1.0 and c['examples'] == 4 for c in passkey)
  mqar = report['tasks'][-1]                   # 96 tokens cannot hold the MQAR prompt
  assert mqar['accuracy'] is None and 'too short' in mqar['skipped']


def test_cache_full_without_eviction(report):
  kv = report['kv_cache']
  assert kv['tokens_per_layer'] == SEQ_LEN and kv['capacity'] == SEQ_LEN
  # 1 layer x 2 kv heads x head_dim 16 x (k, v) x fp32
  assert kv['bytes_per_sequence'] == SEQ_LEN * 2 * 16 * 2 * 4


def test_decode_path_keep_all_matches_teacher_forcing(evaluator):
  batch = synthetic.make_task_batch('passkey', 4, 96, 0.5)
  tokens, prompt_len, mask = batch['tokens_BxL'], batch['prompt_len_B'], batch['answer_mask_BxL']
  forced = evaluator.predictions(tokens, prompt_len, None)
  decoded = evaluator.predictions(tokens, prompt_len, KeepAll())
  assert (decoded[:, prompt_len.min() - 1:] >= 0).all()
  np.testing.assert_array_equal(decoded[mask[:, :-1]], forced[mask[:, :-1]])


def test_recency_policy(workdir, tmp_path):
  r = evaluation.run(workdir, output=str(tmp_path),
                     overrides={'decode.policy': 'recency', 'decode.window': 16,
                                'decode.capacity': 32})
  assert r['task_path'] == 'decode'
  assert r['kv_cache']['tokens_per_layer'] == 16 and r['kv_cache']['capacity'] == 32
  assert all(0.0 <= c['accuracy'] <= 1.0 for c in r['tasks'] if c['accuracy'] is not None)
  keep_all = evaluation.run(workdir, output=str(tmp_path), overrides={'decode.policy': 'keep_all'})
  assert keep_all['kv_cache']['tokens_per_layer'] == SEQ_LEN


def test_config_errors(workdir, tmp_path):
  with pytest.raises(CheckpointError, match=str(tmp_path)):
    evaluation.run(str(tmp_path))
  with pytest.raises(CheckpointError, match='no step 4 '):
    evaluation.run(workdir, step=4)
  with pytest.raises(ConfigError, match='model.d_model'):
    evaluation.run(workdir, overrides={'model.d_model': 128})
  with pytest.raises(ConfigError, match='decode.policy'):
    evaluation.run(workdir, overrides={'decode.policy': 'lru'})


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), *args], cwd=ROOT,
                        env=cpu_env(), capture_output=True, text=True, timeout=120)


def _text_file(path, n_bytes):
  path.write_text(''.join(chr(ord('a') + i % 26) + ' ' * (i % 7 == 0) for i in range(n_bytes)))
  return path


def _windows(paths):
  """Windows of SEQ_LEN + 1 byte tokens in the files' stream (BOS text EOS per file)."""
  return sum(len(p.read_bytes()) + 2 for p in paths) // (SEQ_LEN + 1)


def test_whole_source_and_single_file(workdir, tmp_path):
  """eval.split=all with data.eval_batches=0 scores every window of every file once (the
  hash split would hold out one of these two files; a single file has no 'eval' split)."""
  files = [_text_file(tmp_path / f'{name}.txt', 1000) for name in ('a', 'b')]
  whole = {'eval.split': 'all', 'data.eval_batches': 0}
  r = evaluation.run(workdir, output=str(tmp_path), overrides={
      **whole, 'data.source': f'glob:{tmp_path}/*.txt'})
  assert r['loss']['tokens'] == _windows(files) * SEQ_LEN == 35 * SEQ_LEN   # 2 x (1143 + 2) // 65
  r = evaluation.run(workdir, output=str(tmp_path), overrides={
      **whole, 'data.source': f'glob:{files[0]}'})
  assert r['loss']['tokens'] == _windows(files[:1]) * SEQ_LEN
  with pytest.raises(ValueError, match=r"has no files in split 'eval' .*--source"):
    evaluation.run(workdir, overrides={'data.source': f'glob:{files[0]}'})


def test_cli_end_to_end(workdir, tmp_path):
  """evaluate.py with decode overrides, --sample, and --source: one file scored whole."""
  book = _text_file(tmp_path / 'book.txt', 2000)
  out = _cli(f'--workdir={workdir}', f'--output={tmp_path}', '--step=3',
             '--config.decode.policy=recency', '--config.decode.window=16',
             '--config.decode.capacity=32', '--sample=def ', f'--source=glob:{book}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'held-out loss' in out.stdout and 'sample:' in out.stdout
  with open(tmp_path / 'eval_step3.json') as f:
    r = json.load(f)
  assert r['decode_policy'] == 'recency' and r['kv_cache']['tokens_per_layer'] == 16
  assert r['data'] == dict(source=f'glob:{book}', split='all')
  assert r['loss']['tokens'] == _windows([book]) * SEQ_LEN
  assert (tmp_path / 'tasks_step3.png').exists()
  out = _cli(f'--workdir={workdir}', f'--output={tmp_path}', f'--source=glob:{tmp_path}/no/*.txt')
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: data.source: glob '{tmp_path}/no/*.txt' matched no files")



def test_ruler_suite_through_the_decode_path(workdir, tmp_path):
  """ruler.tasks: each (task, length, depth) cell generates greedily after a prefill under the
  decode policy and scores RULER's metric; a length too short for a task is skipped, saying
  why; a table, the JSON and a heatmap."""
  r = evaluation.run(workdir, output=str(tmp_path), overrides={
      'ruler.tasks': ('niah_single_1', 'vt', 'cwe'), 'ruler.lengths': (768,),
      'ruler.depths': (0.25, 0.75), 'ruler.examples': 2, 'ruler.max_new_tokens': 12,
      'decode.policy': 'recency', 'decode.window': 512, 'decode.capacity': 600})
  cells = {(c['task'], c['depth']): c for c in r['ruler']}
  assert set(cells) == {(t, d) for t in ('niah_single_1', 'vt', 'cwe') for d in (0.25, 0.75)}
  for task in ('niah_single_1', 'vt'):
    for depth in (0.25, 0.75):
      c = cells[(task, depth)]
      assert 0 <= c['score'] <= 100 and c['examples'] == 2
      assert c['prompt_tokens'] + 12 <= 768 and c['first']['references']
  assert cells[('cwe', 0.25)]['score'] is None
  assert 'too short' in cells[('cwe', 0.25)]['skipped']
  assert set(r['ruler_summary']) == {'niah_single_1', 'vt', 'average'}
  text = evaluation.format_report(r)
  assert 'RULER task' in text and 'skipped cwe at length 768' in text
  assert os.path.getsize(r['ruler_png']) > 1000
  with open(r['json']) as f:
    assert json.load(f)['ruler_summary']['average']['768'] == r['ruler_summary']['average'][768]
