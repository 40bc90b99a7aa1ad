"""AnSAN: anchor-based self-attention (AnLLM, arXiv 2402.07616) and anchor KV pruning.

Anchors. `is_anc[t]` is 1 when token t is an anchor: with `model.anchor.mode='ep'` any id
in `ep_ids` (existing end-of-sentence tokens, default '.' and '\\n' bytes); with 'ac' only the
`<AC>` id (`ac_id`, inserted at sentence ends by the data source prefix 'ac:', see data/ac.py).
An anchor closes its own sentence: `seg[t] = cumsum(is_anc)[t] - is_anc[t]`.

Documents. With sequence packing a window holds several documents, each starting with
BOS: `doc[t] = cumsum(is_bos)[t]`. Nothing crosses a document boundary, so a document
never sees another's anchors (nor its unfinished sentence).

The mask (AnSAN). Query i may attend key j iff
    j <= i  and  doc[j] == doc[i]  and  not pad[i]  and  not pad[j]
    and ( seg[j] == seg[i]  or  (is_anc[j] and not is_anc[i]) ).
Non-anchors see their own sentence and every earlier anchor of their document; an anchor
sees only its own sentence (itself included), never earlier anchors. BOS is in sentence 0,
so it is invisible after the first anchor (no attention sink). A fully masked row (padding)
gives zeros, not NaN.

Inference ("REDUCTION", Alg. 1). Keys of completed sentences that are not anchors, and keys
of earlier documents, are invisible to every later query, so dropping them is exact: after
each chunk (the prefill, every decode step) the mixer keeps only the anchors of the current
document plus the tokens of its current sentence. It does this when decoding with the
'anchor' policy (`decode.policy=anchor`); without a policy it keeps every key and applies the
mask (the masked full-cache decode). Positions stay absolute, so the pruned decode equals
the masked full forward. Per-slot state in the KV cache (`token_state`): is-anchor, sentence
and document index; `policy_state` carries the running anchor and BOS counts per row.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import struct

from models import registry
from models.attention import Attention, KVCache, write
from models.registry import check
from models.ops.attention import attention, concat_kv


@dataclasses.dataclass(frozen=True)
class AnchorRule:
  """Which token ids are anchors, document starts (BOS) and padding."""
  anchor_ids: tuple
  bos_id: int = 257
  pad_id: int = 256

  @classmethod
  def from_config(cls, a):
    ids = (int(a.ac_id),) if a.mode == 'ac' else tuple(int(i) for i in a.ep_ids)
    return cls(ids, int(a.bos_id), int(a.pad_id))

  def classify(self, tokens_BxT):
    """(is_anchor, is_bos, is_pad), bool [B, T]."""
    anc = jnp.isin(tokens_BxT, jnp.asarray(self.anchor_ids, tokens_BxT.dtype))
    return anc, tokens_BxT == self.bos_id, tokens_BxT == self.pad_id


def sentence_and_document(anc_BxT, bos_BxT, n_anc_B=None, n_bos_B=None):
  """Sentence and document index of each token, continuing from running counts."""
  seg_BxT = jnp.cumsum(anc_BxT, -1, dtype=jnp.int32) - anc_BxT
  doc_BxT = jnp.cumsum(bos_BxT, -1, dtype=jnp.int32)
  if n_anc_B is not None:
    seg_BxT, doc_BxT = seg_BxT + n_anc_B[:, None], doc_BxT + n_bos_B[:, None]
  return seg_BxT, doc_BxT


def ansan_mask(q, k):
  """The AnSAN rule. q: dict of [B, T] arrays, k: dict of [B, K, S] arrays, each with keys
  pos, seg, doc, anc, ok (ok: a real, valid token). Returns mask [B, K, T, S]."""
  Q = {n: a[:, None, :, None] for n, a in q.items()}
  Kk = {n: a[:, :, None, :] for n, a in k.items()}
  visible = (Kk['seg'] == Q['seg']) | (Kk['anc'] & ~Q['anc'])
  return (Kk['pos'] <= Q['pos']) & (Kk['doc'] == Q['doc']) & Q['ok'] & Kk['ok'] & visible


def _block_rule(q, k):
  """ansan_mask without positions (the blockwise kernel applies causality): [B, Q, C]."""
  pos = lambda d: dict(d, pos=jnp.zeros_like(d['seg']))
  return ansan_mask(pos(q), {n: a[:, None] for n, a in pos(k).items()})[:, 0]


def anchor_mask(tokens_BxT, rule, pos_BxT=None):
  """The [B, T, T] AnSAN mask of one sequence (a window of packed documents)."""
  B, T = tokens_BxT.shape
  if pos_BxT is None:
    pos_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  anc, bos, pad = rule.classify(tokens_BxT)
  seg, doc = sentence_and_document(anc, bos)
  q = dict(pos=pos_BxT, seg=seg, doc=doc, anc=anc, ok=~pad)
  return ansan_mask(q, {n: a[:, None] for n, a in q.items()})[:, 0]


def _scatter(buf_BxKxS, slots_BxKxW, new_BxKxW):
  return jax.vmap(jax.vmap(lambda b, i, n: b.at[i].set(n)))(buf_BxKxS, slots_BxKxW, new_BxKxW)


class AnchorAttention(Attention):
  """Causal attention under the AnSAN mask (same parameters as `Attention`: wq wk wv wo,
  so `train.init_from` converts a trained full-attention model). Needs `tokens_BxT`."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.rule = AnchorRule.from_config(cfg.anchor)

  def init_state(self, batch, capacity, dtype=jnp.float32):
    cache = KVCache.empty(batch, self.kv_heads, capacity, self.head_dim, dtype)
    shape = (batch, self.kv_heads, capacity)
    return cache.replace(
        token_state=dict(anc=jnp.zeros(shape, bool), seg=jnp.zeros(shape, jnp.int32),
                         doc=jnp.zeros(shape, jnp.int32)),
        policy_state=dict(n_anc=jnp.zeros((batch,), jnp.int32),
                          n_bos=jnp.zeros((batch,), jnp.int32)))

  def __call__(self, x_BxTxD, cache: KVCache, pos_BxT, *, policy=None, tokens_BxT=None):
    if tokens_BxT is None:
      raise ValueError('AnchorAttention needs the token ids (tokens_BxT) to find anchors')
    q, k, v = self.qkv(x_BxTxD, pos_BxT)
    B, T = tokens_BxT.shape
    anc, bos, pad = self.rule.classify(tokens_BxT)
    counts = cache.policy_state
    seg, doc = sentence_and_document(anc, bos, counts['n_anc'], counts['n_bos'])
    new = dict(pos=pos_BxT.astype(jnp.int32), seg=seg, doc=doc, anc=anc, ok=~pad)
    k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if cache.capacity == 0:
      # Training: one chunk at positions 0..T-1, the rule applied by any backend (blockwise by
      # chunked, O(T * block)); PAD query rows come out as zeros.
      info = {n: a for n, a in new.items() if n != 'pos'}
      o = attention(q, k_new, v_new, impl=self.impl, block=self.block, rule=(_block_rule, info))
      return self.out(o), cache
    K = self.kv_heads
    new_BxKxT = {n: jnp.broadcast_to(a[:, None], (B, K, T)) for n, a in new.items()}
    k_all, v_all, pos_all, ok_all = concat_kv(cache.k_BxKxSxH, cache.v_BxKxSxH, cache.pos_BxKxS,
                                              cache.valid_BxKxS, k_new, v_new, pos_BxT, ~pad)
    ts = cache.token_state
    keys = dict(pos=pos_all, ok=ok_all,
                **{n: jnp.concatenate([ts[n], new_BxKxT[n]], 2) for n in ('seg', 'doc', 'anc')})
    o = attention(q, k_all, v_all, mask_BxKxTxS=ansan_mask(new, keys))
    cache = self._store(cache, k_new, v_new, pos_BxT, new_BxKxT)
    if policy is not None:
      cache = prune(cache)
    return self.out(o), cache

  def _store(self, cache, k_new, v_new, pos_BxT, new_BxKxT):
    """Writes the chunk and its anchor metadata; padding is stored invalid."""
    cache, slots_BxKxW = write(cache, k_new, v_new, pos_BxT)
    W = slots_BxKxW.shape[-1]                        # the newest min(T, capacity) tokens
    meta = {n: _scatter(cache.token_state[n], slots_BxKxW, new_BxKxT[n][..., -W:])
            for n in ('anc', 'seg', 'doc')}
    valid = _scatter(cache.valid_BxKxS, slots_BxKxW, new_BxKxT['ok'][..., -W:])
    last = lambda n: new_BxKxT[n][:, 0, -1]
    counts = dict(n_anc=last('seg') + last('anc'), n_bos=last('doc'))
    return cache.replace(valid_BxKxS=valid, token_state=meta, policy_state=counts)


