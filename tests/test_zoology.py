"""data/zoology.py (Zoology MQAR): the generator against the paper's description, the source
through the pipeline and the config, and a tiny cell that learns above chance and stops early."""
import json
import os

import numpy as np
import pytest

from data import pipeline, zoology
from training.config import ConfigError, resolve, validate


def examples(n=200, T=64, V=256, P=4, split='train'):
  source = zoology.MQAR(T, split, vocab=V, pairs=P, train_examples=n, test_examples=n)
  return [source[i] for i in range(n)]


def test_pairs_queries_and_labels():
  T, V, P = 64, 256, 4
  for e in examples(T=T, V=V, P=P):
    tokens, weights = e['tokens'], e['weights']
    assert tokens.shape == (T + 1,) and weights.shape == (T,)
    keys, values = tokens[0:2 * P:2], tokens[1:2 * P:2]
    assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
    assert len(set(keys)) == P and len(set(values)) == P            # unique in the example
    at = np.nonzero(weights)[0]                  # labels only at the P queries
    assert len(at) == P and (at >= 2 * P).all() and ((at - 2 * P) % 2 == 0).all()
    assert sorted(tokens[at]) == sorted(keys)                         # each key queried once
    answer = dict(zip(keys, values))
    assert all(tokens[i + 1] == answer[tokens[i]] for i in at)         # target = its value
    assert ((0 <= tokens) & (tokens < V)).all()


