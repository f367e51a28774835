"""Starts a decoupled run here: the syncer and M island jobs, one process each, supervised.

    python -m experiments.train --config configs/shakespeare_diloco.py --workdir DIR \
        --config.launch.mode=decoupled

writes ``DIR/roles.json`` (role -> pid, address, restarts) and logs each role to
``DIR/logs/<role>.log``. ``launch.join=K:S,...`` starts island K once the syncer's rounds have
closed through step S (elastic join; K < ``islands.max_num``). Like a cluster scheduler, it restarts a role that dies
(``FEDJAX_LM_DECOUPLED_RESTARTS`` times at most, default 3): a restarted island rejoins through
the syncer, a restarted syncer resumes from its checkpoint. It stops every role on SIGINT /
SIGTERM and leaves no process behind. On a cluster, the scheduler starts each role itself with
``--config.launch.role=syncer|island --config.launch.island=K --config.launch.syncer=HOST:PORT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from fedjax_lm import cpu
from fedjax_lm import health
from fedjax_lm import launch as launch_lib
from fedjax_lm import wire


def _env(secret: str) -> dict:
  env = dict(os.environ)
  env.setdefault(wire.ENV_SECRET, secret)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["PYTHONUNBUFFERED"] = "1"
  return cpu.process_env(env)  # the XLA flags and allocator defaults


def _progress(workdir: str) -> int:
  """The step every fragment's rounds have closed through (the syncer's progress.json)."""
  try:
    with open(os.path.join(workdir, "progress.json"), encoding="utf-8") as f:
      return int(json.load(f)["closed_through"])
  except (OSError, ValueError, KeyError):
    return 0


def run(argv: list[str], config, workdir: str, poll_seconds: float = 0.2) -> int:
  """Runs every role of ``config`` here; returns the job's exit code (0 when the syncer and
  every island finished)."""
  logs = os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  address = f"{config.launch.interface or '127.0.0.1'}:{launch_lib.free_port()}"
  env = _env(wire.new_secret())
  roles = {"syncer": ["--config.launch.role=syncer"]}
  joins = {f"island_{k}": step for k, step in health.parse_pairs(config.launch.join,
                                                                  "launch.join")}
  for k in range(int(config.islands.num)):
    roles[f"island_{k}"] = ["--config.launch.role=island", f"--config.launch.island={k}"]
  for role in joins:
    roles[role] = ["--config.launch.role=island", f"--config.launch.island={role[7:]}"]
  common = [f"--config.launch.syncer={address}"]
  max_restarts = int(os.environ.get("FEDJAX_LM_DECOUPLED_RESTARTS", "3"))
  procs, restarts, finished = {}, {r: 0 for r in roles}, set()

  def start(role):
    out = open(os.path.join(logs, f"{role}.log"), "ab")
    procs[role] = subprocess.Popen([*argv, *roles[role], *common], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, preexec_fn=launch_lib.die_with_parent)
    out.close()
    with open(os.path.join(workdir, "roles.json"), "w", encoding="utf-8") as f:
      json.dump({r: {"pid": p.pid, "address": address if r == "syncer" else None,
                     "restarts": restarts[r]} for r, p in procs.items()}, f, indent=1)

  stop = {"signal": None}

  def forward(signum, _frame):
    stop["signal"] = signum

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  code = 0
  try:
    start("syncer")
    for role in roles:
      if role != "syncer" and role not in joins:
        start(role)
    while len(finished) < len(roles):
      for role, step in list(joins.items()):  # elastic: start it once the run is that far
        if _progress(workdir) >= step:
          print(f"[launch] {role} joins at step {_progress(workdir)}", file=sys.stderr)
          start(role)
          del joins[role]
      if stop["signal"] is not None:
        code = 128 + stop["signal"]
        break
      for role, proc in list(procs.items()):
        if role in finished or proc.poll() is None:
          continue
        if proc.returncode == 0:
          finished.add(role)
        elif restarts[role] < max_restarts:
          restarts[role] += 1
          print(f"[launch] {role} exited with {proc.returncode}: restarting it "
                f"({restarts[role]}/{max_restarts})", file=sys.stderr)
          start(role)
        else:
          print(f"[launch] {role} exited with {proc.returncode} {max_restarts + 1} times: "
                "stopping the run", file=sys.stderr)
          launch_lib.print_tail(os.path.join(logs, f"{role}.log"))
          code = 1
          break
      else:
        time.sleep(poll_seconds)
        continue
      break
  finally:
    launch_lib.terminate(list(procs.values()))
    for s, h in old.items():
      signal.signal(s, h)
  return code
