"""Fault injection, configured from ``config.faults``: kill a role at a step, poison a batch,
fail at random with a given mean time between failures.

One place for every injected fault, so that tests (resume, health, churn), benchmarks and a
goodput measurement all use the same switches; nothing here reads the environment. Every key is
off by default:

- ``faults.kill``: ``"ROLE@STEP,..."``. SIGKILLs the process playing ROLE the first time it
  reports ``at >= STEP`` (:meth:`Plan.maybe_kill`). ROLE is ``process/I`` (process I of the
  training loop, after inner step STEP, once the checkpoints it started are written),
  ``island/K`` (decoupled island K, after STEP inner steps), ``syncer`` (the decoupled syncer,
  STEP = rounds closed) or ``syncer/S`` (shard S of a sharded syncer, ``launch.syncer_shards``).
- ``faults.nonfinite``: ``"STEP:ISLAND,..."``. Island ISLAND's batch of inner step STEP (1-based:
  the step after which STEP steps are done) gets a NaN loss mask (:func:`health.poison`).
- ``faults.record_batches``: decoupled islands log a sha1 digest of every batch they read (a
  data check: churn tests assert that no batch is read twice).
- ``faults.mtbf_steps``: > 0 turns on random failures of the roles ``faults.random_roles``
  (comma-separated, ``*`` for any index: ``"island/*,syncer"``). Each concrete role (``island/1``)
  gets its own schedule, a pure function of (``faults.seed``, role): the gaps between kills are
  the ceiling of exponential draws (geometric, the discrete memoryless law) with mean exactly
  ``mtbf_steps``, in the role's own unit (steps; rounds for the syncer).
- ``faults.seed``: the random schedule's seed.

Each kill, fixed or random, fires once per run: before the SIGKILL a marker file
``<workdir>/.faults/<role>@<step>`` is written, and a kill whose marker exists never fires
again, so the restarted process goes on past it.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import signal
import sys
import zlib
from typing import Callable, NamedTuple

import ml_collections
import numpy as np

from fedjax_lm import health

_ROLE = r"process/\d+|island/\d+|syncer(?:/\d+)?"
_PATTERN = r"(?:process|island|syncer)/(?:\d+|\*)|syncer"
_CHUNK = 256  # random gaps drawn per seeded chunk


def config() -> ml_collections.ConfigDict:
  """The ``faults`` section of the base config: every fault off."""
  c = ml_collections.ConfigDict()
  c.kill = ""  # "ROLE@STEP,...": SIGKILL process/I, island/K or syncer (STEP: rounds) once
  c.nonfinite = ""  # "STEP:ISLAND,...": a NaN loss mask in that island's batch of inner step STEP
  c.record_batches = False  # decoupled islands log a sha1 of every batch read (a data check)
  c.mtbf_steps = 0.0  # > 0: random kills, this mean number of steps (syncer: rounds) apart
  c.random_roles = ""  # which roles fail at random: "island/*,syncer", "process/0", ...
  c.seed = 0  # the random schedule's seed
  return c


def marker(workdir: str, role: str, step: int) -> str:
  """The file that says the kill of ``role`` at ``step`` has fired in this run."""
  return os.path.join(workdir, ".faults", f"{role}@{step}")


@functools.lru_cache(maxsize=64)
def _times(seed: int, role: str, mtbf: float, chunks: int) -> np.ndarray:
  """The first ``chunks * _CHUNK`` random kill steps of ``role`` (increasing, >= 1)."""
  gaps = [np.random.default_rng([seed, zlib.crc32(role.encode()), i]).geometric(
      1.0 / mtbf, _CHUNK) for i in range(chunks)]
  return np.cumsum(np.concatenate(gaps))


def random_kill_steps(seed: int, role: str, mtbf: float, until: int) -> list[int]:
  """The random kill steps of ``role`` up to ``until``: gaps ceil(Exp), mean ``mtbf``; the
  same for any ``until`` (each chunk of gaps has its own seed)."""
  chunks = 1
  while _times(seed, role, mtbf, chunks)[-1] <= until:
    chunks *= 2
  times = _times(seed, role, mtbf, chunks)
  return [int(t) for t in times[:np.searchsorted(times, until, side="right")]]


def _items(text: str, pattern: str, key: str, expected: str) -> list[re.Match]:
  out = []
  for item in filter(None, (s.strip() for s in str(text).split(","))):
    m = re.fullmatch(pattern, item)
    if not m:
      raise ValueError(f"faults.{key}={text!r}: expected {expected} separated by commas")
    out.append(m)
  return out


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(msg)


def _check_islands(islands, kills, nonfinite) -> None:
  """Every island that ``faults.kill`` / ``faults.nonfinite`` names exists."""
  parts = max(int(islands.num), int(islands.get("max_num", 0)))
  named = [("kill", int(r.split("/")[1])) for r, _ in kills if r.startswith("island/")]
  for key, k in named + [("nonfinite", k) for _, k in nonfinite]:
    _check(k < parts, f"faults.{key} names island {k}, but there are {parts} islands "
           "(islands.num, islands.max_num)")


class Plan(NamedTuple):
  """The faults of one run (:meth:`from_config`); every method is a pure function of it and
  the arguments, except :meth:`maybe_kill`, which reads and writes the workdir's markers."""
  kills: tuple[tuple[str, int], ...] = ()  # (role, step)
  nonfinite: tuple[tuple[int, int], ...] = ()  # (step, island)
  record_batches: bool = False
  mtbf_steps: float = 0.0
  random_roles: tuple[str, ...] = ()  # fnmatch patterns
  seed: int = 0

  @classmethod
  def from_config(cls, config) -> Plan:
    """Parses and checks ``config.faults`` (none: no faults); a bad value is a ValueError
    naming its key."""
    f = config.get("faults")
    if f is None:
      return cls()
    kills = tuple((m.group(1), int(m.group(2))) for m in _items(
        f.kill, rf"({_ROLE})@(\d+)", "kill",
        "'ROLE@STEP' items (ROLE: process/I, island/K, syncer or syncer/S)"))
    nonfinite = tuple(health.parse_pairs(str(f.nonfinite), "faults.nonfinite"))
    roles = tuple(m.group(0) for m in _items(
        f.random_roles, _PATTERN, "random_roles",
        "roles (process/I, island/K, syncer, syncer/S; '*' for any index)"))
    mtbf = float(f.mtbf_steps)
    _check(mtbf == 0 or mtbf >= 1, f"faults.mtbf_steps={f.mtbf_steps} must be 0 (off) or >= 1")
    _check(not mtbf or roles, f"faults.mtbf_steps={f.mtbf_steps} needs faults.random_roles "
           "(which roles fail at random, e.g. 'island/*')")
    _check(mtbf or not roles, f"faults.random_roles={f.random_roles!r} needs faults.mtbf_steps "
           "> 0 (the mean steps between failures)")
    if "islands" in config:
      _check_islands(config.islands, kills, nonfinite)
    return cls(kills, nonfinite, bool(f.record_batches), mtbf, roles, int(f.seed))

  def kill_steps(self, role: str, until: int) -> list[int]:
    """Every step (fixed and random) at which ``role`` is to be killed, up to ``until``."""
    steps = {s for r, s in self.kills if r == role and s <= until}
    if self.mtbf_steps and any(fnmatch.fnmatchcase(role, p) for p in self.random_roles):
      steps.update(random_kill_steps(self.seed, role, self.mtbf_steps, until))
    return sorted(steps)

  def due(self, role: str, at: int, workdir: str) -> int | None:
    """The earliest kill step <= ``at`` of ``role`` that has not fired yet, or None."""
    return next((s for s in self.kill_steps(role, at)
                 if not os.path.exists(marker(workdir, role, s))), None)

  def maybe_kill(self, role: str, at: int, workdir: str,
                 before: Callable[[], object] | None = None) -> None:
    """SIGKILLs this process if a kill of ``role`` is due at ``at`` (steps; rounds closed for
    the syncer), once per run: ``before()`` runs first (e.g. wait for a save in flight), then
    the marker is written, then the signal."""
    step = self.due(role, at, workdir)
    if step is None:
      return
    if before is not None:
      before()
    path = marker(workdir, role, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    print(f"[fedjax_lm] faults: SIGKILL {role} at {at} (kill step {step})", file=sys.stderr,
          flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

  def nonfinite_islands(self, step: int) -> list[int]:
    """Islands whose batch of inner step ``step`` (1-based) is poisoned."""
    return sorted({m for s, m in self.nonfinite if s == step})


def validate(config) -> None:
  """One clear error naming the first bad ``faults.*`` value (what ``config_lib.validate``
  calls)."""
  Plan.from_config(config)
