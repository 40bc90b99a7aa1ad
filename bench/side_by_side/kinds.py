"""The model kinds side by side, their configs at a preset and seed, and the run's plan."""
import dataclasses

import jax

from bench.common import load_config
from training.config import resolve

# kind -> (config, overrides), at the preset (':tiny' here): the same width and depth; the
# sliding window is the memory kinds' segment (titans_mac's). 'plain' is full causal attention
# with the blockwise (flash-style) kernel; 'plain_xla' the same model with
# jax.nn.dot_product_attention (materialises the scores; training speed only). 'ansan' trains
# with the same kernel, its anchor rule applied block by block.
CHUNKED = {'model.attention_impl': 'chunked'}
KINDS = {
    'plain': ('configs/transformer.py:tiny', CHUNKED),
    'plain_xla': ('configs/transformer.py:tiny', {'model.attention_impl': 'xla'}),
    'sliding': ('configs/sliding.py:tiny', {}),
    'titans_mac': ('configs/titans_mac.py:tiny', {}),
    'titans_mag': ('configs/titans_mag.py:tiny', {}),
    'titans_mal': ('configs/titans_mal.py:tiny', {}),
    'infini': ('configs/infini.py:tiny', {}),
    'infini_delta': ('configs/infini.py:tiny', {'model.infini.update_rule': 'delta'}),
    'ansan': ('configs/anchor_ep.py:tiny', CHUNKED),
}
# Width 512, 8 layers: the MFU target. No rematerialisation: recomputing the forward in the
# backward costs 8 instead of 6 FLOPs per parameter and token while MFU counts 6 (MaxText's
# convention), and at this size memory does not call for it. The step's tokens (8 x 2048,
# like every row) are accumulated over 4 micro-batches (train.microbatches): in one pass
# every op ran slower per token than at batch 2 (7.3 GiB of XLA buffers, 2.3 GiB in slices);
# interleaved on the 2-core CPU, 4 micro-batches reached 56% of the peak, one pass 41%.
WIDE = ('configs/transformer.py:small',
        dict(CHUNKED, **{'model.remat': 'none', 'train.microbatches': 4}))
ALL_KINDS = list(KINDS) + ['plain_wide']     # the default --kinds
TRAIN_ONLY = ('plain_xla', 'plain_wide')
RECURRENT = ('sliding', 'titans_mac', 'titans_mag', 'titans_mal', 'infini', 'infini_delta')
POLICIES = ('keep_all', 'recency', 'h2o', 'l2', 'namm')
MIX = 'mix:stdlib+synthetic:passkey+synthetic:mqar'     # niah needs > 314 bytes: eval only
SCALE_KINDS = ('plain', 'titans_mac', 'infini')


@dataclasses.dataclass(frozen=True)
class Plan:
  train_lengths: tuple       # every kind
  scale_lengths: tuple       # more points for the scaling fit, SCALE_KINDS only
  train_tokens: int          # per step (batch = tokens / length)
  train_steps: int           # timed steps
  ratio_lengths: tuple       # plain (full attention) trains up to the longest of these
  wide_length: int
  stream_lengths: tuple      # every kind with a constant state (and plain up to its max)
  stream_long: tuple         # SCALE_KINDS only
  stream_plain_max: int      # the plain KV cache grows: stop there
  decode_prompt: int
  decode_new: int
  cap_length: int
  cap_steps: int
  cap_batch: int
  cap_examples: int
  ratio_rounds: int = 5      # head-to-head rounds per speed target


FULL = Plan(train_lengths=(2048, 8192, 32768), scale_lengths=(1024, 65536), train_tokens=16384,
            train_steps=1, ratio_lengths=(2048, 8192, 32768), wide_length=2048,
            stream_lengths=(4096, 32768, 262144), stream_long=(1048576,), stream_plain_max=32768,
            decode_prompt=2048, decode_new=1024, cap_length=256, cap_steps=300, cap_batch=8,
            cap_examples=16)
QUICK = Plan(train_lengths=(512, 2048), scale_lengths=(), train_tokens=4096, train_steps=2,
             ratio_lengths=(2048,), wide_length=512, stream_lengths=(1024, 4096),
             stream_long=(16384,), stream_plain_max=16384, decode_prompt=256, decode_new=128,
             cap_length=256, cap_steps=40, cap_batch=8, cap_examples=4, ratio_rounds=2)


def make_plan(quick, changes):
  """Returns QUICK (quick) or FULL with `changes` (['FIELD=VALUE', ...], tuples as
  2048:8192) applied; SystemExit naming the fields on a bad one."""
  plan, fields = QUICK if quick else FULL, dataclasses.fields(Plan)
  new = {}
  for item in changes:
    field, _, value = item.partition('=')
    try:
      old = getattr(plan, field)
      new[field] = (tuple(int(v) for v in value.split(':') if v) if isinstance(old, tuple)
                    else type(old)(value))
    except (AttributeError, ValueError):
      raise SystemExit(f'--plan: {item!r}: expected FIELD=VALUE (tuples as 2048:8192) with '
                       f'FIELD one of {[f.name for f in fields]}') from None
  return dataclasses.replace(plan, **new)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every section's configs share: the config preset (tiny: this CPU; small: width
  512, 8 layers, for a GPU/TPU; the MFU row stays transformer.py:small), the seed of model
  init, data order and task examples, and the evolve.py workdir of the NAMM policy ('': a
  random parameter vector), the compute dtype ('': the preset's) and the attention kernel of
  the kinds that name one ('': CHUNKED's blockwise kernel, this CPU's fastest; 'auto' on a
  GPU or TPU host: cudnn or splash at bf16, see configs/base.py)."""
  preset: str = 'tiny'
  seed: int = 0
  namm_run: str = ''
  attention_impl: str = ''
  dtype: str = ''

  def config(self, kind, **more):
    """Returns the resolved config of `kind` at this preset and seed, with `more` overrides
    ({'section.key': value})."""
    spec, overrides = WIDE if kind == 'plain_wide' else KINDS[kind]
    if kind == 'sliding':                       # window = segment = the memory kinds' segment
      C = self.config('titans_mac').model.segment_len
      overrides = {'model.window': C, 'model.segment_len': C}
    if self.attention_impl and overrides.get('model.attention_impl') == 'chunked':
      overrides = dict(overrides, **{'model.attention_impl': self.attention_impl})
    if self.dtype:
      overrides = dict(overrides, **{'model.dtype': self.dtype})
    cfg = load_config(spec.replace(':tiny', ':' + self.preset), dict(overrides, **more))
    cfg.seed = self.seed
    return resolve(cfg)

  def plain_configs(self):
    """Returns plain at its preset's model.remat and without rematerialisation: the
    reference for the memory kinds is the faster of the two."""
    remats = dict.fromkeys([self.config('plain').model.remat, 'none'])
    return [self.config('plain', **{'model.remat': r}) for r in remats]


def model_shape(cfg):
  """Returns the dict of cfg's shape that the page describes (width, depth, heads, ...)."""
  m = cfg.model
  return dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
              n_kv_heads=m.n_kv_heads, segment_len=m.segment_len, vocab=m.vocab_size,
              dtype=m.dtype, attention=m.attention_impl,
              xla_options=cfg.train.xla_options)


def init_model(cfg):
  """Returns cfg's model, initialised."""
  from training.state import model_ctor
  return model_ctor(cfg)()


def state_bytes(layer_states, batch):
  """Returns the bytes of a decode state per sequence of the batch."""
  return sum(x.nbytes for x in jax.tree.leaves(layer_states)) // batch