def prune(cache):
  """REDUCTION: keep the current document's anchors and its current sentence's tokens."""
  ts, counts = cache.token_state, cache.policy_state
  same_doc = ts['doc'] == counts['n_bos'][:, None, None]
  current = ts['seg'] == counts['n_anc'][:, None, None]
  return cache.replace(valid_BxKxS=cache.valid_BxKxS & same_doc & (current | ts['anc']))


@struct.dataclass
class AnchorPolicy:
  """`decode.policy=anchor`: AnchorAttention layers prune their cache (see `prune`) after
  every chunk. Other attention layers (in a mixed model) keep their full cache."""

  def init(self, cache):
    return cache

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    return jnp.ones_like(cache.valid_BxKxS), cache


def init_ac_embedding(model_cfg, model_state):
  """On conversion (train.init_from) of a model to AC mode: <AC>'s input and output
  embeddings start as copies of token `ac_init_from`'s (the paper copies '.')."""
  a = model_cfg.anchor
  if a.mode != 'ac' or a.ac_init_from < 0:
    return model_state
  src, dst = int(a.ac_init_from), int(a.ac_id)

  def copy_row(path, x):
    name = jax.tree_util.keystr(path)
    if re.search(r"^\['embed'\](\.value)?$", name):
      return jax.device_put(x.at[dst].set(x[src]), x.sharding)
    if re.search(r"^\['head'\](\.value)?$", name):
      return jax.device_put(x.at[:, dst].set(x[:, src]), x.sharding)
    return x

  return jax.tree_util.tree_map_with_path(copy_row, model_state)


