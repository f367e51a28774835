"""Faults without the local launcher: processes started one by one as a scheduler would
(``launch.mode=cluster``); SIGKILL one and every other must exit non-zero, naming the loss,
within 60 s instead of hanging in a collective."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from fedjax_lm import launch


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
