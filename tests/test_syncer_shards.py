"""A sharded syncer (``launch.syncer_shards`` = S): S processes, shard s owning the fragments
p % S == s, each with its own port, checkpoint and restart; islands talk to every shard. The
run equals the one-syncer run (and so the mesh-axis run, tests/golden) step for step."""

import json
import os
import re

import numpy as np
import pytest

import golden
from conftest import tiny_config
from fedjax_lm import config_lib
from fedjax_lm import faults
from fedjax_lm import metrics as metrics_lib
from fedjax_lm.decoupled import syncer as syncer_lib
from test_decoupled import _decoupled, _island_losses, _no_orphans


@pytest.mark.slow
def test_two_shard_syncer_with_a_shard_killed_is_the_mesh_axis_run(tmp_path, data_dir):
  """Streaming int4 with error feedback (P = 4, H = 8, tau = 2) as 2 islands and a 2-shard
  syncer, shard 1 SIGKILLed after its second round: the launcher restarts only shard 1, which
  resumes from its own checkpoint (the islands resend what it lost); every island's per-step
  loss, every eval and island_bytes are still the mesh-axis run's (tests/golden); each shard
  closed its own fragments' rounds with both islands, and the lead (shard 0) evaluated the
  whole model from both shards' fragments as each eval step left them."""
  result = _decoupled(tmp_path, data_dir, "streaming_int4_ef", "--config.launch.syncer_shards=2",
                      "--config.faults.kill=syncer/1@2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "syncer_1 exited with -9: restarting it" in result.stderr
  want = json.load(open(golden.golden_file()[0]))["streaming_int4_ef"]
  for k in range(2):
    np.testing.assert_allclose(_island_losses(tmp_path, k),
                               [row[k] for row in want["island_loss"]], rtol=1e-5)
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  np.testing.assert_allclose([r["eval_loss"] for r in evals], want["eval_loss"], rtol=1e-5)
  assert evals[-1]["island_bytes"] == want["island_bytes"]
  assert not any("inexact_shards" in r for r in evals)
  for s, directory in enumerate([tmp_path, tmp_path / "syncer_shards" / "1"]):
    assert os.listdir(directory / "syncer_checkpoints"), s
    events = [json.loads(l) for l in open(directory / "events.jsonl")]
    assert not [e for e in events if e["event"] == "round_closed_without"], events
    assert ("syncer_restored" in [e["event"] for e in events]) == (s == 1), (s, events)
  roles = _no_orphans(tmp_path)
  assert roles["syncer_0"]["restarts"] == 0 and roles["syncer_1"]["restarts"] == 1
  for k in range(2):  # (a heartbeat thread per shard, ended quietly when the island leaves)
    assert "Traceback" not in open(tmp_path / "logs" / f"island_{k}.log").read(), k


def test_shards_own_whole_fragments_round_robin():
  assert syncer_lib.owned_fragments(4, 2, 0) == (0, 2)
  assert syncer_lib.owned_fragments(4, 2, 1) == (1, 3)
  assert syncer_lib.owned_fragments(5, 3, 2) == (2,)
  assert [p for s in range(3) for p in syncer_lib.owned_fragments(7, 3, s)] == [
      0, 3, 6, 1, 4, 2, 5]


@pytest.mark.parametrize("overrides, culprit", [
    ({"launch.syncer_shards": 2}, "launch.syncer_shards=2 must be in [1, outer.fragments=1]"),
    ({"launch.syncer_shards": 2, "outer.fragments": 2, "outer.eager": True, "outer.overlap": 1},
     "needs outer.policy=sync and outer.eager=False"),
    ({"launch.syncer_shards": 2, "outer.fragments": 2, "launch.syncer_shard": 2},
     "launch.syncer_shard=2 must be in [0, 2)"),
    ({"launch.syncer_shards": 2, "outer.fragments": 2, "launch.role": "island",
      "launch.syncer": "127.0.0.1:5000"}, "one per shard (2, comma-separated)"),
    ({"launch.syncer": "127.0.0.1:5000,10.1.2.3:5001", "launch.syncer_shards": 2,
      "outer.fragments": 2, "launch.role": "island"}, "mutual TLS is required there"),
])
def test_sharded_syncer_config_is_checked_naming_the_key(overrides, culprit):
  config = tiny_config(**{"algorithm": "islands", "launch.mode": "decoupled", "mesh.island": 1,
                          **overrides})
  with pytest.raises(ValueError, match=re.escape(culprit)):
    config_lib.validate(config)


def test_a_shard_is_a_fault_injection_role():
  plan = faults.Plan.from_config(tiny_config(**{"faults.kill": "syncer/1@3"}))
  assert plan.kills == (("syncer/1", 3),)


def test_shards_hold_only_their_fragments_and_joins_share_one_state_copy(tmp_path, data_dir):
  """The S shards together hold the global params and outer state once (each only its own
  fragments', equal to the one-syncer state's), and islands joining at one version share
  one copy of the state the join sends (M joins hold one, not M; a closed round makes the next
  join take a fresh one)."""
  import jax  # pylint: disable=import-outside-toplevel
  base = {**golden.overrides("streaming_int4_ef", data_dir), "launch.mode": "decoupled"}
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  whole = syncer_lib.Syncer(tiny_config(**base), str(tmp_path / "one"), b"k" * 32)
  shards = [syncer_lib.Syncer(tiny_config(**{**base, "launch.syncer_shards": 2,
                                             "launch.syncer_shard": s}),
                              str(tmp_path / str(s)), b"k" * 32) for s in range(2)]
  try:
    assert sum(nbytes(s.server.params) for s in shards) == nbytes(whole.server.params)
    assert (sum(nbytes(s.server.outer) for s in shards) == nbytes(whole.server.outer) > 0)
    for s in shards:
      for p in s.owned:
        for a, b in zip(s.spec.frags.take(whole.server.params, p), s.server.params[
            s.owned.index(p)]):
          np.testing.assert_array_equal(a, b)
    shard = shards[1]
    joins = [shard.join("island/%d" % k, {"island": k, "fingerprint": shard.fingerprint}, [])
             for k in range(2)]
    first, second = (j[2] for j in joins)
    assert all(np.shares_memory(a, b) for a, b in zip(first, second))
    assert sum(a.nbytes for a in first) == nbytes(shard.server.params) + nbytes(
        [shard.server.outer[p] for p in shard.owned])
    shard.version += 1  # (as a closed round does)
    third = shard.join("island/0", {"island": 0, "fingerprint": shard.fingerprint}, [])[2]
    assert not np.shares_memory(third[0], first[0])
    np.testing.assert_array_equal(third[0], first[0])
  finally:
    for s in (whole, *shards):
      s.close()
