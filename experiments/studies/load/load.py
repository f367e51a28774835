"""Is one process per core one busy thread per core? A training command's load, timed.

    python -m experiments.studies.load.load [--rounds 1] [--toggle pin_cores|heap|tcmalloc|all]
        [--out experiments/studies/load/load.md]

Runs the default run (``configs/shakespeare.py``: 2 processes, one island of 2 devices) with
``launch.pin_cores`` off and on (or, ``--toggle heap``, pinned with fedjax_lm's one-core heap
tunables off and on: ``FEDJAX_LM_HEAP_DEFAULTS``; ``--toggle tcmalloc``, pinned with TCMalloc's
preload off and on: ``FEDJAX_LM_TCMALLOC``; ``--toggle all``, the three off and on: the run
before these defaults and with them), alternately, each in a fresh work directory.
While each runs it samples, once a second, the 1-minute load average and the runnable threads
(``procs_running`` of ``/proc/stat``, this run's and anything else's); after it, the logged
tokens/s of every interval (``metrics.jsonl``, the first interval, which holds the compiles,
left out) and the eval losses. On C cores, C processes pinned one per core should keep the
runnable threads near C; more means threads wait for a core, and the per-interval tokens/s
spread out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from fedjax_lm import cpu
from fedjax_lm import machine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/shakespeare.py"
_DEFAULTS = ("pin_cores", "heap", "tcmalloc")  # what --toggle turns off and on


def _runnable() -> int:
  with open("/proc/stat", encoding="utf-8") as f:
    for line in f:
      if line.startswith("procs_running"):
        return int(line.split()[1]) - 1  # less this sampler
  return 0


def _load1() -> float:
  with open("/proc/loadavg", encoding="utf-8") as f:
    return float(f.read().split()[0])


def run_once(workdir: str, pin: bool, heap: bool = True, tcmalloc: bool = True) -> dict:
  """One run of the default config: load samples, per-interval tokens/s, evals, wall time."""
  shutil.rmtree(workdir, ignore_errors=True)
  env = {**os.environ, "FEDJAX_LM_HEAP_DEFAULTS": "1" if heap else "0",
         "FEDJAX_LM_TCMALLOC": "1" if tcmalloc else "0"}
  if not tcmalloc:
    env = cpu.without_tcmalloc(env)
  args = [sys.executable, "-m", "experiments.train", "--config", CONFIG, "--workdir", workdir,
          f"--config.launch.pin_cores={pin}"]
  samples, stop = [], threading.Event()

  def sample():
    while not stop.wait(1.0):
      samples.append((_load1(), _runnable()))

  thread = threading.Thread(target=sample, daemon=True)
  start = time.time()
  thread.start()
  done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
  stop.set()
  thread.join()
  if done.returncode:
    raise SystemExit(f"load: {' '.join(args)} failed:\n{done.stderr[-2000:]}")
  wall = time.time() - start
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  return {"pin_cores": pin, "heap": heap, "tcmalloc": tcmalloc, "wall_s": wall,
          "load_max": max(l for l, _ in samples),
          "runnable_mean": statistics.mean(r for _, r in samples),
          "runnable_p90": sorted(r for _, r in samples)[int(0.9 * (len(samples) - 1))],
          "tokens_per_s": rates, "evals": evals}


def report(runs: list[dict], command: str) -> str:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()
  lines = [f"Regenerate: `{command}`", "",
           f"Measured at {commit}, {time.strftime('%Y-%m-%d')}, on {machine.describe()}. "
           f"`{CONFIG}` (2 processes, one per core), each row one run; load sampled once a "
           "second; tokens/s per logged interval after the first.", "",
           "| launch.pin_cores, heap tunables, TCMalloc | wall s | 1-min load, max | "
           "runnable threads, mean / p90 | tokens/s per interval, min–max (median) | "
           "eval losses |",
           "|---|---|---|---|---|---|"]
  for r in runs:
    t = r["tokens_per_s"]
    lines.append(
        f"| {r['pin_cores']}, {r['heap']}, {r['tcmalloc']} | {r['wall_s']:.0f} | "
        f"{r['load_max']:.2f} | "
        f"{r['runnable_mean']:.1f} / {r['runnable_p90']} | {min(t):,.0f}–{max(t):,.0f} "
        f"({statistics.median(t):,.0f}) | {' / '.join(f'{e:.4f}' for e in r['evals'])} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (off, on)")
  parser.add_argument("--toggle", choices=(*_DEFAULTS, "all"), default="pin_cores")
  parser.add_argument("--workdir", default="runs/bench_load")
  parser.add_argument("--out", default=os.path.join("experiments", "studies", "load", "load.md"))
  args = parser.parse_args(argv)
  runs = []
  for i in range(args.rounds):
    for on in (False, True):
      which = {k: on if args.toggle in (k, "all") else True for k in _DEFAULTS}
      runs.append(run_once(os.path.join(args.workdir, f"{i}_{args.toggle}_{on}"),
                           which["pin_cores"], which["heap"], which["tcmalloc"]))
      print(json.dumps(runs[-1]), flush=True)
  text = report(runs, f"python -m experiments.studies.load.load --rounds {args.rounds} "
                f"--toggle {args.toggle} --out {args.out}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
