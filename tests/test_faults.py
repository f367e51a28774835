"""Faults: the fault-injection plan (fedjax_lm/faults.py: parsing, validation, once-per-run
kills, the seeded random schedule, its wiring into the training loop), and faults without the
local launcher: processes started one by one as a scheduler would (``launch.mode=cluster``);
SIGKILL one and every other must exit non-zero, naming the loss, within 60 s instead of hanging
in a collective."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from fedjax_lm import config_lib
from fedjax_lm import faults
from fedjax_lm import launch


def _config(**dotted):
  return tiny_config(**{"algorithm": "islands", "islands.num": 2, **dotted})


def test_plan_parses_every_key():
  plan = faults.Plan.from_config(_config(**{
      "faults.kill": "process/1@7, island/0@3,syncer@2", "faults.nonfinite": "4:1,12:0,4:0",
      "faults.record_batches": True}))
  assert plan.kills == (("process/1", 7), ("island/0", 3), ("syncer", 2))
  assert plan.record_batches and not plan.mtbf_steps
  assert plan.kill_steps("process/1", 10) == [7] and plan.kill_steps("process/1", 6) == []
  assert plan.kill_steps("process/0", 10) == [] and plan.kill_steps("syncer", 2) == [2]
  assert plan.nonfinite_islands(4) == [0, 1] and plan.nonfinite_islands(12) == [0]
  assert plan.nonfinite_islands(5) == []
  assert faults.Plan.from_config(_config()) == faults.Plan()  # the defaults: no faults
  assert faults.Plan.from_config(config_lib.base_config()) == faults.Plan()


@pytest.mark.parametrize("dotted,message", [
    ({"faults.kill": "island1@3"}, "faults.kill='island1@3': expected 'ROLE@STEP' items"),
    ({"faults.kill": "worker/0@3"}, "faults.kill='worker/0@3': expected 'ROLE@STEP' items"),
    ({"faults.kill": "island/2@3"}, "faults.kill names island 2, but there are 2 islands"),
    ({"faults.nonfinite": "4-1"}, "faults.nonfinite='4-1': expected 'step:island' pairs"),
    ({"faults.nonfinite": "4:5"}, "faults.nonfinite names island 5, but there are 2 islands"),
    ({"faults.mtbf_steps": 0.5}, "faults.mtbf_steps=0.5 must be 0 (off) or >= 1"),
    ({"faults.mtbf_steps": 10.0}, "faults.mtbf_steps=10.0 needs faults.random_roles"),
    ({"faults.random_roles": "island/*"}, "faults.random_roles='island/*' needs "
                                          "faults.mtbf_steps > 0"),
    ({"faults.mtbf_steps": 10.0, "faults.random_roles": "islands/*"},
     "faults.random_roles='islands/*': expected roles"),
])
def test_a_bad_fault_is_one_error_naming_its_key(dotted, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    config_lib.validate(_config(**dotted))


def test_islands_that_join_later_may_be_named():
  config_lib.validate(_config(**{"islands.max_num": 4, "faults.kill": "island/3@5",
                                 "faults.nonfinite": "2:3"}))


def test_a_kill_fires_once_per_run_and_after_before(tmp_path):
  """A real SIGKILL at step 3: ``before`` ran first and the marker is written; the same
  command run again in the same workdir (a restart) goes past step 3."""
  script = ("import sys\n"
            "from fedjax_lm import faults\n"
            "plan = faults.Plan(kills=(('island/1', 3),))\n"
            "for step in range(1, 6):\n"
            "  plan.maybe_kill('island/1', step, sys.argv[1], before=lambda: print('before'))\n"
            "  print('step', step, flush=True)\n")
  run = lambda: subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                               capture_output=True, text=True, timeout=120)
  first = run()
  assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
  assert first.stdout.split("\n")[:3] == ["step 1", "step 2", "before"], first.stdout
  assert "faults: SIGKILL island/1 at 3" in first.stderr
  assert os.path.exists(tmp_path / ".faults" / "island" / "1@3")
  again = run()
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout.split() == [w for s in range(1, 6) for w in ("step", str(s))]


def test_a_due_kill_fires_at_the_first_report_at_or_past_it(tmp_path, monkeypatch):
  """The syncer reports rounds closed, which may skip a number: ``syncer@2`` fires at 3;
  several due kills fire one per report, earliest first; another workdir is another run."""
  killed = []
  monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
  plan = faults.Plan(kills=(("syncer", 2), ("island/0", 2), ("island/0", 4)))
  plan.maybe_kill("syncer", 1, str(tmp_path))
  assert not killed
  for _ in range(2):
    plan.maybe_kill("syncer", 3, str(tmp_path))
  assert killed == [signal.SIGKILL]
  assert plan.due("island/0", 5, str(tmp_path)) == 2
  plan.maybe_kill("island/0", 5, str(tmp_path))
  assert plan.due("island/0", 5, str(tmp_path)) == 4
  plan.maybe_kill("island/0", 5, str(tmp_path))
  plan.maybe_kill("island/0", 6, str(tmp_path))
  assert len(killed) == 3 and plan.due("island/0", 99, str(tmp_path)) is None
  assert sorted(os.listdir(tmp_path / ".faults" / "island")) == ["0@2", "0@4"]
  assert plan.due("syncer", 3, str(tmp_path / "another_run")) == 2


def test_random_failures_are_a_seeded_schedule_with_the_given_mean():
  plan = faults.Plan.from_config(_config(**{
      "faults.mtbf_steps": 20.0, "faults.random_roles": "island/*", "faults.seed": 3}))
  steps = plan.kill_steps("island/0", 2000)
  assert steps == faults.Plan.from_config(_config(**{  # deterministic
      "faults.mtbf_steps": 20, "faults.random_roles": "island/*", "faults.seed": 3})).kill_steps(
          "island/0", 2000)
  assert steps != plan.kill_steps("island/1", 2000)  # each role its own schedule
  assert steps != plan._replace(seed=4).kill_steps("island/0", 2000)
  assert plan.kill_steps("syncer", 2000) == [] and plan.kill_steps("process/0", 2000) == []
  assert steps == sorted(set(steps)) and steps[0] >= 1 and 50 < len(steps) < 150
  # the schedule does not depend on how far it was drawn
  far = faults.random_kill_steps(3, "island/0", 20.0, 10**6)
  assert [s for s in far if s <= 2000] == steps
  gaps = np.diff([0] + far)  # ~50k gaps: ceil(Exp), mean 20, sd ~ mean (memoryless)
  assert abs(gaps.mean() / 20 - 1) < 0.02 and 0.9 < gaps.std() / gaps.mean() < 1.05
  assert faults.random_kill_steps(0, "syncer", 1.0, 5) == [1, 2, 3, 4, 5]
  both = plan._replace(kills=(("island/0", 5),))
  assert both.kill_steps("island/0", 2000) == sorted({5, *steps})


def test_train_kills_its_process_once_after_the_save_in_flight(tmp_path, data_dir, one_device,
                                                               monkeypatch):
  """``faults.kill=process/0@3`` in the training loop: the kill comes after the checkpoints
  started were written (``Checkpointer.wait``), once; the marker names role and step."""
  from fedjax_lm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lm import train as train_lib  # pylint: disable=g-import-not-at-top
  events = []
  monkeypatch.setattr(faults.os, "kill", lambda pid, sig: events.append(("kill", sig)))
  real_wait = ckpt_lib.Checkpointer.wait
  monkeypatch.setattr(ckpt_lib.Checkpointer, "wait",
                      lambda self: (events.append("wait"), real_wait(self)))
  config = _config(**{"outer.sync_every": 2, "total_steps": 4, "checkpoint_every": 3,
                      "log_every": 2, "eval_every": 4, "data.data_dir": data_dir,
                      "faults.kill": "process/0@3"})
  train_lib.train(config, str(tmp_path), devices=one_device)
  assert events.count(("kill", signal.SIGKILL)) == 1
  assert events[events.index(("kill", signal.SIGKILL)) - 1] == "wait"
  assert os.listdir(tmp_path / ".faults" / "process") == ["0@3"]


def _start_cluster(workdir, data_dir, num=2):
  port = launch.free_port()
  args = [sys.executable, "-m", "experiments.train", "--config", "configs/tiny.py",
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
          "--config.launch.mode=cluster", "--config.total_steps=100000",
          "--config.checkpoint_every=100000", "--config.eval_every=100000"]
  procs = []
  for i in range(num):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "XLA_FLAGS": "",
           launch.ENV_NUM_PROCESSES: str(num), launch.ENV_PROCESS_ID: str(i),
           "JAX_PLATFORMS": "cpu"}
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator", "worker"])
def test_dead_peer_in_cluster_mode_stops_the_others_within_60s(tmp_path, data_dir, victim):
  procs = _start_cluster(tmp_path, data_dir)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 2000):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
    time.sleep(0.5)
  assert metrics.exists(), "training never started"
  procs[victim].kill()
  killed_at = time.time()
  survivor = procs[1 - victim]
  try:
    out, _ = survivor.communicate(timeout=60)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  took = time.time() - killed_at
  assert survivor.returncode != 0
  assert took < 60
  # What was lost is named: the dead task (heartbeat) or the broken collective connection.
  assert ("Task 1 heartbeat timeout" in out if victim == 1 else
          "Connection reset by peer" in out or "Socket closed" in out), out[-3000:]
  print(f"survivor of a killed {'coordinator' if victim == 0 else 'worker'} exited "
        f"{survivor.returncode} after {took:.1f} s")
