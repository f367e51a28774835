"""The parent side of the ``quick`` / ``full`` suites: plans the runs as jobs and runs them.

``python -m experiments.bench --suite quick|full`` calls ``run_suite``; the runs themselves are
:mod:`experiments.bench.suites`' (its worker processes), the report
:mod:`experiments.bench.report`'s.

Phases (``run_suite``):
1. **training, in parallel**: ``--workers`` long-lived processes, each pinned to its own core
   with single-threaded XLA, take jobs from one queue in order (each claims the next job no
   other took). A job is a list of runs:
   - each methods-table run alone (``method_train``, with its peak RSS: the process's, reset at
     the run's start); these go first, and compile the programs most sweep runs share;
   - the sweep runs (``runs``), grouped by their inner-step program (algorithm, M, per-island
     batch, inner optimizer, model): a group whose program no method compiled is one job, so
     one process compiles it (largest first); the runs whose program is compiled already are
     cut into jobs of ``CHUNK`` runs that fill in at the end. The ``full`` suite's runs (half
     an hour each, a compile is noise) are one per job instead, sweep by sweep in the order
     of ``suites.FULL_ORDER``.
   A persistent XLA compilation cache under ``/tmp/fedjax_lm_suite_<suite>/`` (with the
   worker logs and the queue) shares compiled programs between the processes.
2. **timing, alone**: one process on the otherwise idle machine times every method's inner
   step (M islands, one device) and one outer sync, and one island's step against the plain
   data-parallel step (interleaved rounds, median; once per distinct one-island program), and
   reads the outer state's bytes (``suites.methods_timing``).
3. **layout**: a 4-device process reads the same bytes on the config's real layout.
Finished rows are appended to ``DIR/runs.jsonl`` and reused when the suite is run again
(delete the file to start over). The ``full`` suite's training runs also checkpoint at every
eval under ``/tmp/fedjax_lm_suite_full/resume/``: run again, a run that was killed part-way
continues from there, exactly (delete that directory to start them over).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from experiments.bench import suites

CHUNK = 1  # sweep runs per job when their programs are compiled already


def _inner_program(run: dict, suite: str) -> str:
  """What the run's inner-step program depends on (runs that share it compile it once)."""
  return suites.inner_program(suites.suite_overrides(suite, run))


def _priority(suite: str):
  """Sort key of sweep points: the ``full`` suite (days) runs the sweeps in the order of
  ``suites.FULL_ORDER``, so each session's share completes whole sweeps first; others keep
  the grid's order."""
  order = suites.FULL_ORDER if suite in suites.RESUMABLE else ()
  return lambda point: order.index(point[0]) if point[0] in order else len(order)


def plan(suite: str, have: set[tuple[str, str]],
         sweeps: bool = True) -> tuple[list[dict], list[dict]]:
  """(parallel jobs ``{"kind", "runs"}``, methods still to time) given the (kind, key) rows
  already recorded; ``sweeps=False``: the methods table's runs only."""
  key = lambda run: suites._key(run, suite)  # pylint: disable=protected-access
  timed = {k for kind, k in have if kind in ("method", "method_timing")}
  untimed = lambda runs: [run for run in runs if key(run) not in timed]
  meth = list({key(run): run for _, run in suites.methods(suite)}.values())  # distinct runs
  trained = {k for kind, k in have if kind in ("method", "method_train")}
  jobs = [{"kind": "method_train", "runs": [run]} for run in meth if key(run) not in trained]
  seen = {k for kind, k in have if kind == "runs"} | trained | {key(run) for run in meth}
  todo = []
  for *_, run in sorted(suites.sweeps(suite) if sweeps else (), key=_priority(suite)):
    if key(run) not in seen:
      seen.add(key(run))
      todo.append(run)
  if suite in suites.RESUMABLE:  # long runs: one per job, the sweeps in order of priority
    return jobs + [{"kind": "runs", "runs": [run]} for run in todo], untimed(meth)
  groups: dict[str, list[dict]] = {}
  for run in todo:
    groups.setdefault(_inner_program(run, suite), []).append(run)
  compiled = {_inner_program(run, suite) for run in meth}
  new = sorted((g for p, g in groups.items() if p not in compiled), key=len, reverse=True)
  ready = [run for p, g in groups.items() if p in compiled for run in g]
  jobs += [{"kind": "runs", "runs": g} for g in new]
  jobs += [{"kind": "runs", "runs": ready[i:i + CHUNK]} for i in range(0, len(ready), CHUNK)]
  return jobs, untimed(meth)


