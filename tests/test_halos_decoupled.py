"""HALoS's tiers as decoupled processes (``fedjax_lm/decoupled/region.py``): regional syncers
whose members are islands under a global syncer whose members are the regions. Against the
timing model (:mod:`fedjax_lm.hierarchy`, itself checked against a numpy event loop of the
paper's box in test_halos.py), the run's tokens and bytes per tier, and who may talk to whom."""

import json
import os

import numpy as np
import pytest

from conftest import run_cli, tiny_config
from fedjax_lm import config_lib
from fedjax_lm import hierarchy
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import wire
from fedjax_lm.decoupled import region as region_lib
from fedjax_lm.decoupled import syncer as syncer_lib
from fedjax_lm.decoupled import validate

_HALOS = {"algorithm": "islands", "outer.policy": "async", "mesh.island": 1,
          "outer.halos_alpha": 0.5, "outer.halos_local_lr": 0.8,
          "outer.halos_local_momentum": 0.5, "outer.halos_local_every": 1,
          "outer.halos_global_lr": 0.7, "outer.halos_global_momentum": 0.5,
          "outer.halos_global_every": 1, "outer.sync_every": 2, "outer.halos_k": 2,
          "inner.warmup_steps": 0, "inner.min_lr_ratio": 1.0,
          "outer.dynamic_local_steps": False, "launch.heartbeat_seconds": 30}


def _args(over: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in over.items()]


def _run(tmp_path, over: dict) -> str:
  workdir = str(tmp_path / "run")
  out = run_cli(["--config", "configs/tiny.py", "--workdir", workdir,
                 "--config.launch.mode=decoupled", *_args(over)])
  logs = os.path.join(workdir, "logs")
  tails = {f: open(os.path.join(logs, f)).read()[-1500:] for f in os.listdir(logs)} \
      if os.path.isdir(logs) else {}
  assert out.returncode == 0, (out.stderr[-3000:], tails)
  return workdir


@pytest.mark.slow
def test_one_region_of_one_island_is_the_timing_model(tmp_path, data_dir):
  """An island, its regional syncer and the global syncer as three processes, the region's
  push held until the global params land (``launch.region_push=sync``: the timing model with
  no WAN delay): the island's per-step losses and the global syncer's final eval equal
  ``hierarchy.run(config, "halos")`` (rtol 2e-5), through two pushes of K = 2 arrivals and
  the final flush of the fifth."""
  over = {**_HALOS, "islands.num": 1, "outer.halos_regions": 1, "total_steps": 10,
          "eval_every": 10, "launch.region_push": "sync", "data.data_dir": data_dir}
  workdir = _run(tmp_path, over)
  config = tiny_config(**over)
  want = hierarchy.run(config, "halos")
  got = [r["island_loss"] for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "islands", "0", "metrics.jsonl"))]
  np.testing.assert_allclose(got, want.losses[0], rtol=2e-5)
  final = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
  assert final["step"] == 10
  np.testing.assert_allclose(final["eval_loss"], want.evals[-1]["eval_loss"], rtol=2e-5)
  gps = metrics_lib.read_jsonl(os.path.join(workdir, "updates.jsonl"))
  assert [u["local_steps"] for u in gps] == [4, 4, 2]  # K x H, K x H, the flush of one phase


