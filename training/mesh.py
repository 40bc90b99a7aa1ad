"""Device mesh from config, logical-axis rules, and sharded model creation."""
import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from training.config import mesh_shape

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')           # mesh axes the batch dimension is split over


def make_mesh(cfg, devices=None):
  devices = devices or jax.devices()
  sizes = mesh_shape(cfg.mesh, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_rules(cfg):
  return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in cfg.axis_rules)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh):
  return NamedSharding(mesh, P())


def sharded_init(ctor, mesh, rules):
  """Builds ctor()'s NNX objects directly sharded on `mesh` by their logical annotations.

  Returns (graphdef, state, shardings): nothing is materialised unsharded on one device.
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, abs_state = nnx.split(nnx.eval_shape(ctor))
    shardings = nnx.get_named_sharding(abs_state, mesh)
    state = jax.jit(lambda: nnx.split(ctor())[1], out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_state(ctor, mesh, rules):
  """(graphdef, abstract state with target shardings): for restoring onto any mesh."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, abs_state = nnx.split(nnx.eval_shape(ctor))
    shardings = nnx.get_named_sharding(abs_state, mesh)
  return graphdef, abstract(abs_state, shardings), shardings


def abstract(tree, shardings):
  """Shape / dtype structs of `tree`'s arrays with these target shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)
