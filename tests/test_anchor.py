"""AnSAN anchors: the mask rule, pruned decode == masked forward, AC data, AC conversion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from data.ac import insert_ac, strip_ac
from data.tokenizer import ByteTokenizer
from models import decode
from models.anchor import AnchorPolicy, AnchorRule, anchor_mask, init_ac_embedding
from models.lm import LM

TOK = ByteTokenizer()
RULE = AnchorRule((ord('.'), ord('\n')))


def build(**overrides):
  cfg = tiny_config(**{'model.mixer': 'anchor', **overrides})
  return LM(cfg.model, rngs=nnx.Rngs(0)), cfg


def sentences(B=3, T=48, seed=0, bos_at=(), pad_from=None):
  """Random byte text with anchors ('.', '\\n') at a different rate per row."""
  r = np.random.default_rng(seed)
  x = r.choice(np.frombuffer(b'abcdefgh', np.uint8), (B, T)).astype(np.int32)
  for b in range(B):
    rate = 0.08 + 0.1 * b                      # rows get different sentence lengths
    x[b, r.random(T) < rate] = r.choice([ord('.'), ord('\n')])
  x[:, 0] = TOK.BOS
  for t in bos_at:                             # packed documents
    x[:, t] = TOK.BOS
  if pad_from is not None:
    x[-1, pad_from:] = TOK.PAD
  return jnp.asarray(x)


def naive_mask(tokens):
  """The rule, one (i, j) at a time (see models/anchor.py)."""
  t = np.asarray(tokens)
  B, T = t.shape
  out = np.zeros((B, T, T), bool)
  for b in range(B):
    anc = np.isin(t[b], RULE.anchor_ids)
    seg = np.cumsum(anc) - anc
    doc = np.cumsum(t[b] == TOK.BOS)
    pad = t[b] == TOK.PAD
    for i in range(T):
      for j in range(i + 1):
        out[b, i, j] = (doc[i] == doc[j] and not pad[i] and not pad[j]
                        and (seg[i] == seg[j] or (anc[j] and not anc[i])))
  return out


def test_mask_matches_naive_rule():
  x = sentences(T=40, bos_at=(25,), pad_from=33)
  np.testing.assert_array_equal(np.asarray(anchor_mask(x, RULE)), naive_mask(x))


def test_mask_properties():
  x = sentences(T=64, bos_at=(40,))
  mask = np.asarray(anchor_mask(x, RULE))
  t = np.asarray(x)
  anc = np.isin(t, RULE.anchor_ids)
  for b in range(t.shape[0]):
    a = np.flatnonzero(anc[b])
    assert len(a) >= 3
    # anchors never see earlier anchors, but see themselves
    assert not mask[b][np.ix_(a, a)][np.tril_indices(len(a), -1)].any()
    assert mask[b][a, a].all()
    # BOS (position 0) invisible after the first anchor; non-anchors see earlier anchors
    assert not mask[b, a[0] + 1:, 0].any() and mask[b, :a[0] + 1, 0].all()
    later = [i for i in range(a[1] + 1, 40) if not anc[b, i]]
    assert mask[b, later, a[0]].all()
    # the second document sees nothing of the first
    assert not mask[b, 40:, :40].any()


def test_padding_rows_are_finite():
  model, _ = build()
  logits = jax.jit(lambda x: model(x)[0])(sentences(pad_from=30))
  assert np.isfinite(np.asarray(logits)).all()


def test_blockwise_kernel_equals_dense_mask():
  """attention_impl='chunked' applies the rule block by block (blocks of 16 over 56 tokens,
  padding and two packed documents): loss and gradients equal the dense masked forward."""
  x = sentences(T=57, bos_at=(37,), pad_from=50)
  grads = {}
  for impl in ('xla', 'chunked'):
    model, _ = build(**{'model.attention_impl': impl, 'model.attention_block': 16})

    def loss(model):
      logits = model(x[:, :-1])[0]
      ok = (x[:, 1:] != TOK.PAD)[..., None]
      return (jax.nn.log_softmax(logits) * jax.nn.one_hot(x[:, 1:], logits.shape[-1]) * ok).sum()

    grads[impl] = nnx.grad(loss)(model), loss(model)
  assert abs(float(grads['xla'][1] - grads['chunked'][1])) < 1e-3
  for g_x, g_c in zip(jax.tree.leaves(grads['xla'][0]), jax.tree.leaves(grads['chunked'][0])):
    np.testing.assert_allclose(np.asarray(g_c), np.asarray(g_x), atol=2e-4, rtol=2e-3)


def cache_positions(state, b):
  cache = state[0]
  return sorted(set(np.asarray(cache.pos_BxKxS[b, 0])[np.asarray(cache.valid_BxKxS[b, 0])]))


def decode_logits(model, x_BxT, start, capacity, policy, chunk=0):
  """Prefill x[:, :start] (in chunks), then step the rest: logits [B, T-start+1, V], cache
  sizes after each step [B, T-start], final state. One jit, steps in a scan."""

  @jax.jit
  def run(x_BxT):
    B, T = x_BxT.shape
    state = decode.init_state(model, B, capacity, policy)
    last, state = decode.prefill(model, x_BxT[:, :start], state, policy, chunk)

    def body(state, t):
      logits, state = decode.step(model, x_BxT[:, t], jnp.full((B,), t), state, policy)
      return state, (logits, state[0].size_BxK()[:, 0])

    state, (rows, sizes) = jax.lax.scan(body, state, jnp.arange(start, T))
    return jnp.concatenate([last[:, None], rows.swapaxes(0, 1)], 1), sizes.T, state

  return run(x_BxT)


def test_pruned_decode_equals_masked_forward():
  """Batched, sentences of different lengths, two packed documents: prefill in chunks under
  the anchor policy, then one token at a time; fp32 logits equal the full masked forward."""
  model, _ = build()
  x = sentences(T=56, bos_at=(37,))
  full, _ = model(x)
  masked_model, _ = build(**{'model.attention_impl': 'masked'})
  nnx.update(masked_model, nnx.state(model))
  assert float(jnp.abs(masked_model(x)[0] - full).max()) < 1e-5
  from training.policy import make_policy
  policy = make_policy(tiny_config(**{'decode.policy': 'anchor'}))
  assert isinstance(policy, AnchorPolicy)

  rows, sizes, state = decode_logits(model, x, 24, 40, policy, chunk=8)
  assert float(jnp.abs(rows - full[:, 23:]).max()) < 1e-4
  # kept = the current document's anchors + its current (unfinished) sentence
  t = np.asarray(x)
  for b in range(3):                        # the current document starts at its BOS, 37
    anc = np.isin(t[b], RULE.anchor_ids)
    last_anchor = max([p for p in range(37, 56) if anc[p]], default=36)
    assert cache_positions(state, b) == [p for p in range(37, 56) if anc[p] or p > last_anchor]
  assert int(sizes.max()) < 40


def test_full_cache_decode_equals_masked_forward():
  """Without a policy the anchor model keeps every key and masks; segments == one pass."""
  model, _ = build()
  seg, _ = build(**{'model.segment_len': 16})
  nnx.update(seg, nnx.state(model))
  x = sentences(T=48, bos_at=(30,))
  full, _ = model(x)
  assert float(jnp.abs(seg(x)[0] - full).max()) < 1e-5
  rows, _, state = decode_logits(model, x, 20, 48, None)
  assert float(jnp.abs(rows - full[:, 19:]).max()) < 1e-4
  assert int(state[0].size_BxK().min()) == 48


def test_greedy_generate_under_pruning_matches_forward():
  model, _ = build()
  out, state = decode.generate(model, sentences(T=24, seed=3), jax.random.key(0), n_new=8,
                               capacity=32, policy=AnchorPolicy())
  full, _ = model(out)
  np.testing.assert_array_equal(full[:, 23:-1].argmax(-1), out[:, 24:])


@pytest.mark.parametrize('text', ['One. Two? Three!\nfour', 'def f(x):\n  return x.y\n\n',
                                  'a.b 1.5 end.', ''])
def test_ac_insertion_round_trips_through_the_tokenizer(text):
  marked = insert_ac(text)
  ids = TOK.encode(marked, bos=True, eos=True)
  assert TOK.decode(ids) == marked and strip_ac(TOK.decode(ids)) == text
  ends = sum(text.count(c) for c in '\n') + sum(
      1 for i, c in enumerate(text) if c in '.!?' and (i + 1 == len(text) or text[i + 1] == ' '))
  assert int((ids == TOK.AC).sum()) == ends


def test_ac_after_sentence_ends():
  assert insert_ac('One. Two.\nx.y') == 'One.<AC> Two.\n<AC>x.y'


def test_ac_conversion_copies_the_period_embedding():
  model, cfg = build()
  cfg.model.anchor.mode = 'ac'
  state = init_ac_embedding(cfg.model, nnx.state(model, nnx.Param))
  emb = np.asarray(state['embed'].value if hasattr(state['embed'], 'value') else state['embed'])
  np.testing.assert_array_equal(emb[TOK.AC], emb[ord('.')])
  before = np.asarray(model.embed[...])
  assert not np.array_equal(before[TOK.AC], before[ord('.')])


@pytest.mark.parametrize('key,value,named', [('mode', 'xy', 'model.anchor.mode'),
                                             ('ep_ids', (46, 999), 'model.anchor.ep_ids'),
                                             ('mode', 'ac', 'data.source')])
def test_config_errors_name_the_key(key, value, named):
  from configs.anchor_ep import get_config
  from training.config import ConfigError, resolve, validate
  cfg = resolve(get_config('tiny'))
  cfg.model.anchor[key] = value
  with pytest.raises(ConfigError, match=named.replace('.', r'\.')):
    validate(cfg, 1)
  from configs.anchor_ac import get_config as ac_config
  validate(resolve(ac_config('tiny')), 1)


def test_anchor_ids_come_from_the_tokenizer(tmp_path):
  """EP anchors, BOS and PAD left to the tokenizer: the byte tokenizer's '.' and newline, 257
  and 256; a BPE tokenizer's ids whose text ends in '.' or a newline, its BOS, no PAD. AC
  mode with an hf: tokenizer: <AC> a new id past the tokenizer's, its embedding from '.'."""
  from configs.anchor_ep import get_config
  from data import build_tokenizer
  from data.hf_tokenizer import get_tokenizer
  from training.config import ConfigError, resolve, validate
  a = resolve(get_config('tiny')).model.anchor
  assert (tuple(a.ep_ids), a.bos_id, a.pad_id) == ((10, 46), TOK.BOS, TOK.PAD)
  tok_dir = build_tokenizer.build(str(tmp_path), vocab_size=400, sources_=('pydoc',))
  cfg = get_config('tiny')
  cfg.data.tokenizer, cfg.model.vocab_size = f'hf:{tok_dir}', 512
  cfg = resolve(cfg)
  validate(cfg, 1)
  tok, a = get_tokenizer(f'hf:{tok_dir}'), cfg.model.anchor
  texts = [tok.decode([i]) for i in a.ep_ids]
  assert '.' in texts and '\n' in texts and len(texts) < 100
  assert all(t.rstrip(' ')[-1] in '.\n' for t in texts)
  assert (a.bos_id, a.pad_id) == (tok.BOS, -1) == (1, -1)
  ac = get_config('tiny')            # AC: <AC> is a new id one past the tokenizer's 400, the
  ac.model.anchor.mode, ac.data.source = 'ac', 'ac:pydoc'    # vocabulary grows to hold it
  ac.data.tokenizer, ac.model.vocab_size = f'hf:{tok_dir}', 400
  a = resolve(ac).model.anchor
  validate(ac, 1)
  assert (a.ac_id, ac.model.vocab_size, tok.AC) == (400, 401, 400)
  assert a.ac_init_from == int(tok.encode('.')[0]) != 46
  assert tok.encode('a.<AC>b').tolist() == tok.encode('a.').tolist() + [400] + tok.encode(
      'b').tolist() and tok.decode(tok.encode('a.<AC>b')) == 'a.<AC>b'
  ac.model.anchor.ac_init_from = 401
  with pytest.raises(ConfigError, match=r'config.model.anchor.ac_init_from: id 401 >= vocab 401'):
    validate(ac, 1)


def test_continued_pretraining_from_a_full_attention_run(tmp_path):
  """train.init_from: a trained full-attention run continues under the anchor mask through
  training.loop.train; every parameter is copied and training starts from the trained loss."""
  from training.loop import train
  from training.metrics import read_metrics
  fast = {'train.lr': 1e-2, 'train.warmup_steps': 5, 'train.log_every': 1}
  base = train(tiny_config(**fast, **{'train.steps': 40, 'train.eval_every': 40,
                                      'train.ckpt_every': 40}), tmp_path / 'base')
  cfg = tiny_config(**{**fast, 'model.mixer': 'anchor', 'train.init_from': str(tmp_path / 'base'),
                       'train.steps': 3, 'train.lr': 1e-3})
  train(cfg, tmp_path / 'ep')
  rows = read_metrics(tmp_path / 'ep')
  fresh = read_metrics(tmp_path / 'base')[1]['loss']         # step 1 of the base run
  assert np.isfinite(rows[3]['eval_loss'])
  assert rows[1]['loss'] < base['eval_loss'] + 0.5 < fresh, (rows[1], base, fresh)
