"""The local launcher: exit codes, fail-fast stopping of peers, child environment, logs."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fedjax_lm import launch

# conftest imports JAX in this process, and launch_local's preexec_fn makes subprocess fork();
# JAX warns about that. The children here exec a plain Python program right away.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

# Every child writes its pid to DIR/pid_<i>, waits until all NUM peers have done so (so that
# the test knows every pid before anything is stopped), then runs BODY.
_PRELUDE = textwrap.dedent("""\
    import json, os, sys, time
    d = sys.argv[1]
    i = int(os.environ["FEDJAX_LM_PROCESS_ID"])
    n = int(os.environ["FEDJAX_LM_NUM_PROCESSES"])
    with open(os.path.join(d, f"pid_{i}.tmp"), "w") as f:
      f.write(str(os.getpid()))
    os.replace(os.path.join(d, f"pid_{i}.tmp"), os.path.join(d, f"pid_{i}"))
    deadline = time.time() + 30
    while (any(not os.path.exists(os.path.join(d, f"pid_{j}")) for j in range(n))
           and time.time() < deadline):
      time.sleep(0.02)
    """)


def _argv(tmp_path, body):
  return [sys.executable, "-c", _PRELUDE + textwrap.dedent(body), str(tmp_path)]


def _pids(tmp_path, n):
  return [int((tmp_path / f"pid_{i}").read_text()) for i in range(n)]


def _assert_dead(pid):
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_all_succeed_returns_zero(tmp_path):
  code = launch.launch_local(_argv(tmp_path, "sys.exit(0)"), 3, str(tmp_path / "logs"))
  assert code == 0
  for pid in _pids(tmp_path, 3):
    _assert_dead(pid)


@pytest.mark.parametrize("failing, num, exit_code", [(1, 3, 3), (0, 2, 5)])
def test_failure_stops_peers_quickly(tmp_path, failing, num, exit_code):
  body = f"""\
      if i == {failing}:
        sys.exit({exit_code})
      time.sleep(60)
      """
  start = time.monotonic()
  code = launch.launch_local(_argv(tmp_path, body), num, str(tmp_path / "logs"))
  elapsed = time.monotonic() - start
  assert code == exit_code
  assert elapsed < 10, elapsed
  for pid in _pids(tmp_path, num):
    _assert_dead(pid)


def test_sigkilled_process_stops_peers(tmp_path):
  body = """\
      if i == 2:
        os.kill(os.getpid(), 9)
      time.sleep(60)
      """
  start = time.monotonic()
  code = launch.launch_local(_argv(tmp_path, body), 3, str(tmp_path / "logs"))
  assert code != 0
  assert code == 128 + 9  # shell convention for "killed by signal 9"
  assert time.monotonic() - start < 10
  for pid in _pids(tmp_path, 3):
    _assert_dead(pid)


def test_peer_ignoring_sigterm_is_killed_after_grace(tmp_path):
  """A hung peer that ignores SIGTERM is SIGKILLed after the grace period, not waited on."""
  body = """\
      import signal
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      if i == 1:
        time.sleep(0.2)
        sys.exit(1)
      time.sleep(60)
      """
  start = time.monotonic()
  code = launch.launch_local(_argv(tmp_path, body), 2, str(tmp_path / "logs"))
  assert code == 1
  assert time.monotonic() - start < 15
  for pid in _pids(tmp_path, 2):
    _assert_dead(pid)


def test_child_environment_and_logs(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # the launcher must set it itself
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # the launcher must set it itself
  body = """\
      keys = ["FEDJAX_LM_COORDINATOR", "FEDJAX_LM_NUM_PROCESSES", "FEDJAX_LM_PROCESS_ID",
              "JAX_PLATFORMS", "XLA_FLAGS", "GLIBC_TUNABLES"]
      with open(os.path.join(d, f"env_{i}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
      print(f"stdout of process {i}", flush=True)
      print(f"stderr of process {i}", file=sys.stderr, flush=True)
      """
  log_dir = tmp_path / "logs"
  code = launch.launch_local(_argv(tmp_path, body), 3, str(log_dir))
  assert code == 0
  envs = [json.loads((tmp_path / f"env_{i}.json").read_text()) for i in range(3)]
  coordinators = {e["FEDJAX_LM_COORDINATOR"] for e in envs}
  assert len(coordinators) == 1
  (coordinator,) = coordinators
  m = re.fullmatch(r"127\.0\.0\.1:(\d+)", coordinator)
  assert m and 0 < int(m.group(1)) < 65536, coordinator
  for i, e in enumerate(envs):
    assert e["FEDJAX_LM_NUM_PROCESSES"] == "3"
    assert e["FEDJAX_LM_PROCESS_ID"] == str(i)
    assert e["JAX_PLATFORMS"] == "cpu"
    # One device per process: the parent's forced device count is not inherited.
    assert "xla_force_host_platform_device_count" not in (e["XLA_FLAGS"] or "")
    # huge pages for XLA's temporaries (and, one core per process, the heap tunables)
    assert e["GLIBC_TUNABLES"].split(":")[0] == "glibc.malloc.hugetlb=1"
  # Processes i > 0 log to log_dir/process_<i>.log (stdout and stderr); process 0 does not.
  assert sorted(os.listdir(log_dir)) == ["process_1.log", "process_2.log"]
  for i in (1, 2):
    text = (log_dir / f"process_{i}.log").read_text()
    assert f"stdout of process {i}" in text
    assert f"stderr of process {i}" in text
    assert "process 0" not in text


@pytest.mark.parametrize("num, cores, expected", [
    (2, [0, 1], [(0,), (1,)]),  # one process per core: one core each
    (3, [0, 1], [(0,), (1,), (0,)]),  # more processes than cores: round robin
    (2, [4, 5, 6, 7, 8], [(4, 5, 6), (7, 8)]),  # fewer: contiguous groups, remainder first
    (1, [3, 1, 2], [(1, 2, 3)]),
])
def test_core_groups(num, cores, expected):
  assert launch.core_groups(num, cores) == expected


@pytest.mark.parametrize("pin", [True, False])
def test_children_are_pinned_to_their_cores(tmp_path, pin):
  body = """\
      with open(os.path.join(d, f"cores_{i}"), "w") as f:
        f.write(json.dumps([sorted(os.sched_getaffinity(0)), os.environ["GLIBC_TUNABLES"]]))
      """
  usable = sorted(os.sched_getaffinity(0))
  n = max(2, len(usable))
  assert launch.launch_local(_argv(tmp_path, body), n, str(tmp_path / "logs"),
                             pin_cores=pin) == 0
  got = [json.loads((tmp_path / f"cores_{i}").read_text()) for i in range(n)]
  cores = [tuple(c) for c, _ in got]
  assert cores == (launch.core_groups(n, usable) if pin else [tuple(usable)] * n)
  if pin and len(usable) > 1:
    assert len(set(cores)) == len(usable)  # every core used, one process per core
  for c, tunables in got:  # the heap tunables go to processes pinned to one core, only
    assert ("glibc.malloc.arena_max=1" in tunables) == (pin and len(c) == 1), (c, tunables)


def test_child_keeps_explicit_jax_platforms(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
  body = """\
      with open(os.path.join(d, f"plat_{i}"), "w") as f:
        f.write(os.environ["JAX_PLATFORMS"])
      """
  assert launch.launch_local(_argv(tmp_path, body), 1, str(tmp_path / "logs")) == 0
  assert (tmp_path / "plat_0").read_text() == "cpu,tpu"


def test_free_port_is_bindable():
  port = launch.free_port()
  assert isinstance(port, int) and 0 < port < 65536
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", port))
    s.listen(1)
    assert s.getsockname()[1] == port
