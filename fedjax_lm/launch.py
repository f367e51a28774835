"""Multi-process runtime: a local launcher and the ``jax.distributed`` initialisation.

Locally, N processes with one CPU device each are joined over loopback by ``jax.distributed``
with gloo collectives (in-process multi-device CPU collectives can deadlock on small machines).
On a cluster (SLURM, TPU pods, GKE, ...) ``jax.distributed.initialize()`` reads the cluster's
own settings; the training code is the same either way.

The launcher shows process 0's output, writes the others' to ``log_dir/process_<i>.log``, and
stops every process (non-zero exit) as soon as any one fails: it never waits on a hung peer.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from fedjax_lm import cpu
from fedjax_lm import wire

ENV_COORDINATOR = "FEDJAX_LM_COORDINATOR"
ENV_NUM_PROCESSES = "FEDJAX_LM_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_LM_PROCESS_ID"


def is_launched_child() -> bool:
  return ENV_PROCESS_ID in os.environ


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def coordinator_bind(coordinator_address: str, interface: str = "") -> str:
  """Where process 0's ``jax.distributed`` coordinator listens: ``interface`` (a host name or
  address; IPv6 with or without brackets) if given, else the coordinator address's own host,
  on the coordinator's port. JAX's default, ``[::]:port``, is every interface: a client in
  another network namespace registered as process 1 and overwrote its host-link address in the
  key-value store (issue 44). One clear error for an address that is not ``host:port``."""
  host, sep, port = coordinator_address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator address {coordinator_address!r}: expected host:port "
                     "([address]:port for IPv6)")
  if ":" in host and not (host.startswith("[") and host.endswith("]")):
    raise ValueError(f"coordinator address {coordinator_address!r}: an IPv6 address needs "
                     "brackets, [address]:port")
  if interface:
    host = interface
    if ":" in interface and not interface.startswith("["):
      try:
        ipaddress.IPv6Address(interface)
      except ValueError:
        raise ValueError(f"launch.interface={interface!r}: expected a host name or address, "
                         "without a port") from None
      host = f"[{interface}]"
  return f"{host}:{port}"


def distributed_args(mode: str, interface: str = "",
                     environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The keyword arguments :func:`initialize` gives ``jax.distributed.initialize`` for
  ``mode`` in ``environ`` (default ``os.environ``); None where it is not called. The
  coordinator binds :func:`coordinator_bind`'s address whenever the coordinator address is
  known here: the local launcher's (loopback, which its children dial, so ``interface`` does
  not apply) or ``JAX_COORDINATOR_ADDRESS`` on a plain scheduler (``interface`` applies);
  ``JAX_COORDINATOR_BIND_ADDRESS``, if set, is left to JAX. Under a scheduler's
  auto-detection the coordinator address is only known inside JAX, which binds its default."""
  environ = os.environ if environ is None else environ
  if mode not in ("local", "cluster", "none"):
    raise ValueError(f"launch.mode={mode!r}: expected 'local', 'cluster' or 'none'")
  if mode == "local" and ENV_PROCESS_ID in environ:
    coordinator = environ[ENV_COORDINATOR]
    return dict(coordinator_address=coordinator,
                num_processes=int(environ[ENV_NUM_PROCESSES]),
                process_id=int(environ[ENV_PROCESS_ID]),
                coordinator_bind_address=coordinator_bind(coordinator))
  if mode != "cluster":
    return None
  args = {}
  if ENV_PROCESS_ID in environ:
    args = dict(num_processes=int(environ[ENV_NUM_PROCESSES]),
                process_id=int(environ[ENV_PROCESS_ID]))
  coordinator = environ.get("JAX_COORDINATOR_ADDRESS", "")
  if coordinator and not environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    args["coordinator_bind_address"] = coordinator_bind(coordinator, interface)
  return args


def initialize(mode: str, heartbeat_seconds: int = 20, interface: str = "") -> None:
  """Joins the job's processes before JAX is used. ``mode``: local | cluster | none.

  ``cluster``: the scheduler's settings (``jax.distributed.initialize()`` auto-detection), or,
  for a plain scheduler, ``JAX_COORDINATOR_ADDRESS`` plus ``FEDJAX_LM_NUM_PROCESSES`` and
  ``FEDJAX_LM_PROCESS_ID`` in each process's environment. A peer that dies is noticed by the
  coordination service within ``heartbeat_seconds`` (and usually at once by the gloo
  collective it leaves hanging): every other process then exits non-zero, never hangs.
  Process 0's coordinator listens on one address, not all (:func:`distributed_args`;
  ``interface`` is ``launch.interface``)."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
  args = distributed_args(mode, interface)
  if args is not None:
    jax.distributed.initialize(**args, initialization_timeout=120,
                               heartbeat_timeout_seconds=int(heartbeat_seconds))


def die_with_parent() -> None:
  """Child-side: receive SIGKILL when the launcher dies, so no orphan waits on a peer."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass
  os.setpgrp()


