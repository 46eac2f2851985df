"""Device meshes and placing host-local batches on them.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism
whose devices also split large frozen weights). A batch is split over *all* devices, i.e.
over both axes, so adding FSDP never shrinks the per-device batch. Meshes are built with
explicit ``AxisType.Auto`` (the compiler propagates shardings; no ``pmap``).

Multi-host: every process builds the same global mesh (``jax.devices()`` lists all
devices) and feeds its own rows of each global batch; ``shard_batch`` assembles them with
``jax.make_array_from_process_local_data``. Process ``p`` holds rows
``[p * B / P, (p + 1) * B / P)`` of a global batch of ``B`` rows (see ``ilm_jax.data.pipeline``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ('data', 'fsdp') mesh with ``AxisType.Auto`` axes.

  Args:
    data: size of the data axis; -1 = all devices not used by ``fsdp``.
    fsdp: size of the fsdp axis.
    devices: devices to use (default ``jax.devices()``, i.e. every process's devices).

  Returns:
    A Mesh of shape (data, fsdp).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices; "
                     "use data=-1 to take the rest")
  return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading (batch) dim is split over every mesh axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXES, *([None] * (ndim - 1))))


def local_batch_size(global_batch: int, process_count: int | None = None) -> int:
  """Rows of a global batch that one process feeds; checks divisibility."""
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} "
                     "processes")
  return global_batch // process_count


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
  """Places one process's rows of a batch on the mesh as global ``jax.Array``s.

  Array leaves (numpy, leading dim = local batch) become global arrays whose leading dim is
  ``local * process_count``, sharded over every mesh axis. Non-array leaves (the batch
  ``kind`` string) pass through unchanged.

  Args:
    batch: flat dict of host-local numpy arrays (and plain python values).
    mesh: the mesh from ``make_mesh``.

  Returns:
    The same dict with arrays replaced by global, batch-sharded ``jax.Array``s.
  """
  out = {}
  for key, value in batch.items():
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value) >= 1:
      out[key] = jax.make_array_from_process_local_data(
          batch_sharding(mesh, np.ndim(value)), np.asarray(value))
    else:
      out[key] = value
  return out


# ----------------------------------------------------------------------------------------
# Logical axis rules and the trainable filter.
# ----------------------------------------------------------------------------------------
#
# Params carry logical axis names in their ``out_sharding`` metadata (``with_logical``);
# a rules table (data, not code) maps each logical name to mesh axes. Mesh axes that the
# mesh lacks are dropped, so one table serves a (data,) mesh, a (data, fsdp) mesh and a
# mesh with a ``tensor`` axis. A dim whose size the mesh axes do not divide stays
# replicated (small heads and biases), so a rule never makes a model unplaceable.

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default: the batch over every data-parallel axis; weights FSDP-sharded along 'embed'
# (frozen LLM weights are the large ones), everything else replicated. 'tensor' entries
# only take effect on meshes that have a 'tensor' axis.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("queries", None),
    ("length", None),
    ("cf", None),
)

# Logical rules that replicate every weight (Q-Former-sized models on a data-parallel
# mesh: FSDP gathers cost more than the memory they save).
REPLICATED_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    *((name, None) for name, _ in DEFAULT_RULES if name != "batch"),
)


def with_logical(initializer, names: Sequence[str | None]):
  """Wraps a param initializer so the param carries logical axis ``names``.

  Eager sharding is switched off for the param: models are built anywhere (tests, host
  memory, ``nnx.eval_shape``) and placed on a mesh by ``shard_model`` / ``place_state``.
  Plain ``nnx.with_partitioning`` would demand an active mesh at construction time.

  Args:
    initializer: a ``jax.nn.initializers`` style ``(key, shape, dtype) -> array``.
    names: one logical name (or None) per array dim, e.g. ``('embed', 'mlp')``.

  Returns:
    An initializer for ``nnx.Linear(kernel_init=...)`` and friends.
  """
  from flax import nnx  # noqa: PLC0415  (keeps the mesh helpers importable without flax)
  return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)


def logical_param(value, names: Sequence[str | None]):
  """An ``nnx.Param`` holding ``value`` with logical axis ``names`` (see ``with_logical``)."""
  from flax import nnx  # noqa: PLC0415
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_to_spec(names: Sequence[str | None] | None, mesh: Mesh, rules: LogicalRules,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec on ``mesh``.

  Example: names ('embed', 'mlp'), rules (('embed', 'fsdp'), ('mlp', 'tensor')) on a
  ('data', 'fsdp') mesh of shape (2, 4) and shape (384, 1536) -> P('fsdp', None): 'tensor'
  is not a mesh axis, so 'mlp' stays replicated.

  Args:
    names: one logical name (or None) per dim; None or () = replicated.
    mesh: the target mesh.
    rules: (logical name, mesh axis | tuple of mesh axes | None) pairs. A logical name
      missing from the rules is an error (a typo would silently replicate a huge weight).
    shape: the array shape; when given, a dim the chosen mesh axes do not divide is
      replicated instead.

  Returns:
    A PartitionSpec with one entry per dim.
  """
  if not names:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for d, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
    axes = table[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    # A mesh axis may shard only one dim; later dims lose it (jax would reject the spec).
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or (shape is not None and shape[d] % size):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """NamedShardings for every Variable of an ``nnx.State`` (abstract or concrete).

  Args:
    state: an ``nnx.State`` (e.g. from ``nnx.split(nnx.eval_shape(...))``).
    mesh: the target mesh.
    rules: logical axis rules (``DEFAULT_RULES``, ``REPLICATED_RULES`` or your own).

  Returns:
    A tree of the same structure whose Variables hold ``NamedSharding``s.
  """
  from flax import nnx  # noqa: PLC0415

  def one(v):
    if isinstance(v, nnx.Variable):
      value = v.get_value()
      shape = getattr(value, "shape", None)
      names = v.get_metadata().get("out_sharding")
      return v.replace(NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model_fn, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
  """Builds ``model_fn()`` directly in its sharded layout (shapes first, then a jitted init).

  ``nnx.eval_shape`` gives shapes and logical names without allocating; a jitted init with
  ``out_shardings`` then materialises each param already sharded, so no device ever
  holds a full copy of an FSDP weight. Use ``place_state`` instead when ``model_fn``
  loads large pretrained arrays from disk (they would become jit constants).

  Args:
    model_fn: zero-argument callable returning an ``nnx.Module``.
    mesh: the target mesh.
    rules: logical axis rules.

  Returns:
    The module, its arrays placed on ``mesh``.
  """
  from flax import nnx  # noqa: PLC0415
  abstract = nnx.eval_shape(model_fn)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)

  @jax.jit
  def init():
    return nnx.split(model_fn())[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def place_state(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """``jax.device_put`` of a module's (or state's) arrays into their rule shardings.

  Args:
    tree: an ``nnx.Module`` or ``nnx.State`` with concrete arrays (host or device).
    mesh: the target mesh.
    rules: logical axis rules.

  Returns:
    The same kind of object, arrays placed on ``mesh``.
  """
  from flax import nnx  # noqa: PLC0415
  if isinstance(tree, nnx.Module):
    graphdef, state = nnx.split(tree)
    return nnx.merge(graphdef, place_state(state, mesh, rules))
  return jax.device_put(tree, state_shardings(tree, mesh, rules))


class TrainableFilterError(ValueError):
  """A frozen pattern covers no parameter, or the filter leaves nothing to train."""


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined string of an nnx state path, e.g. ``'encoder/layers/0/attn/kernel'``."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_filter(frozen: Sequence[str] = ()):
  """The one filter that decides what trains (grads, optimizer state, checkpoint, counts).

  A variable is trainable iff it is an ``nnx.Param`` and its path (``path_str``) matches
  none of the ``frozen`` regexes (``re.search``, so ``'^llm/'`` freezes the whole LLM and
  ``'cf_(user|item)_table'`` the CF tables wherever they sit). Everything else — frozen
  params and non-Param variables (RNG counters, caches) — is frozen: the step reads it
  but never updates it, it has no optimizer state and is not checkpointed (it is rebuilt
  by the model constructor / reloaded from its source).

  Args:
    frozen: regexes over param paths (a config list, e.g. ``config.train.frozen``).

  Returns:
    An ``nnx`` filter (callable ``(path, value) -> bool``) selecting trainable params.
  """
  import re  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415
  regexes = [re.compile(p) for p in frozen]

  def is_trainable(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    s = path_str(path)
    return not any(r.search(s) for r in regexes)

  is_trainable.frozen_patterns = tuple(frozen)  # type: ignore[attr-defined]
  return is_trainable


def split_trainable(model, frozen: Sequence[str] = ()):
  """``nnx.split`` of ``model`` into (graphdef, trainable state, frozen state).

  Checks the config: a frozen pattern that matches no param is an error (a typo would
  otherwise train the LLM), and so is a filter that leaves nothing trainable.

  Args:
    model: an ``nnx.Module`` (concrete or from ``nnx.eval_shape``).
    frozen: regexes as in ``trainable_filter``.

  Returns:
    (graphdef, trainable ``nnx.State``, frozen ``nnx.State``).
  """
  import re  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415
  graphdef, trainable, rest = nnx.split(model, trainable_filter(frozen), ...)
  param_paths = [path_str(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  for pattern in frozen:
    if not any(re.search(pattern, s) for s in param_paths):
      raise TrainableFilterError(
          f"frozen pattern {pattern!r} matches no parameter; params look like "
          f"{param_paths[:5]}")
  if not jax.tree.leaves(trainable):
    raise TrainableFilterError(f"frozen patterns {list(frozen)} leave no trainable parameter")
  return graphdef, trainable, rest


def param_counts(trainable: Any, frozen: Any) -> dict[str, int]:
  """Element counts of the trainable and frozen states (the parameter-count log line)."""
  def count(tree):
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
  return {"trainable": count(trainable), "frozen": count(frozen)}
