"""The WAN testbed (experiments.wan, experiments.wan_net): training across shaped links between
network namespaces, bytes on the veth counters, and nothing left behind (needs root)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, tiny_config
from experiments import wan
from experiments import wan_net

# One worker runs them all (pytest -n): they create and count network namespaces.
pytestmark = pytest.mark.xdist_group("wan_namespaces")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason=wan_net.NOT_ROOT)

_ISLANDS = {"algorithm": "islands", "islands.num": 2, "mesh.island": 2, "mesh.data": 1,
            "launch.processes": 2, "outer.sync_every": 3, "total_steps": 6, "log_every": 1,
            "eval_every": 6, "checkpoint_every": 1000}


def _ours(tag=None):
  """This machine's testbed namespaces (of ``tag`` only, if given)."""
  return [n for n in wan_net.namespaces()
          if n.startswith(tag + "-" if tag else wan_net.PREFIX)]


def test_not_root_fails_with_one_clear_line(monkeypatch):
  monkeypatch.setattr(os, "geteuid", lambda: 1000)
  with pytest.raises(wan_net.NotRootError, match="needs root"):
    wan_net.Testbed(2, "20mbit")
  code = ("import os, runpy, sys; os.geteuid = lambda: 1000; "
          "sys.argv = ['wan', '--config', 'configs/tiny.py', '--workdir', sys.argv[1]]; "
          "runpy.run_module('experiments.wan', run_name='__main__')")
  done = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "runs", "never")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1] == f"error: {wan_net.NOT_ROOT}", done.stderr


def test_overlap_study_not_root_fails_with_one_clear_line():
  code = ("import os, runpy, sys; os.geteuid = lambda: 1000; "
          "sys.argv = ['wan', '--overlap_study', '--workdir', sys.argv[1]]; "
          "runpy.run_module('experiments.wan', run_name='__main__')")
  done = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "runs", "never")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1] == f"error: {wan_net.NOT_ROOT}", done.stderr


@needs_root
@pytest.mark.slow
def test_training_across_the_shaped_link_then_nothing_left(tmp_path, data_dir):
  overrides = {**_ISLANDS, "data.data_dir": data_dir}
  config = tiny_config(**overrides)
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  record = wan.run(config, "configs/tiny.py", args, "20mbit", str(tmp_path / "run"))
  with open(tmp_path / "run/metrics.jsonl") as f:
    metrics = [json.loads(line) for line in f]
  result = wan.analyze(record, metrics, config)
  assert result["steps"] == 6 and result["island_bytes"] > 0
  for tx, rx in zip(result["link_tx_bytes"], result["link_rx_bytes"]):
    assert tx >= result["island_bytes"] and rx >= result["island_bytes"]  # it crossed the veth
  assert 1.0 <= result["link_over_island_bytes"] < 3.0
  assert result["blocked_in_syncs_s"] is not None
  tag = f"{wan_net.PREFIX}{os.getpid()}"
  assert not _ours(tag)
  assert not os.path.isdir("/etc/netns") or not [
      n for n in os.listdir("/etc/netns") if n.startswith(tag)]


@needs_root
def test_failed_run_removes_the_testbed(tmp_path, data_dir):
  overrides = {**_ISLANDS, "data.data_dir": data_dir, "inner.optimizer": "nope"}
  with pytest.raises(RuntimeError, match="exited with"):
    wan.run(tiny_config(**{**overrides, "inner.optimizer": "adamw"}), "configs/tiny.py",
            [f"--config.{k}={v}" for k, v in overrides.items()], "20mbit", str(tmp_path))
  assert not _ours(f"{wan_net.PREFIX}{os.getpid()}")


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "sigkill"])
def test_interrupted_or_killed_launcher_leaves_nothing(tmp_path, data_dir, sig):
  args = [f"--config.{k}={v}" for k, v in {**_ISLANDS, "data.data_dir": data_dir,
                                          "total_steps": 100000}.items()]
  launcher = subprocess.Popen(
      [sys.executable, "-m", "experiments.wan", "--config", "configs/tiny.py", "--workdir",
       str(tmp_path), "--jax_cache=", "--bandwidth", "20mbit", *args], cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  tag = f"{wan_net.PREFIX}{launcher.pid}"
  deadline = time.time() + 60
  while time.time() < deadline and not (tmp_path / "console.log").exists():
    time.sleep(0.2)
  time.sleep(3)  # the training processes are up inside the namespaces
  jobs = [int(p) for ns in _ours(tag) for p in subprocess.run(
      ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
  assert len(_ours(tag)) == 3 and len(jobs) == 2, (_ours(tag), jobs)
  launcher.send_signal(sig)
  launcher.wait(timeout=60)
  deadline = time.time() + 30
  while time.time() < deadline and (_ours(tag) or any(_alive(p) for p in jobs)):
    time.sleep(0.2)
  assert not _ours(tag) and not any(_alive(p) for p in jobs)
  assert not os.path.exists(f"/etc/netns/{tag}-i0")


@needs_root
def test_next_start_removes_a_stale_testbed():
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = f"{wan_net.PREFIX}{dead.pid}-i0"
  subprocess.run(["ip", "netns", "add", stale], check=True)
  os.makedirs(f"/etc/netns/{stale}", exist_ok=True)
  try:
    assert stale in wan_net.clean_stale()
    assert stale not in wan_net.namespaces() and not os.path.exists(f"/etc/netns/{stale}")
  finally:
    subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
    return f.read().split(")")[-1].split()[0] != "Z"