def _spawn(spec: dict, devices: int = 1) -> subprocess.Popen:
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top  (no jax: env helpers only)
  env = cpu.malloc_env(dict(os.environ))
  env.setdefault("JAX_PLATFORMS", "cpu")
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  path = os.path.join(spec["logs"], f"{spec['kind']}.log")
  log = open(path, "a")  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, "-m", "experiments.bench.suites", json.dumps(spec)],
                          stdout=log, stderr=subprocess.STDOUT, env=env)


def _fail(p: subprocess.Popen) -> None:
  sys.exit(f"error: suite worker {p.args[-1][:200]} failed (rc {p.returncode}); see the "
           "*.log files in /tmp/fedjax_lm_suite_<suite>/")


def _run_queue(jobs: list[dict], base: dict, workers: int, deadline: float = math.inf) -> None:
  """``workers`` processes, each pinned to its own core, take ``jobs`` in order until none is
  left (each claims the next job no other took) or until ``deadline`` (``time.time()``), when
  they are killed (a resumable suite's runs continue from their last checkpoint next time)."""
  queue = os.path.join(base["logs"], "jobs.json")
  for name in os.listdir(base["logs"]):
    if name.startswith("jobs.json"):
      os.remove(os.path.join(base["logs"], name))
  with open(queue, "w") as f:
    json.dump(jobs, f)
  cores = sorted(os.sched_getaffinity(0))
  n = max(1, min(workers, len(cores), len(jobs)))
  procs = [_spawn({**base, "kind": "queue", "jobs": queue,
                   "one_core": cores[w] if n > 1 else None}) for w in range(n)]
  while procs:
    time.sleep(0.2)
    if time.time() > deadline:
      for p in procs:
        p.kill()
        p.wait()
      print(f"--hours: the training phase's budget is spent; {len(procs)} worker(s) stopped",
            flush=True)
      return
    for p in [p for p in procs if p.poll() is not None]:
      procs.remove(p)
      if p.returncode:
        for q in procs:
          q.kill()
        _fail(p)


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def run_suite(suite: str, out: str, workers: int = 2, methods_only: bool = False,
              hours: float | None = None) -> dict:
  """Runs (or completes) every phase of ``suite``; returns {methods, layout, sweeps} rows
  (``methods_only``: no sweeps, ``sweeps`` empty; ``hours``: the training phase stops after
  that long, and the sweep points not trained yet are None)."""
  deadline = time.time() + hours * 3600 if hours else math.inf
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "runs.jsonl")
  tmp = os.path.join("/tmp", f"fedjax_lm_suite_{suite}")
  os.makedirs(tmp, exist_ok=True)
  base = {"suite": suite, "out": path, "cache": os.path.join(tmp, "xla_cache"),
          "workdir": os.path.join(tmp, f"runs_{os.getpid()}"), "logs": tmp,
          "resume_dir": os.path.join(tmp, "resume") if suite in suites.RESUMABLE else None}
  key = lambda run: suites._key(run, suite)  # pylint: disable=protected-access
  jobs, untimed = plan(suite, {(r["kind"], r["key"]) for r in _read(path)}, not methods_only)
  if jobs:
    _run_queue(jobs, base, workers, deadline)
  trained = {r["key"] for r in _read(path) if r["kind"] in ("method", "method_train")}
  if any(key(run) not in trained for _, run in suites.methods(suite)):
    sys.exit(f"--hours {hours}: the methods table's training runs are not all done; run the "
             "same command again to continue them (finished rows are kept)")
  if untimed:
    p = _spawn({**base, "kind": "method_timing", "runs": untimed})
    if p.wait():
      _fail(p)
  by: dict[str, dict] = {}
  for r in _read(path):
    by.setdefault(r["kind"], {})[r["key"]] = r
  meth = suites.methods(suite)
  with open(path, "a") as f:  # a method's row: its training and its timing, joined
    for _, run in meth:
      if key(run) not in by.get("method", {}):
        row = {**by["method_train"][key(run)], **by["method_timing"][key(run)], "kind": "method"}
        by.setdefault("method", {})[key(run)] = row
        f.write(json.dumps(row) + "\n")
  missing = [r for _, r in meth if key(r) not in by.get("layout", {})]
  if missing:
    p = _spawn({**base, "kind": "layout", "runs": missing}, devices=4)
    if p.wait():
      _fail(p)
    for r in _read(path):
      by.setdefault(r["kind"], {})[r["key"]] = r
  return {"methods": [(name, by["method"][key(run)]) for name, run in meth],
          "layout": by.get("layout", {}),
          "sweeps": [(sw, series, x, by.get("runs", {}).get(key(run)) or
                      by.get("method", {}).get(key(run)))
                     for sw, series, x, run in ([] if methods_only else
                                                suites.sweeps(suite))]}