@pytest.mark.slow
def test_two_regions_run_their_tokens_and_count_bytes_per_tier(tmp_path, data_dir):
  """2 regions x 2 islands, pushes in flight while the regions serve their islands: each
  regional syncer applies only its own islands' updates and exactly its share of the run's
  tokens ((M / R) x total_steps inner steps), the global syncer every push of each region
  (K = 2 arrivals since its last merge; at the end the flush of the arrivals since the last
  merge: the steps pushed and those folded into a merge add up to the run's tokens), each
  merged back; the evals on the run's step axis; the
  regions' payload bytes at the global syncer and the islands' are the parameter-sized
  float32 messages counted as sent."""
  total, h, k = 8, 2, 2
  over = {**_HALOS, "islands.num": 4, "outer.halos_regions": 2, "total_steps": total,
          "eval_every": 4, "data.data_dir": data_dir}
  workdir = _run(tmp_path, over)
  pushes, folded = {}, 0
  for r, members in ((0, {0, 1}), (1, {2, 3})):
    updates = metrics_lib.read_jsonl(os.path.join(workdir, "regions", str(r), "updates.jsonl"))
    assert {u["island"] for u in updates} == members
    assert sum(u["local_steps"] for u in updates) == 2 * total
    with open(os.path.join(workdir, "regions", str(r), "events.jsonl"), encoding="utf-8") as f:
      events = [json.loads(line) for line in f]
    pushes[r] = len([e for e in events if e["event"] == "region_merged"])
    folded += sum(e["folded_steps"] for e in events if e["event"] == "region_flushed")
  gps = metrics_lib.read_jsonl(os.path.join(workdir, "updates.jsonl"))
  # every push applied and merged back
  assert [sum(u["island"] == r for u in gps) for r in (0, 1)] == [pushes[0], pushes[1]]
  assert sum(u["local_steps"] for u in gps) + folded == 4 * total
  assert all(u["local_steps"] > 0 for u in gps)
  assert 1 <= pushes[0] <= 2 * total // (k * h) and 1 <= pushes[1] <= 2 * total // (k * h)
  evals = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  # (an eval step is reached by the steps pushed: those folded into a merge never reach it)
  assert evals[-1]["step"] == total and {e["step"] for e in evals} <= {4, 8}
  assert all(np.isfinite(e["eval_loss"]) for e in evals)
  param_bytes = 4 * sum(int(np.prod(shape)) for shape in _shapes(over))  # float32
  assert evals[-1]["island_bytes"] == len(gps) / 2 * param_bytes  # per region, its pushes
  for island in range(4):
    sent = metrics_lib.read_jsonl(os.path.join(workdir, "islands", str(island),
                                               "metrics.jsonl"))[-1]["island_bytes"]
    assert sent > 0 and sent % param_bytes == 0


def _shapes(over):
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  _, abstract = model_lib.build(model_lib.ModelConfig.from_config(tiny_config(**over).model))
  return [list(x.shape) for x in jax.tree.leaves(abstract)]


def test_each_tier_admits_only_its_own_members(tmp_path):
  """The global syncer's members are ``region/<r>`` (keys no island holds): an island's
  identity is refused there; a regional syncer serves its own islands only."""
  base = {**_HALOS, "islands.num": 4, "outer.halos_regions": 2, "launch.mode": "decoupled"}
  secret = b"s" * 32
  gps = syncer_lib.Syncer(tiny_config(**base, **{"launch.region": -1}), str(tmp_path / "g"),
                          secret)
  assert gps.keys("region/1") == wire.derive(secret, "region/1")
  assert gps.keys("island/0") is None and gps.keys("region/2") is None
  lps = syncer_lib.Syncer(tiny_config(**base, **{"launch.region": 1}), str(tmp_path / "r"),
                          secret)
  assert lps.keys("island/2") is not None and lps.keys("island/3") is not None
  assert lps.keys("island/0") is None and lps.keys("region/1") is None
  with pytest.raises(validate.Refusal, match="not in this syncer's region"):
    lps._island("island/1", {})  # pylint: disable=protected-access
  gps.close()
  lps.close()


@pytest.mark.parametrize("over, match", [
    ({"outer.policy": "sync"}, "needs outer.policy=async"),
    ({"outer.compression": "int8"}, "no codec"),
    ({"launch.region": 2}, "launch.region=2"),
    ({"launch.region_push": "later"}, "region_push"),
    ({"launch.role": "island", "launch.syncer": "127.0.0.1:1", "launch.regions": "127.0.0.1:2"},
     "one per region|each of the 2 regions"),
])
def test_bad_decoupled_halos_configs_are_one_clear_line(over, match):
  config = tiny_config(**{**_HALOS, "islands.num": 4, "outer.halos_regions": 2,
                          "launch.mode": "decoupled", **over})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_an_island_sends_to_its_region_s_syncer():
  config = tiny_config(**{**_HALOS, "islands.num": 4, "outer.halos_regions": 2,
                          "launch.regions": "a:1,b:2"})
  assert [region_lib.island_address(config, k) for k in range(4)] == ["a:1", "a:1", "b:2", "b:2"]