def core_groups(num_processes: int, cores: Sequence[int]) -> list[tuple[int, ...]]:
  """Which cores each local process may run on: the usable cores split into ``num_processes``
  contiguous equal groups (the remainder to the first groups); with more processes than cores,
  process i gets core i mod cores. A process pinned to its group before it starts sizes XLA's
  thread pools to the group, so N processes on N cores run one busy compute thread per core
  (unpinned, each process's pool had a thread per core of the machine: measured on 2 cores,
  4.2 runnable threads on average and a 1-minute load of 3.85)."""
  cores = sorted(cores)
  if num_processes >= len(cores):
    return [(cores[i % len(cores)],) for i in range(num_processes)]
  size, extra = divmod(len(cores), num_processes)
  groups, start = [], 0
  for i in range(num_processes):
    end = start + size + (i < extra)
    groups.append(tuple(cores[start:end]))
    start = end
  return groups


def _start_child(cores: tuple[int, ...] | None):
  """``preexec_fn`` of a launched process: die with the launcher, then (``cores``) pin to them
  before Python, and so XLA, starts."""
  def start():
    die_with_parent()
    if cores is not None:
      os.sched_setaffinity(0, cores)
  return start


def _child_env(process_id: int, num_processes: int, coordinator: str,
               secret: str, cores: tuple[int, ...] | None = None) -> dict[str, str]:
  env = dict(os.environ)
  env[ENV_COORDINATOR] = coordinator
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  env.setdefault("JAX_PLATFORMS", "cpu")
  # One device per process: drop any forced host device count inherited from the parent.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if num_processes >= (os.cpu_count() or 1) and not any("multi_thread_eigen" in f for f in flags):
    flags.append("--xla_cpu_multi_thread_eigen=false")  # no more threads than cores
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault(wire.ENV_SECRET, secret)
  return cpu.process_env(env, one_core=cores is not None and len(cores) == 1)


PREEMPTION_GRACE_SECONDS = 120.0


def launch_local(argv: Sequence[str], num_processes: int, log_dir: str,
                 poll_seconds: float = 0.2, pin_cores: bool = True) -> int:
  """Runs ``argv`` as ``num_processes`` joined processes, each pinned to its own cores
  (``core_groups``; ``pin_cores=False`` leaves them to the scheduler); returns the job's exit
  code."""
  os.makedirs(log_dir, exist_ok=True)
  usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  groups = core_groups(num_processes, usable) if pin_cores and usable else None
  coordinator = f"127.0.0.1:{free_port()}"
  secret = wire.new_secret()  # this job's processes authenticate each other with it
  procs, logs = [], []
  for i in range(num_processes):
    if i == 0:
      out = None  # inherit: process 0's output is the job's output
    else:
      out = open(os.path.join(log_dir, f"process_{i}.log"), "wb")
      logs.append(out)
    env = _child_env(i, num_processes, coordinator, secret, groups[i] if groups else None)
    procs.append(subprocess.Popen(list(argv), env=env,
                                  stdout=out, stderr=subprocess.STDOUT if out else None,
                                  preexec_fn=_start_child(groups[i] if groups else None)))
  stop = {"signal": None}

  def _forward(signum, _frame):
    stop["signal"] = signum

  old = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if stop["signal"] is not None:
        code = 128 + stop["signal"]
        print(f"[launch] interrupted by signal {stop['signal']}: stopping all processes",
              file=sys.stderr)
        break
      if failed:
        i, c = failed[0]
        code = c if c > 0 else 128 - c
        print(f"[launch] process {i} exited with {c}: stopping all {num_processes} processes",
              file=sys.stderr)
        if i > 0:
          print_tail(os.path.join(log_dir, f"process_{i}.log"))
        break
      if all(c == 0 for c in codes):
        return 0
      time.sleep(poll_seconds)
  finally:
    # A signal means preemption: give the processes time to write their checkpoint.
    terminate(procs, grace_seconds=PREEMPTION_GRACE_SECONDS if stop["signal"] else 5.0)
    for f in logs:
      f.close()
    for s, h in old.items():
      signal.signal(s, h)
  return code


def terminate(procs: list[subprocess.Popen], grace_seconds: float = 5.0) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  deadline = time.time() + grace_seconds
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def print_tail(path: str, lines: int = 30) -> None:
  try:
    with open(path, "rb") as f:
      tail = f.read().decode(errors="replace").splitlines()[-lines:]
  except OSError:
    return
  print(f"[launch] last lines of {path}:", file=sys.stderr)
  for line in tail:
    print(f"  {line}", file=sys.stderr)