def validate(cfg):
  """model.anchor (mixer 'anchor')."""
  a, v = cfg.model.anchor, cfg.model.vocab_size
  check(a.mode in ('ep', 'ac'), 'model.anchor.mode', f'{a.mode!r} not ep|ac')
  if a.mode == 'ep':
    check(len(a.ep_ids) >= 1, 'model.anchor.ep_ids', 'EP mode needs at least one anchor id')
  ids = {'ep_ids': tuple(a.ep_ids) if a.mode == 'ep' else (),
         'ac_id': (a.ac_id,) if a.mode == 'ac' else (), 'bos_id': (a.bos_id,),
         'pad_id': (a.pad_id,) if a.pad_id != -1 else ()}       # -1: no padding id
  for key, values in ids.items():
    for i in values:
      check(0 <= i < v, f'model.anchor.{key}', f'id {i} outside the vocabulary [0, {v})')
  check(a.ac_init_from < v, 'model.anchor.ac_init_from', f'id {a.ac_init_from} >= vocab {v}')
  src = cfg.data.source
  if a.mode == 'ac':
    check(not (src == 'stdlib' or src.startswith('synthetic:')), 'data.source',
          f'model.anchor.mode=ac needs <AC> tokens in the text: use data.source=ac:{src} '
          '(inserts <AC> at sentence ends)')


CONFIG = {'model.anchor': dict(
    mode='ep',            # ep: existing end-of-sentence ids are anchors | ac: <AC> only
    ep_ids=(),            # EP anchors; (): the tokenizer's ids whose text ends in '.' or a
                          # newline (training/config.py resolve; bytes: 10, 46)
    ac_id=-1,             # the <AC> id; -1: the tokenizer's (bytes: 259; an HF tokenizer's
                          # own "<AC>", else a new id one past its vocabulary, the model's
                          # vocabulary grown to hold it). AC data: data.source='ac:...'
    ac_init_from=-2,      # init_from into AC mode: <AC> embedding := this id's; -2: the
                          # tokenizer's '.' (bytes: 46); -1: off (fresh)
    bos_id=-1,            # a BOS starts a new document (packing): no attention across;
                          # -1: the tokenizer's (bytes: 257)
    pad_id=-1,            # padding: masked as query and as key; -1: the tokenizer's (bytes:
                          # 256; none if it has none)
)}
registry.register_mixer('anchor', AnchorAttention, state=KVCache, config=CONFIG, validate=validate)
registry.register_policy('anchor', lambda cfg: AnchorPolicy())
