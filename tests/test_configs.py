"""Every shipped config loads, validates and resolves its mesh / sharding rules."""

import glob
import re
import importlib.util
import os

import jax
import pytest

from conftest import ROOT
from fedjax_lm import config_lib
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib

CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_validates_and_is_locked(path):
  config = load(path)
  config_lib.validate(config)
  model_lib.ModelConfig.from_config(config.model)
  with pytest.raises(AttributeError):
    config.inner.lr = 1.0  # a typo'd key must not be silently added


def test_default_config_contract():
  c = load(os.path.join(ROOT, "configs", "shakespeare.py"))
  assert (c.algorithm, c.islands.num, c.launch.processes, c.outer.optimizer) == (
      "islands", 2, 2, "diloco")  # the README's first command: DiLoCo, one process per island
  assert mesh_lib.mesh_shape(dict(c.mesh), 2) == (2, 1, 1, 1)
  assert c.total_steps // c.outer.sync_every >= 4  # several syncs in a first run
  for key in ("total_steps", "seed", "log_every", "eval_every", "checkpoint_every"):
    assert key in c
  assert c.inner.optimizer == "adamw" and c.inner.learning_rate > 0


def test_diloco_config_is_two_islands_of_two_devices():
  c = load(os.path.join(ROOT, "configs", "shakespeare_diloco.py"))
  assert (c.algorithm, c.islands.num, c.outer.sync_every, c.outer.optimizer) == (
      "islands", 2, 50, "diloco")
  assert mesh_lib.mesh_shape(dict(c.mesh), c.launch.processes) == (2, 2, 1, 1)


def test_c4_150m_resolves_on_its_cluster_mesh():
  """The realistic config: ~150M params whose shardings divide on its 32-device mesh, and the
  whole islands state builds (abstractly) on a scaled-down 4-device mesh."""
  c = load(os.path.join(ROOT, "configs", "c4_150m.py"))
  model_cfg = model_lib.ModelConfig.from_config(c.model)
  _, abstract = model_lib.build(model_cfg)
  assert 140e6 < model_lib.count_params(abstract) < 170e6
  sizes = dict(zip(mesh_lib.MESH_AXES, mesh_lib.mesh_shape(dict(c.mesh), 32)))
  specs = mesh_lib.param_specs(model_lib.logical_axes(model_cfg), dict(c.rules))
  mesh_lib.check_divisible(abstract, specs, sizes)
  assert specs["w_gate"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

  c.unlock()
  c.mesh.update({"island": 2, "data": 1, "fsdp": 2, "tensor": 1})
  mesh = mesh_lib.make_mesh(dict(c.mesh), jax.devices()[:4])
  alg = engine.build(c, mesh, model_cfg)
  state = jax.eval_shape(alg.init, jax.random.key(0))
  assert state.islands.params["wq"].shape == (2, 12, 768, 12, 64)
  shard = alg.state_shardings.islands.params["wq"].shard_shape((2, 12, 768, 12, 64))
  assert shard == (1, 12, 384, 12, 64)


def test_indivisible_sharding_is_one_clear_error():
  c = load(os.path.join(ROOT, "configs", "c4_150m.py"))
  model_cfg = model_lib.ModelConfig.from_config(c.model)
  _, abstract = model_lib.build(model_cfg)
  specs = mesh_lib.param_specs(model_lib.logical_axes(model_cfg), dict(c.rules))
  with pytest.raises(ValueError, match=r"attn_norm.*768 is not divisible.*7 devices"):
    mesh_lib.check_divisible(abstract, specs, {"island": 1, "data": 1, "fsdp": 7, "tensor": 1})


def test_readme_is_short_and_its_commands_name_real_configs():
  """The README stays a page a newcomer acts on: at most 200 lines, clone to a DiLoCo run in the
  first 40, and every ``--config configs/X.py`` it prints exists."""
  lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
  assert len(lines) <= 200, len(lines)
  head = "\n".join(lines[:40])
  assert "git clone" in head and "--config configs/shakespeare_diloco.py" in head
  for name in set(re.findall(r"--config (configs/\w+\.py)", "\n".join(lines))):
    assert os.path.exists(os.path.join(ROOT, name)), name


def test_base_config_sections_and_their_defaults():
  """One builder per section (config_lib._islands, ...); the faults section is all off."""
  c = config_lib.base_config()
  assert {k for k in c.keys() if hasattr(c[k], "keys")} == {
      "islands", "outer", "inner", "data", "model", "mesh", "rules", "launch", "faults"}
  assert dict(c.faults) == {"kill": "", "nonfinite": "", "record_batches": False,
                            "mtbf_steps": 0.0, "random_roles": "", "seed": 0}
  assert (c.islands.num, c.outer.sync_every, c.inner.optimizer, c.data.seq_len,
          c.launch.mode) == (1, 50, "adamw", 256, "local")


@pytest.mark.parametrize("dotted,message", [
    ({"algorithm": "fsdp"}, "algorithm='fsdp': expected one of"),
    ({"eval_every": 0}, "eval_every=0 must be positive"),
    ({"data.seq_len": 4096}, "data.seq_len=4096 exceeds model.max_len="),
    ({"launch.mode": "slurm"}, "launch.mode='slurm': expected local, cluster, none or decoupled"),
    ({"launch.mode": "decoupled"}, "launch.mode=decoupled needs algorithm=islands"),
    ({"launch.heartbeat_seconds": 0}, "launch.heartbeat_seconds=0 must be >= 1"),
    ({"launch.syncer_send_slots": 0}, "launch.syncer_send_slots=0 must be >= 1"),
    ({"launch.norm_bound": 0.5}, "launch.norm_bound=0.5 must be 0 (off) or > 1"),
    ({"launch.norm_window": 0}, "launch.norm_window=0 must be >= 1"),
    ({"launch.mode": "decoupled", "algorithm": "islands", "outer.transport": "host"},
     "outer.transport='host' has no meaning with launch.mode=decoupled"),
    ({"launch.mode": "decoupled", "algorithm": "islands", "outer.policy": "async",
      "outer.eager": True, "outer.overlap": 1}, "outer.eager needs outer.policy=sync"),
    ({"faults.kill": "island@3"}, "faults.kill='island@3': expected 'ROLE@STEP' items"),
])
def test_validate_names_the_first_bad_value_of_each_section(dotted, message):
  c = load(os.path.join(ROOT, "configs", "tiny.py"))
  c.unlock()
  config_lib.override(c, dotted)
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    config_lib.validate(c)
