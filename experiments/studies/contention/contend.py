"""What two processes, one per core, take from each other on this machine: solo vs together.

    python -m experiments.studies.contention.contend [--seconds 8]

Three single-threaded numpy kernels, each timed alone on core 0 and on core 1, then on both
cores at once over the same window: a 512³ f32 matmul (compute-bound), a 64 MiB copy (DRAM
bandwidth) and a 1 MiB copy (stays in L2). Scaling = together ÷ the mean solo figure; 2.00×
means the cores share nothing that kernel needs. On a VM whose two vCPUs are SMT siblings the
matmul scales well below 2×; where they share the memory system, the 64 MiB copy does. It says
which of a step's costs (FLOPs or DRAM traffic) the 2-process layout pays for.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

KERNELS = ("matmul 512³ (GFLOP/s)", "copy 64 MiB (GB/s)", "copy 1 MiB (GB/s)")


def kernel_rate(kind: int, core: int, start_at: float, seconds: float) -> float:
  """Units per second of kernel ``kind`` on ``core`` from ``start_at`` for ``seconds``."""
  os.sched_setaffinity(0, {core})
  import numpy as np  # pylint: disable=g-import-not-at-top  (after the thread count is set)
  if kind == 0:
    a, b = (np.random.default_rng(i).random((512, 512), np.float32) for i in (0, 1))
    run, unit = (lambda: a @ b), 2 * 512**3 / 1e9
  else:
    src = np.ones((64 if kind == 1 else 1) * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    run, unit = (lambda: np.copyto(dst, src)), 2 * src.nbytes / 1e9  # read + write
  for _ in range(5):
    run()
  time.sleep(max(0.0, start_at - time.time()))
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    run()
    n += 1
  return n * unit / (time.perf_counter() - t0)


def _spawn(kind: int, core: int, start_at: float, seconds: float) -> subprocess.Popen:
  env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
  return subprocess.Popen([sys.executable, "-m", "experiments.studies.contention.contend",
                           "--worker", f"{kind},{core},{start_at},{seconds}"],
                          stdout=subprocess.PIPE, text=True, env=env)


def _rates(procs: list[subprocess.Popen]) -> list[float]:
  outs = [p.communicate()[0] for p in procs]
  if any(p.returncode for p in procs):
    raise SystemExit("contend: a worker failed")
  return [float(o.strip().splitlines()[-1]) for o in outs]


def measure(seconds: float) -> list[dict]:
  cores = sorted(os.sched_getaffinity(0))[:2]
  if len(cores) < 2:
    raise SystemExit("contend: needs 2 usable cores")
  rows = []
  for kind, name in enumerate(KERNELS):
    solo = [_rates([_spawn(kind, c, time.time() + 2, seconds)])[0] for c in cores]
    start_at = time.time() + 3
    both = _rates([_spawn(kind, c, start_at, seconds) for c in cores])
    rows.append({"kernel": name, "solo": solo, "together": both,
                 "scaling": sum(both) / (sum(solo) / 2)})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--seconds", type=float, default=8.0)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    kind, core, start_at, seconds = args.worker.split(",")
    print(kernel_rate(int(kind), int(core), float(start_at), float(seconds)))
    return
  from fedjax_lm import machine  # pylint: disable=g-import-not-at-top
  print(f"{machine.describe()}\n")
  print("| kernel, 1 thread | solo core 0 / core 1 | together, core 0 + core 1 | scaling |")
  print("|---|---|---|---|")
  for r in measure(args.seconds):
    print(f"| {r['kernel']} | {r['solo'][0]:.1f} / {r['solo'][1]:.1f} | "
          f"{r['together'][0]:.1f} + {r['together'][1]:.1f} | {r['scaling']:.2f}× |")


if __name__ == "__main__":
  main()
