"""Small building blocks: parameters with logical axes, RMSNorm, SwiGLU MLP, RoPE."""
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P

# Sharding is applied by the trainer (jit out_shardings from these annotations), not at
# variable creation, so models build the same way with or without a mesh.
nnx.use_eager_sharding(False)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def param(rngs, shape, axes, *, scale=None, init='normal', dtype=jnp.float32):
  """A Param annotated with logical axis names (one per dim). Normal init, std = scale."""
  assert len(shape) == len(axes), (shape, axes)
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    value = scale * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(axes))


def constrain(x, axes):
  """Sharding constraint on an activation by logical axis names.

  A no-op unless a mesh is set (`jax.set_mesh`) and logical axis rules are active
  (`nnx.logical_axis_rules`), so the same model code runs on one CPU or a pod.
  """
  rules = core_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  table, used, spec = dict(rules), set(), []
  for a in axes:            # a mesh axis shards one dimension: the first that claims it
    mesh_axes = table.get(a)
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    free = tuple(m for m in mesh_axes if m not in used)
    used.update(free)
    spec.append(free[0] if len(free) == 1 else (free or None))
  return jax.lax.with_sharding_constraint(x, P(*spec))


class RMSNorm(nnx.Module):

  def __init__(self, dim, *, eps=1e-6, rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ('norm',), init='ones')

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):

  def __init__(self, d_model, mlp_dim, *, rngs, dtype=jnp.float32):
    self.dtype = dtype
    s_in, s_out = d_model ** -0.5, mlp_dim ** -0.5
    self.w_gate = param(rngs, (d_model, mlp_dim), ('embed', 'mlp'), scale=s_in)
    self.w_up = param(rngs, (d_model, mlp_dim), ('embed', 'mlp'), scale=s_in)
    self.w_down = param(rngs, (mlp_dim, d_model), ('mlp', 'embed'), scale=s_out)

  def __call__(self, x_BxTxD):
    # Tokens flattened to one axis: the weight gradients are then plain [D, N] x [N, F]
    # matmuls. Contracting over (B, T) instead made XLA:CPU fuse the SiLU backward into
    # transposing copies, about a tenth of a width-512 training step on CPU.
    dt = self.dtype
    x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1]).astype(dt)
    g_NxF = jax.nn.silu(x_NxD @ self.w_gate[...].astype(dt))
    u_NxF = x_NxD @ self.w_up[...].astype(dt)
    return ((g_NxF * u_NxF) @ self.w_down[...].astype(dt)).reshape(x_BxTxD.shape)


def rope_scaling(model_cfg):
  """`model.rope_scaling` as the hashable tuple rope() takes (None for type 'none')."""
  s = model_cfg.get('rope_scaling')
  return None if not s or s.type == 'none' else tuple(sorted(s.items()))


def rope_inv_freq(h, theta, scaling=None):
  """Inverse frequencies [h/2]; `scaling` (see rope_scaling) as in HF 'linear' / 'llama3'."""
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  s = dict(scaling or ())
  if s.get('type') == 'linear':
    inv_freq_F = inv_freq_F / s['factor']
  elif s.get('type') == 'llama3':   # Llama 3.1: stretch long wavelengths, keep short ones
    old = s['original_max_position_embeddings']
    lo, hi, factor = s['low_freq_factor'], s['high_freq_factor'], s['factor']
    wavelen_F = 2 * jnp.pi / inv_freq_F
    smooth_F = (old / wavelen_F - lo) / (hi - lo)
    mid_F = (1 - smooth_F) * inv_freq_F / factor + smooth_F * inv_freq_F
    inv_freq_F = jnp.where(wavelen_F > old / lo, inv_freq_F / factor,
                           jnp.where(wavelen_F < old / hi, inv_freq_F, mid_F))
  return inv_freq_F


def rope(x_BxTxNxH, pos_BxT, theta=10000.0, scaling=None):
  """Rotary embedding, Llama 'rotate_half' convention, absolute integer positions."""
  h = x_BxTxNxH.shape[-1]
  inv_freq_F = rope_inv_freq(h, theta, scaling)
  ang_BxTxF = pos_BxT.astype(jnp.float32)[..., None] * inv_freq_F
  ang_BxTx1xH = jnp.concatenate([ang_BxTxF, ang_BxTxF], -1)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  y = x * jnp.cos(ang_BxTx1xH) + rotated * jnp.sin(ang_BxTx1xH)
  return y.astype(x_BxTxNxH.dtype)
