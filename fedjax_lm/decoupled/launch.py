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
With ``launch.syncer_shards`` = S the syncer is S roles ``syncer_<s>`` (``launch.syncer_shard``),
each on its own port; ``launch.syncer`` lists their addresses in shard order. With HALoS
(``outer.halos_regions`` = R) the ``syncer`` role is the global syncer and R roles
``region_<r>`` (``launch.region``) are the regional ones, listed in ``launch.regions``.
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
from fedjax_lm.decoupled import tokens


def _env(secret: str) -> dict:
  env = dict(os.environ)
  env.setdefault(wire.ENV_SECRET, secret)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["PYTHONUNBUFFERED"] = "1"
  return cpu.process_env(env)  # the XLA flags and allocator defaults


def _progress(workdir: str, shards: int = 1) -> int:
  """The step every fragment's rounds have closed through (the syncer shards' progress.json)."""
  steps = []
  for s in range(shards):
    directory = workdir if s == 0 else os.path.join(workdir, "syncer_shards", str(s))
    try:
      with open(os.path.join(directory, "progress.json"), encoding="utf-8") as f:
        steps.append(int(json.load(f)["closed_through"]))
    except (OSError, ValueError, KeyError):
      return 0
  return min(steps)


class _Roles:
  """The roles of one local decoupled run, as processes: started, restarted, supervised."""

  def __init__(self, argv: list[str], config, workdir: str):
    self.workdir, self.logs = workdir, os.path.join(workdir, "logs")
    os.makedirs(self.logs, exist_ok=True)
    self.shards = int(config.launch.syncer_shards)
    host = config.launch.interface or "127.0.0.1"
    self.addresses = [f"{host}:{launch_lib.free_port()}" for _ in range(self.shards)]
    self.address = ",".join(self.addresses)
    self.env = _env(wire.new_secret())
    self.server_env = cpu.process_env(self.env, server=True)  # (the same secret)
    island = lambda k: ["--config.launch.role=island", f"--config.launch.island={k}"]
    shard = lambda s: ["--config.launch.role=syncer", f"--config.launch.syncer_shard={s}"]
    syncers = ({"syncer": shard(0)} if self.shards == 1 else
               {f"syncer_{s}": shard(s) for s in range(self.shards)})
    # HALoS (outer.halos_regions = R): the global syncer and R regional ones, region_<r>
    regions = int(config.outer.halos_regions)
    self.region_addresses = [f"{host}:{launch_lib.free_port()}" for _ in range(regions)]
    region = lambda r: ["--config.launch.role=syncer", f"--config.launch.region={r}"]
    syncers.update({f"region_{r}": region(r) for r in range(regions)})
    self.args = {**syncers,
                 **{f"island_{k}": island(k) for k in range(int(config.islands.num))}}
    self.joins = {f"island_{k}": step for k, step in health.parse_pairs(config.launch.join,
                                                                         "launch.join")}
    self.args.update({role: island(role[7:]) for role in self.joins})
    self.argv = [*argv, f"--config.launch.syncer={self.address}"]
    if regions:
      self.argv.append(f"--config.launch.regions={','.join(self.region_addresses)}")
    self.max_restarts = int(os.environ.get("FEDJAX_LM_DECOUPLED_RESTARTS", "3"))
    self.devices = tokens.devices(config)
    self.procs, self.restarts, self.finished = {}, {r: 0 for r in self.args}, set()

  def start(self, role: str) -> None:
    out = open(os.path.join(self.logs, f"{role}.log"), "ab")
    self.procs[role] = subprocess.Popen([*self.argv, *self.args[role]], env=self._env(role),
                                        stdout=out, stderr=subprocess.STDOUT,
                                        preexec_fn=launch_lib.die_with_parent)
    out.close()
    with open(os.path.join(self.workdir, "roles.json"), "w", encoding="utf-8") as f:
      json.dump({r: {"pid": p.pid, "address": self._address(r), "restarts": self.restarts[r]}
                 for r, p in self.procs.items()}, f, indent=1)

  def _address(self, role: str) -> str | None:
    if role == "syncer":
      return self.address
    if role.startswith("region_"):
      return self.region_addresses[int(role[7:])]
    return self.addresses[int(role[7:])] if role.startswith("syncer_") else None

  def _env(self, role: str) -> dict:
    """The syncer gets the job secret; an island only its own key (it cannot sign as
    another island)."""
    if role.startswith(("syncer", "region")):
      return self.server_env
    env = {k: v for k, v in self.env.items() if k != wire.ENV_SECRET}
    env[wire.ENV_MEMBER_KEY] = wire.derive(self.env[wire.ENV_SECRET].encode(),
                                           f"island/{int(role[7:])}").decode()
    if self.devices is not None:  # islands.devices: this island's CPU devices
      env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                          f"{cpu.DEVICE_COUNT_FLAG}={self.devices[int(role[7:])]}").strip()
    return env

  def start_joiners(self) -> None:
    """Elastic: a ``launch.join`` island starts once the run is that far."""
    for role, step in list(self.joins.items()):
      if _progress(self.workdir, self.shards) >= step:
        print(f"[launch] {role} joins at step {_progress(self.workdir, self.shards)}",
              file=sys.stderr)
        self.start(role)
        del self.joins[role]

  def check(self) -> int | None:
    """Restarts a role that died (at most ``max_restarts`` times each); 1 once one died too
    often, 0 once every role finished, None while the run goes on."""
    for role, proc in list(self.procs.items()):
      if role in self.finished or proc.poll() is None:
        continue
      if proc.returncode == 0:
        self.finished.add(role)
      elif self.restarts[role] < self.max_restarts:
        self.restarts[role] += 1
        print(f"[launch] {role} exited with {proc.returncode}: restarting it "
              f"({self.restarts[role]}/{self.max_restarts})", file=sys.stderr)
        self.start(role)
      else:
        print(f"[launch] {role} exited with {proc.returncode} {self.max_restarts + 1} times: "
              "stopping the run", file=sys.stderr)
        launch_lib.print_tail(os.path.join(self.logs, f"{role}.log"))
        return 1
    return 0 if len(self.finished) == len(self.args) else None


def run(argv: list[str], config, workdir: str, poll_seconds: float = 0.2) -> int:
  """Runs every role of ``config`` here; returns the job's exit code (0 when the syncer and
  every island finished)."""
  roles = _Roles(argv, config, workdir)
  stop = {"signal": None}

  def forward(signum, _frame):
    stop["signal"] = signum

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for role in roles.args:
      if role not in roles.joins:
        roles.start(role)
    while True:
      roles.start_joiners()
      if stop["signal"] is not None:
        return 128 + stop["signal"]
      code = roles.check()
      if code is not None:
        return code
      time.sleep(poll_seconds)
  finally:
    launch_lib.terminate(list(roles.procs.values()))
    for s, h in old.items():
      signal.signal(s, h)