def test_gaps_follow_the_power_law():
  """The gap of every query (in slots after the pairs) against p(g) ~ a (g+1)^(a-1),
  a = 0.01, drawn without replacement: the first slots' counts within 4 sigma of a simulation
  of the same draw with NumPy's choice."""
  T, P, n = 64, 4, 2000
  space = (T - 2 * P) // 2
  gaps = np.concatenate([(np.nonzero(e['weights'])[0] - 2 * P) // 2
                         for e in examples(n=n, T=T, P=P)])
  assert gaps.min() >= 0 and gaps.max() < space
  rng, p = np.random.default_rng(1), zoology.gap_probabilities(space, 0.01)
  sim = np.concatenate([rng.choice(space, P, replace=False, p=p) for _ in range(n)])
  for g in range(3):
    want = (sim == g).mean()
    sigma = np.sqrt(want * (1 - want) / len(sim))
    assert abs((gaps == g).mean() - want) < 4 * sigma + 1e-3, g
  assert (gaps < space // 4).mean() > 0.5 > (gaps >= space // 2).mean() > 0.1   # power law


def test_splits_are_disjoint_and_deterministic():
  train, test = examples(n=50), examples(n=50, split='eval')
  assert all((a['tokens'] == b['tokens']).all() for a, b in zip(train, examples(n=50)))
  seen = {e['tokens'].tobytes() for e in train}
  assert not any(e['tokens'].tobytes() in seen for e in test)


def test_source_through_the_pipeline():
  it = pipeline.make_train_iterator('zoology:mqar:pairs=4,vocab=256,train_examples=64', 'train',
                                    32, 8, 0)
  batch = next(it)
  assert batch['tokens'].shape == (8, 33) and (batch['weights'].sum(1) == 4).all()
  assert pipeline.pad_id('zoology:mqar', 'byte') == -1 and not pipeline.is_text('zoology:mqar')


def test_loss_positions_give_the_all_position_update():
  """train.loss_positions = pairs (the head at the queried values only) gives the same loss,
  gradient norm, new parameters and held-out sums as every position (a model in segments);
  a row weighing more targets than loss_positions is an error, not a silent loss."""
  import jax
  from flax import nnx
  from training import mesh as meshlib
  from training.loop import check_loss_positions
  from training.state import train_state_ctor
  from training.step import make_eval_step, make_optimizer, make_train_step
  from tests.conftest import tiny_config
  P, T = 4, 64
  cfg = tiny_config(**{'data.source': f'zoology:mqar:pairs={P},vocab=512',
                       'model.vocab_size': 512, 'model.segment_len': 16})
  mesh, rules = meshlib.make_mesh(cfg), meshlib.axis_rules(cfg)
  tx, schedule = make_optimizer(cfg.train)
  graphdef, state, shardings = meshlib.sharded_init(train_state_ctor(cfg, tx), mesh, rules)
  model_graphdef = nnx.graphdef(nnx.merge(graphdef, state).model)
  batch_sh = meshlib.batch_sharding(mesh)
  batch = next(pipeline.make_train_iterator(cfg.data.source, 'train', T, 8, 0))
  tokens, weights = (jax.device_put(batch[k], batch_sh) for k in ('tokens', 'weights'))
  out, sums = [], []
  for k in (0, P):
    evaluate = make_eval_step(model_graphdef, shardings['model'], batch_sh, loss_positions=k)
    sums.append([float(x) for x in evaluate(state['model'], tokens, weights)])
    step = make_train_step(graphdef, schedule, shardings, batch_sh, loss_positions=k)
    copy = jax.tree.map(lambda a: a.copy(), state)          # the step donates its input
    out.append(step(copy, tokens, weights))
  np.testing.assert_allclose(sums[1], sums[0], rtol=1e-5)    # nll, hits, weight
  assert sums[0][2] == 8 * P
  (new0, m0), (newk, mk) = out
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(float(mk[key]), float(m0[key]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new0), jax.tree.leaves(newk)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  check_loss_positions(batch['weights'], P)
  with pytest.raises(ValueError, match=r'loss_positions=3, but a batch row weighs 4'):
    check_loss_positions(batch['weights'], P - 1)


@pytest.mark.parametrize('overrides, message', [
    ({'data.source': 'zoology:mqar:pairs=64'}, r'data.source: .*pairs need 4 x pairs'),
    ({'data.source': 'zoology:mqar:pairz=4'}, r'data.source: .*KEY one of'),
    ({'data.source': 'zoology:ar'}, r"data.source: .*only 'mqar'"),
    ({'model.vocab_size': 4096}, r'model.vocab_size: 4096 < the task\'s vocab 8192'),
    ({'data.loss': 'answer'}, r'data.loss: zoology'),
    ({'train.stop_at_accuracy': 1.5}, r'train.stop_at_accuracy: must be in'),
])
def test_config_errors_name_the_key(overrides, message):
  from tests.conftest import tiny_config
  cfg = tiny_config(**{'data.source': 'zoology:mqar:pairs=4', 'model.vocab_size': 8192,
                       **overrides})
  with pytest.raises(ConfigError, match=message):
    validate(resolve(cfg), 1)


def test_tiny_cell_learns_above_chance_and_stops_early(tmp_path):
  """2 pairs, vocabulary 64 (chance 1/32), width 32: held-out accuracy passes 0.3 within a
  few hundred steps and train.stop_at_accuracy ends the run there (in seconds)."""
  from bench.common import train_command
  w = str(tmp_path / 'cell')
  train_command(
      f'python train.py --config=configs/transformer.py:tiny --workdir={w} '
      '--config.data.source=zoology:mqar:pairs=2,vocab=64,train_examples=4096,'
      'test_examples=256 --config.data.seq_len=16 --config.model.vocab_size=64 '
      '--config.model.d_model=32 --config.model.n_layers=2 --config.model.n_heads=1 '
      '--config.model.n_kv_heads=1 --config.train.batch_size=32 --config.train.steps=600 '
      '--config.train.lr=1e-2 --config.train.warmup_steps=10 --config.train.eval_every=25 '
      '--config.train.log_every=25 --config.train.ckpt_every=1000 --config.data.eval_batches=8 '
      '--config.train.stop_at_accuracy=0.3 --config.train.peak_flops=1e11 '
      '--config.train.async_ckpt=False')
  with open(os.path.join(w, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  last = rows[-1]
  assert last['stopped_early'] == 1 and last['step'] < 600 and last['eval_accuracy'] >= 0.3
  assert all(r['eval_accuracy'] < 0.3 for r in rows[:-1])     # it stopped at the first one
  assert os.path.isdir(os.path.join(w, 'checkpoints', str(last['step'])))   # and saved it



def test_a_preempted_cell_is_not_recorded_and_resumes(tmp_path, monkeypatch):
  """A signal stops the cell's run (train returns `preempted`): the grid stops without
  recording the cell or removing its workdir; the rerun resumes it and records it."""
  from bench import zoology
  from bench.common import Preempted
  from training.preemption import Preemption
  args = ['--mixers=attention', '--cells=16:2', '--d_models=32', '--lrs=1e-2',
          '--examples=256', '--train_examples=512', '--test_examples=64', '--eval_every=2',
          f'--work={tmp_path / "work"}', f'--out={tmp_path / "page"}']
  with monkeypatch.context() as m:
    m.setattr(Preemption, 'requested', lambda self, sync=True: True)   # SIGTERM at step 1
    with pytest.raises(Preempted):
      zoology.main(args)
  assert not os.path.exists(f'{tmp_path / "page"}.json')
  cell, = os.listdir(tmp_path / 'work')
  assert os.listdir(tmp_path / 'work' / cell / 'checkpoints') == ['1']   # kept, at step 1
  zoology.main(args)
  with open(f'{tmp_path / "page"}.json') as f:
    row, = json.load(f)['cells'].values()
  assert row['steps'] == 4 and row['examples'] == 256


def test_page_compares_with_the_published_shape():
  from bench.zoology_page import published_shape
  row = lambda m, T, p, d, acc: ((m, T, p, d), dict(mixer=m, T=T, pairs=p, d_model=d,
                                                     accuracy=acc, solved=acc >= 0.99))
  rows = dict([row('attention', 64, 4, 64, 0.995), row('attention', 128, 8, 64, 0.6),
               row('infini', 64, 4, 64, 0.93), row('infini', 128, 8, 64, 0.41),
               row('sliding', 64, 4, 64, 0.7)])
  lines = published_shape(rows)
  assert lines[0] == '- attention: 1 of 2 cells solved (>= 0.99).'
  assert lines[1] == ('- infini, d_model 64: 4 pairs (T 64) 0.93, 8 pairs (T 128) 0.41: falls '
                      'as the pairs grow.')
  assert len(lines) == 2                     # sliding: one pair count, no trend to state
