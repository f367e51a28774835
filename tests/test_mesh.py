"""Mesh shapes, axis order/types, logical-to-mesh rules and ZeRO-style specs (no execution)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from fedjax_lm import config_lib
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib


# ------------------------------------------------------------------------------- mesh_shape

@pytest.mark.parametrize("sizes, devices, expected", [
    ({"island": 1, "data": -1, "fsdp": 1, "tensor": 1}, 4, (1, 4, 1, 1)),
    ({"data": 2, "tensor": -1}, 8, (1, 2, 1, 4)),
    ({"island": -1, "data": 2, "fsdp": 3}, 12, (2, 2, 3, 1)),
    ({"island": 2, "data": 1, "fsdp": 2, "tensor": 2}, 8, (2, 1, 2, 2)),
    ({}, 1, (1, 1, 1, 1)),  # missing axes default to 1
    ({"fsdp": -1}, 1, (1, 1, 1, 1)),
])
def test_mesh_shape_resolves(sizes, devices, expected):
  assert mesh_lib.mesh_shape(sizes, devices) == expected


def test_mesh_shape_accepts_config_dict():
  mesh_cfg = config_lib.base_config().mesh  # island 1, data -1, fsdp 1, tensor 1
  assert mesh_lib.mesh_shape(mesh_cfg, 4) == (1, 4, 1, 1)


@pytest.mark.parametrize("sizes, devices", [
    ({"data": 3}, 4),  # product 3 != 4
    ({"data": 2, "tensor": 2}, 8),  # product 4 != 8
    ({}, 4),  # product 1 != 4
    ({"data": 3, "tensor": -1}, 4),  # 4 not divisible by 3
    ({"data": 8, "tensor": -1}, 4),  # fixed product larger than the device count
    ({"data": 0, "tensor": -1}, 4),  # zero size
    ({"data": 0}, 0),
    ({"data": -2, "tensor": -1}, 4),  # negative size other than -1
    ({"data": -1, "fsdp": -1}, 4),  # two -1s
])
def test_mesh_shape_rejects_impossible(sizes, devices):
  with pytest.raises(ValueError, match="Impossible mesh"):
    mesh_lib.mesh_shape(sizes, devices)


def test_mesh_shape_rejects_unknown_axis():
  with pytest.raises(ValueError, match="pipeline"):
    mesh_lib.mesh_shape({"data": 2, "pipeline": 2}, 4)


# -------------------------------------------------------------------------------- make_mesh

def test_make_mesh_axis_order_types_and_device_order():
  devices = list(reversed(jax.devices()[:4]))
  mesh = mesh_lib.make_mesh({"island": 1, "data": 2, "fsdp": 1, "tensor": -1}, devices)
  assert mesh.axis_names == ("island", "data", "fsdp", "tensor")
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert tuple(mesh.axis_types) == (AxisType.Auto,) * 4
  assert dict(mesh.shape) == {"island": 1, "data": 2, "fsdp": 1, "tensor": 2}
  assert mesh.devices.shape == (1, 2, 1, 2)
  # Devices are laid out by (process, id) whatever order they were passed in.
  ids = [d.id for d in mesh.devices.flatten()]
  assert ids == sorted(d.id for d in jax.devices()[:4])


def test_make_mesh_rejects_bad_shape():
  with pytest.raises(ValueError, match="Impossible mesh"):
    mesh_lib.make_mesh({"data": 3}, jax.devices()[:4])


# -------------------------------------------------------------------------- logical_to_spec

def test_logical_to_spec_basic():
  rules = {"vocab": "tensor", "embed": "fsdp", "head_dim": None}
  assert mesh_lib.logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
  assert mesh_lib.logical_to_spec(("embed", None, "head_dim"), rules) == P("fsdp", None, None)
  assert mesh_lib.logical_to_spec((), rules) == P()


def test_logical_to_spec_never_uses_a_mesh_axis_twice():
  rules = {"a": "tensor", "b": "tensor", "c": ("data", "fsdp"), "d": ("fsdp", "tensor"),
           "e": "fsdp"}
  assert mesh_lib.logical_to_spec(("a", "b"), rules) == P("tensor", None)
  assert mesh_lib.logical_to_spec(("c", "d"), rules) == P(("data", "fsdp"), "tensor")
  assert mesh_lib.logical_to_spec(("e", "c"), rules) == P("fsdp", "data")
  assert mesh_lib.logical_to_spec(("d", "c", "a"), rules) == P(("fsdp", "tensor"), "data", None)


def _mesh_axes_of(spec):
  out = []
  for entry in spec:
    if entry is None:
      continue
    out.extend((entry,) if isinstance(entry, str) else entry)
  return out


def test_model_specs_use_each_mesh_axis_at_most_once():
  """Even with rules that map several logical names to one axis (e.g. heads and head_dim)."""
  rules = dict(config_lib.base_config().rules)
  rules.update({"head_dim": "tensor", "layers": "fsdp"})
  axes = model_lib.logical_axes(model_lib.ModelConfig())
  specs = mesh_lib.param_specs(axes, rules)
  for name, spec in specs.items():
    used = _mesh_axes_of(spec)
    assert len(used) == len(set(used)), (name, spec)
    assert len(spec) == len(axes[name])
  # layers is first, so it takes fsdp; embed (fsdp) is then replicated.
  assert specs["wq"] == P("fsdp", None, "tensor", None)


def test_logical_to_spec_rejects_missing_rule():
  with pytest.raises(ValueError, match="'experts'"):
    mesh_lib.logical_to_spec(("embed", "experts"), {"embed": "fsdp"})


@pytest.mark.parametrize("target", ["island", ("data", "island"), "pipeline"])
def test_logical_to_spec_rejects_rule_outside_island(target):
  bad = target if isinstance(target, str) else "island"
  with pytest.raises(ValueError, match=bad):
    mesh_lib.logical_to_spec(("embed",), {"embed": target})


# -------------------------------------------------------------------------------- zero_spec

@pytest.fixture(scope="module")
def mesh_d2t2():
  return mesh_lib.make_mesh({"island": 1, "data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])


@pytest.mark.parametrize("spec, shape, expected", [
    # Largest divisible dim gets "data" (fsdp has size 1, so it is not added), then "tensor"
    # (unused by these leaves) joins the largest dim that still divides.
    (P(), (8, 6), P(("data", "tensor"), None)),
    (P(None, None), (3, 6), P(None, "data")),  # 6 does not divide by 2 x 2, 3 not by 2
    (P(), (3, 7, 4), P(None, None, ("data", "tensor"))),  # 7 and 3 are odd: the 4 takes it
    (P(), (4, 4), P(("data", "tensor"), None)),  # tie: first dim
    (P(), (2,), P("data")),
    (P(), (6, 2), P("data", "tensor")),
    # Indivisible shapes are left alone (only padded to full length).
    (P(), (5, 3), P(None, None)),
    (P(), (1,), P(None)),
    (P(), (), P()),
    # Already sharded over "data": only tensor is added.
    (P("data", None), (8, 8), P(("data", "tensor"), None)),
    (P(None, ("tensor", "data")), (4, 8), P(None, ("tensor", "data"))),
    # Sharded over tensor: data joins it when the dim divides by 2 x 2 ...
    (P("tensor", None), (8, 2), P(("tensor", "data"), None)),
    # ... otherwise the next largest divisible dim takes it.
    (P("tensor", None), (6, 4), P("tensor", "data")),
    (P("tensor", None), (6, 3), P("tensor", None)),
])
def test_zero_spec_by_hand(mesh_d2t2, spec, shape, expected):
  assert mesh_lib.zero_spec(spec, shape, mesh_d2t2) == expected


def test_zero_spec_tensor_only_mesh_shards_what_tensor_does_not():
  """No batch axes to add: a leaf sharded over tensor is unchanged, one replicated over it (a
  norm scale) is sharded over it, so no two tensor devices hold (and send) the same shard."""
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 4}, jax.devices()[:4])
  assert mesh_lib.zero_spec(P("tensor", None), (8, 8), mesh) == P("tensor", None)
  assert mesh_lib.zero_spec(P(), (8, 8), mesh) == P("tensor", None)
  assert mesh_lib.zero_spec(P(), (6,), mesh) == P(None)


def test_zero_spec_data_and_fsdp_together():
  mesh = mesh_lib.make_mesh({"island": 1, "data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
  # Both unused batch axes are added to one dim that divides by 4.
  assert mesh_lib.zero_spec(P(), (6, 8), mesh) == P(None, ("data", "fsdp"))
  # fsdp already used: only data is added, to the largest dim that divides by its total.
  assert mesh_lib.zero_spec(P("fsdp", None), (8, 3), mesh) == P(("fsdp", "data"), None)
  assert mesh_lib.zero_spec(P("fsdp", None), (4, 6), mesh) == P("fsdp", "data")
  # Nothing divides by 4: unchanged.
  assert mesh_lib.zero_spec(P(), (6, 2), mesh) == P(None, None)


def test_batch_spec_and_with_leading():
  assert mesh_lib.batch_spec() == P("island", ("data", "fsdp"))
  assert mesh_lib.with_leading(P("fsdp", None), "island") == P("island", "fsdp", None)
  assert mesh_lib.with_leading(P("tensor"), None) == P(None, "tensor")


def test_check_divisible_names_the_param():
  abstract = {"w": jax.ShapeDtypeStruct((6, 4), "float32")}
  specs = {"w": P("fsdp", "tensor")}
  mesh_lib.check_divisible(abstract, specs, {"fsdp": 2, "tensor": 2, "data": 1, "island": 1})
  with pytest.raises(ValueError, match="'w'"):
    mesh_lib.check_divisible(abstract, specs, {"fsdp": 4, "tensor": 2, "data": 1, "island": 1})


def test_island_groups_divide_m_and_grouped_vmap_equals_one_vmap():
  one_device = mesh_lib.make_mesh({"island": 1, "data": 1}, jax.devices()[:1])
  assert mesh_lib.island_groups(8, one_device, requested=3) == 2  # the largest divisor <= 3
  assert mesh_lib.island_groups(6, one_device, requested=4) == 3
  assert mesh_lib.island_groups(1, one_device, requested=4) == 1
  assert mesh_lib.island_groups(4, one_device, requested=16) == 4
  island_axis_2 = types.SimpleNamespace(shape={"island": 2})  # slicing it would move islands
  assert mesh_lib.island_groups(4, island_axis_2, requested=2) == 1
  f = lambda w, x: jnp.tanh(x @ w).sum(-1)
  w = jax.random.normal(jax.random.key(0), (6, 5, 3))
  x = jax.random.normal(jax.random.key(1), (6, 4, 5))
  shared = jax.random.normal(jax.random.key(2), (5, 3))
  want = jax.vmap(f)(w, x)
  for groups in (1, 2, 3, 6):
    np.testing.assert_allclose(mesh_lib.vmap_islands(f, groups)(w, x), want, rtol=1e-6)
  np.testing.assert_allclose(mesh_lib.vmap_islands(f, 3, in_axes=(None, 0))(shared, x),
                             jax.vmap(f, in_axes=(None, 0))(shared, x), rtol=1e-6)


def test_impossible_mesh_names_the_override_that_fits():
  """The one-process DiLoCo command of a new user (mesh.data=2 kept from the config, one
  device) names the override to add."""
  with pytest.raises(ValueError, match=r"product 2 != 1 devices; .*--config\.mesh\.data=1"):
    mesh_lib.mesh_shape({"island": 1, "data": 2, "fsdp": 1, "tensor": 1}, 1)
