"""Methods are plugins (models/registry.py): a mixer and an eviction policy defined in this
file alone, registered here, validate, train and decode through the library's own paths
(training/loop.py train, the code path of train.py; training/run.py load_run and
training/policy.py make_policy, the code path of evaluate.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from conftest import tiny_config
from models import decode, registry
from models.layers import param


@struct.dataclass
class MeanState(registry.LayerState):
  sum_BxD: jax.Array           # running sum of the projected inputs
  count_B: jax.Array


class CausalMean(nnx.Module):
  """y_t = mean over s <= t of x_s W (W scaled by model.toy_mean.scale): a recurrent mixer
  whose state is constant in the context length."""

  def __init__(self, cfg, *, rngs):
    D = cfg.d_model
    self.w = param(rngs, (D, D), ('embed', 'norm'), scale=cfg.toy_mean.scale * D ** -0.5)

  def init_state(self, batch, capacity):
    D = self.w.shape[0]
    return MeanState(jnp.zeros((batch, D)), jnp.zeros((batch,)))

  def flops_per_token(self, seq_len):
    return 0

  def __call__(self, x_BxTxD, state, pos_BxT, *, policy=None, tokens_BxT=None):
    T = x_BxTxD.shape[1]
    sum_BxTxD = state.sum_BxD[:, None] + jnp.cumsum(x_BxTxD @ self.w[...], 1)
    count_BxT = state.count_B[:, None] + jnp.arange(1, T + 1)
    y = (sum_BxTxD / count_BxT[..., None]).astype(x_BxTxD.dtype)
    return y, MeanState(sum_BxTxD[:, -1], count_BxT[:, -1])


def validate_mean(cfg):
  registry.check(cfg.model.toy_mean.scale > 0, 'model.toy_mean.scale',
                 f'must be > 0, got {cfg.model.toy_mean.scale}')


@struct.dataclass
class SinkWindow:
  """Keeps the first `sink` positions and the `window` newest (StreamingLLM's rule)."""
  sink: int = struct.field(pytree_node=False, default=4)
  window: int = struct.field(pytree_node=False, default=8)

  def init(self, cache):
    return cache

  def keep(self, cache, probs_BxKxTxS, pos_BxT):
    newest_Bx1x1 = pos_BxT.max(-1)[:, None, None]
    return ((cache.pos_BxKxS < self.sink) | (cache.pos_BxKxS > newest_Bx1x1 - self.window)), cache


@pytest.fixture
def toy_methods():
  """The two methods registered for one test (other tests in the process do not see them)."""
  with registry.scope():
    registry.register_mixer('toy_mean', CausalMean, state=MeanState,
                            config={'model.toy_mean': dict(scale=1.0)}, validate=validate_mean)
    registry.register_policy('toy_sink', lambda cfg: SinkWindow(cfg.toy_sink.sink,
                                                                cfg.toy_sink.window),
                             config={'toy_sink': dict(sink=4, window=8)})
    yield


def test_a_registered_mixer_and_policy_validate_train_and_decode(toy_methods, tmp_path):
  from training.config import ConfigError, validate
  from training.loop import train
  from training.policy import make_policy
  from training.run import load_run
  cfg = tiny_config(**{'model.mixer': 'toy_mean,attention', 'train.steps': 6})
  assert cfg.model.toy_mean.scale == 1.0 and cfg.toy_sink.window == 8     # its keys, defaulted
  validate(cfg, 1)
  with pytest.raises(ConfigError, match=r'config.model.toy_mean.scale: must be > 0, got -1.0'):
    validate(tiny_config(**{'model.mixer': 'toy_mean', 'model.toy_mean.scale': -1.0}), 1)

  metrics = train(cfg, tmp_path)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['eval_loss'])

  run = load_run(tmp_path, overrides={'decode.policy': 'toy_sink'})
  model, policy = run.model(), make_policy(run.cfg)
  assert isinstance(policy, SinkWindow) and isinstance(model.blocks[0].mixer, CausalMean)
  assert float(jnp.abs(model.blocks[0].mixer.w[...]).max()) > 0
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
  # Without a policy, the chunked prefill carries the toy state: the full forward's logits.
  full = model(tokens)[0][:, -1]
  state = decode.init_state(model, 2, 40)
  last, state = decode.prefill(model, tokens, state, chunk=8)
  assert float(jnp.abs(last - full).max()) < 1e-4
  assert isinstance(state[0], MeanState) and not registry.is_kv_cache(state[0])
  assert np.asarray(state[0].count_B).tolist() == [40, 40]
  # Under the policy, the attention layer's cache keeps the sinks and the window only.
  out, state = decode.generate(model, tokens, jax.random.key(1), n_new=6, policy=policy)
  cache = state[1]
  assert registry.is_kv_cache(cache) and out.shape == (2, 46)
  kept = np.sort(np.asarray(cache.pos_BxKxS)[np.asarray(cache.valid_BxKxS)].reshape(-1, 12))
  assert (kept == [0, 1, 2, 3] + list(range(38, 46))).all()        # newest: position 45


def test_registrations_end_with_their_scope(toy_methods):
  assert 'toy_mean' in registry.mixers()
  with registry.scope():
    registry.register_policy('toy_other', lambda cfg: None, config={'toy_other': dict(a=1)})
  assert 'toy_other' not in registry.policies() and 'toy_other' not in registry.config_keys()
  assert 'toy_sink' in registry.policies()
