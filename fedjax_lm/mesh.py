"""Device mesh and logical-to-mesh sharding rules.

The mesh always has the axes ``("island", "data", "fsdp", "tensor")``, ``island`` outermost: on a
multi-slice / multi-node system it is the axis over the slow link, so devices are ordered by
process (host) before being laid out. Axes are ``AxisType.Auto`` (classic GSPMD propagation);
the train steps pass explicit in/out shardings.

Parameters carry logical axis names (see :mod:`fedjax_lm.model`); ``rules`` (from the config)
map each logical name to a mesh axis, a tuple of mesh axes, or ``None`` (replicated).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("island", "data", "fsdp", "tensor")
IN_ISLAND_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows inside one island are split over these


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the config's axis sizes (one may be -1: 'the rest') against the device count."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Impossible mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, "
                     "with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"Impossible mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices "
                       f"are not divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    fix = " ".join(f"--config.mesh.{a}={s * num_devices // math.prod(sizes)}"
                   for a, s in zip(MESH_AXES, sizes)
                   if s > 1 and (s * num_devices) % math.prod(sizes) == 0 and
                   s * num_devices // math.prod(sizes) >= 1)
    hint = (f"; for {num_devices} device(s) set e.g. {fix.split(' ')[-1]}" if fix else
            f"; set the mesh.* sizes to multiply to {num_devices} (one may be -1)")
    raise ValueError(f"Impossible mesh {dict(zip(MESH_AXES, sizes))}: product "
                     f"{math.prod(sizes)} != {num_devices} devices{hint}")
  return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axis_sizes, len(devices))
  # Order by (process, id) so the outer `island` axis splits hosts first, never a host's devices.
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, Any]) -> P:
  """Logical names of one array -> PartitionSpec; a mesh axis is used at most once."""
  used: set[str] = set()
  spec = []
  for name in names:
    if name is not None and name not in rules:
      raise ValueError(f"No sharding rule for logical axis {name!r}; rules: {dict(rules)}")
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    bad = [a for a in axes if a not in IN_ISLAND_AXES]
    if bad:
      raise ValueError(f"Rule {name!r} -> {target!r} names {bad}: parameters may only be sharded "
                       f"inside an island, over {IN_ISLAND_AXES}")
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_specs(axes_tree: Any, rules: Mapping[str, Any]) -> Any:
  return jax.tree.map(lambda names: logical_to_spec(names, rules), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def check_divisible(abstract: Any, specs: Any, axis_sizes: Mapping[str, int]) -> None:
  """Every sharded dim must divide by its mesh axes' product; one error naming the param."""
  flat_abstract = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(flat_abstract, flat_specs):
    for dim, entry in zip(leaf.shape, spec):
      axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
      size = math.prod(axis_sizes[a] for a in axes)
      if dim % size:
        raise ValueError(f"Parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
                         f"sharded as {spec}: dim {dim} is not divisible by {axes} = {size} "
                         "devices; change the mesh or the sharding rules")


def zero_spec(spec: P, shape: Sequence[int], mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> P:
  """Adds the (unused) ``axes`` to the largest divisible dim, then ``tensor`` the same way:
  ZeRO-style sharding of state that the island's devices would otherwise each hold whole
  (global params, outer state). Without the second pass a leaf the model does not split over
  ``tensor`` (a norm scale) stays one shard held, and sent across islands, by every tensor
  device."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for group in (tuple(axes), ("tensor",)):
    entries = _add_axes(entries, shape, mesh, group)
  return P(*entries)


def _add_axes(entries: list, shape: Sequence[int], mesh: Mesh, axes: tuple) -> list:
  """``entries`` with the unused ``axes`` (all of them, or none) on the largest dim that
  divides by its current sharding times theirs."""
  used = {a for e in entries if e for a in ((e,) if isinstance(e, str) else e)}
  extra = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
  if not extra:
    return entries
  factor = math.prod(mesh.shape[a] for a in extra)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    current = entries[dim]
    cur_axes = () if current is None else ((current,) if isinstance(current, str) else current)
    cur = math.prod(mesh.shape[a] for a in cur_axes)
    if shape[dim] % (cur * factor) == 0:
      entries = list(entries)
      entries[dim] = cur_axes + extra if cur_axes else (extra[0] if len(extra) == 1 else extra)
      return entries
  return entries


def with_leading(spec: P, axis: str | None) -> P:
  """Spec of a stacked array [M, ...] whose leading dim is sharded over ``axis``."""
  return P(axis, *spec)


def shardings(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_spec() -> P:
  """Batches are [islands, rows, ...]: islands over `island`, rows over data x fsdp."""
  return P("island", BATCH_AXES)


def activation_rows(mesh: Mesh) -> NamedSharding | None:
  """The residual stream's ``[B, T, D]`` rows over the island's data x fsdp devices (under the
  islands' vmap the island dim is added), or None where those axes have one device (nothing
  to split; programs stay as they were)."""
  if math.prod(mesh.shape[a] for a in BATCH_AXES) == 1:
    return None
  return NamedSharding(mesh, P(BATCH_AXES, None, None))


def opt_state_specs(tx, abstract_params, param_specs):
  """Specs of ``tx``'s state: a leaf whose key path ends with a parameter's path and has its
  shape takes that parameter's spec (moments, momenta); anything else (counts) is replicated.
  (``optax.tree_map_params`` does this too, but not for partitioned optimizers like Muon.)"""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  by_path = {tuple(path): (leaf.shape, spec) for (path, leaf), spec in zip(params, flat_specs)}

  def spec_of(path, leaf):
    for n in range(len(path)):
      shape, spec = by_path.get(tuple(path[n:]), (None, None))
      if spec is not None and shape == leaf.shape:
        return spec
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, abstract_state)


def island_groups(num_islands: int, mesh: Mesh, requested: int = 0) -> int:
  """How many groups the simulated path (island axis 1, every island on each device) runs its
  M islands in: separate vmapped programs, which XLA:CPU runs concurrently, one per core
  (measured at the default config on 2 cores: 1,077 against 1,138 ms per M=2 step as one vmap,
  and the numerics of one island per core). ``requested`` > 0 asks for that many; 0 means one
  per core the process may use (1 when XLA:CPU is single-threaded, or on another backend). The
  result divides M; 1 whenever the island axis is sharded (slicing it would move islands)."""
  import os  # pylint: disable=g-import-not-at-top
  if mesh.shape["island"] != 1 or num_islands < 2:
    return 1
  if requested > 0:
    groups = requested
  elif (jax.default_backend() != "cpu" or
        "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", "")):
    return 1
  else:
    groups = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  groups = max(1, min(int(groups or 1), num_islands))
  while num_islands % groups:
    groups -= 1
  return groups


def vmap_islands(fn, groups: int = 1, in_axes: Any = 0):
  """``jax.vmap(fn, in_axes, spmd_axis_name="island")`` over the leading island dim, run as
  ``groups`` independent vmaps over equal slices of it (see :func:`island_groups`)."""
  step = jax.vmap(fn, in_axes=in_axes, spmd_axis_name="island")
  if groups == 1:
    return step

  def run(*args):
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    n = jax.tree.leaves([a for a, ax in zip(args, axes) if ax == 0])[0].shape[0] // groups
    part = lambda i: [jax.tree.map(lambda x, i=i: x[i * n:(i + 1) * n], a) if ax == 0 else a
                      for a, ax in zip(args, axes)]
    outs = [step(*part(i)) for i in range(groups)]
    return jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *outs)

  return run
