"""bench/compression.py (kvpress's protocol): the question marked in every task's prompt, the
query-agnostic scorer, the stratified paired bootstrap, and a tiny run end to end."""
import json

import jax
import numpy as np
from flax import nnx

from bench import compression, compression_page
from training import evolve as evo


def test_task_examples_mark_their_question():
  """task_examples' Q: the prompt's last Q tokens hold its question ('?K' for kv; the newline,
  question and answer prefix for RULER), the rest is context."""
  from data.tokenizer import ByteTokenizer
  s = evo.task_examples('kv4', 8, 96, 0, 'eval')
  C, Q = s['context'], s['question']
  assert Q == 2 and (s['tokens'][:, C + 1 - Q] == ord('?')).all()
  s = evo.task_examples('ruler:niah_single_1', 3, 512, 0, 'eval')
  C, Q = s['context'], s['question']
  heads = []
  for row in s['tokens']:             # Q: the longest question of the set (left-padded)
    question = ByteTokenizer().decode(row[C + 1 - Q:C + 1])
    assert '\nWhat is the special magic number' in question and question.endswith(' is')
    assert 'What is' not in ByteTokenizer().decode(row[:C + 1 - Q])
    heads.append(question.startswith('\nWhat'))
  assert any(heads)


def test_query_agnostic_scoring_equals_the_visible_question_with_the_full_cache():
  """With nothing evicted, reading the question after the compression point changes nothing;
  with a budget, the policy decides before the question (TOVA: on the last context query)."""
  from conftest import tiny_config
  from models import presses
  from models.eviction import KeepAll
  from models.lm import LM
  model = LM(tiny_config().model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  s = evo.task_examples('kv', 6, 64, 0, 'eval')
  tokens = {'kv': s['tokens']}
  scores = {}
  for q in (0, s['question']):
    run = jax.jit(evo.make_scorer(graphdef, {'kv': s['context']}, 0, {'kv': q}))
    scores[q] = run(state, KeepAll(), tokens)[0]['kv']
    frac = run(state, presses.TOVA(8), tokens)[1]
    assert np.allclose(frac * (s['context'] + 1 - q if q else s['context']), 8)
  np.testing.assert_array_equal(scores[0], scores[s['question']])


def test_bootstrap_is_stratified_and_paired_and_namm_runs_are_labelled():
  rng = np.random.default_rng(0)
  a = {'x': rng.random(200) < 0.7, 'y': rng.random(50) < 0.2}
  boot = compression_page.resample_means(a)
  assert abs(boot.mean() - (a['x'].mean() + a['y'].mean()) / 2) < 0.01   # task means averaged
  assert (compression_page.resample_means(a) - boot == 0).all()           # paired draws
  lo, hi = compression_page.interval(boot)
  assert lo < (a['x'].mean() + a['y'].mean()) / 2 < hi
  assert compression_page.interval(compression_page.resample_means({'x': np.ones(9)})) == (1, 1)
  runs = compression.namm_runs('runs/a,r75=runs/b')
  assert runs == {'namm': 'runs/a', 'r75': 'runs/b'}
  assert compression.expand('h2o,namm', runs) == ['h2o', 'namm', 'r75']
  assert compression.expand('h2o,namm', {}) == ['h2o']
  for scores in ([0, 1, 1, 0], [0.5, 1.0, 0.25]):
    np.testing.assert_array_equal(compression_page.decode_scores(compression_page.encode(scores)), scores)


def test_joined_runs_give_one_namm_per_ratio(monkeypatch):
  """'A+B': each run evolved at one ratio serves only that ratio's cell."""
  evolved = {'runs/a': 0.5, 'runs/b': 0.875}
  monkeypatch.setattr(compression, 'evolve_settings',
                      lambda p: dict(seed=0, compression_ratio=evolved[p]))
  runs = compression.namm_runs('per=runs/a+runs/b,one=runs/a')
  assert [compression.run_at(runs['per'], r) for r in (0.5, 0.75, 0.875)] == [
      'runs/a', None, 'runs/b']
  assert [compression.has_cell('per', r, runs) for r in (0.5, 0.75)] == [True, False]
  assert compression.has_cell('one', 0.75, runs) and compression.has_cell('h2o', 0.75, runs)
  settings = compression.label_settings(runs['per'])
  assert settings['compression_ratio'] == [0.5, 0.875]
  assert compression_page.ratios(settings).startswith('0.5 / 0.875 (one run per ratio')
  assert compression_page.ratios(compression.label_settings('runs/b')) == '0.875'


def test_a_tiny_protocol_run_records_each_cell_and_renders(tmp_path):
  from conftest import run_train, tiny_config
  cfg = tiny_config(**{'data.source': 'synthetic:kv', 'data.loss': 'answer', 'train.steps': 1,
                       'train.ckpt_every': 1, 'train.eval_every': 1, 'data.eval_batches': 1})
  run_train(tmp_path / 'base', cfg)
  out = str(tmp_path / 'page')
  args = [f'--base={tmp_path / "base"}', '--tasks=kv', '--length=64', '--prompts=4',
          '--policies=snapkv', '--ratios=0.5', '--settings=prefill', f'--out={out}']
  compression.main(args)
  with open(out + '.json') as f:
    cells = json.load(f)['cells']
  assert set(cells) == {'full|keep_all|0', 'prefill|snapkv|0.5'}
  assert abs(cells['prefill|snapkv|0.5']['cache']['kv'] - 0.5) < 0.01
  assert len(cells['full|keep_all|0']['scores']['kv']) == 4
  text = open(out + '.md').read()
  assert '| snapkv | ' in text and 'namm: no rows at ratio 0.5' in text
  compression.main(args)                                   # a rerun skips the recorded cells
  with open(out + '.json') as f:
    assert json.load(f)['cells'] == cells
  compression.main(args + ['--speed', '--speed_prompt=48', '--speed_batch=1',
                           '--speed_rounds=1', '--interval=16'])
  with open(out + '_speed.json') as f:
    rows = json.load(f)['rows']
  full, snap = rows
  assert (full['policy'], snap['policy'], snap['ratio']) == ('keep_all', 'snapkv', 0.5)
  assert snap['state_bytes'] == full['state_bytes'] * (24 + 16) / (48 + 16)   # budget + new
  assert '### Decode speed and memory' in open(out + '.md').read()


def test_page_states_the_room_left_above_the_best_training_free_policy():
  """Per ratio: the best training-free policy (not NAMM), its margin over the full cache, and
  its distance to a perfect score."""
  key, cell = compression_page.key, lambda p, m: dict(policy=p, mean=m)
  cells = {key('full', 'keep_all', 0.0): cell('keep_all', 0.9),
           key('streamed', 'snapkv', 0.5): cell('snapkv', 0.95),
           key('streamed', 'h2o', 0.5): cell('h2o', 0.8),
           key('streamed', 'namm', 0.5): cell('namm', 0.99)}
  line, = compression_page.headroom({'cells': cells}, 'streamed')
  assert '0.5: snapkv 0.950 (+0.050 vs the full cache; 0.050 below 1)' in line
  assert compression_page.headroom({'cells': cells}, 'prefill') == []
