"""Islands of different sizes at the quick suite's size: the plain mean against the
token-weighted merge (Decoupled DiLoCo, arXiv 2604.21428), as decoupled island jobs and a
syncer (``fedjax_lm/decoupled/tokens.py``), 2 seeds, at the quick DiLoCo row's tokens (16 rows
a step in all) and bytes; loss ÷ the quick suite's DDP and DiLoCo (equal islands) rows
(``experiments/results/frontier/side_runs.jsonl``, same seeds).

    python -m experiments.studies.tokens.run --workdir runs/tokens \
        --out experiments/studies/tokens/summary.md

A run whose workdir holds its final eval is read, not run again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from experiments.bench import frontier
from experiments.bench import suites
from fedjax_lm import metrics as metrics_lib

# (name, rows per step of islands 0 and 1, their devices, merge)
ROWS = (("equal islands 8 + 8 rows (1 + 1 devices), mean", "8,8", "1,1", "mean"),
        ("12 + 4 rows (2 + 1 devices), mean", "12,4", "2,1", "mean"),
        ("12 + 4 rows (2 + 1 devices), tokens (3 : 1)", "12,4", "2,1", "tokens"),
        ("14 + 2 rows (2 + 1 devices), mean", "14,2", "2,1", "mean"),
        ("14 + 2 rows (2 + 1 devices), tokens (7 : 1)", "14,2", "2,1", "tokens"))


def overrides(sizes: str, devices: str, merge: str, seed: int) -> dict:
  """The quick suite's DiLoCo row (M=2, H=50, config defaults) as decoupled island jobs."""
  out = suites.suite_overrides("quick", {"outer.sync_every": 50})
  out.update({"launch.mode": "decoupled", "mesh.data": -1, "islands.batch_sizes": sizes,
              "islands.devices": devices, "outer.merge": merge, "seed": seed})
  return out


def run_one(workdir: str, over: dict) -> tuple[dict, float]:
  path = os.path.join(workdir, "metrics.jsonl")
  records = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
  wall = float("nan")
  if not records or records[-1]["step"] != over["total_steps"]:
    start = time.time()
    subprocess.run([sys.executable, "-m", "experiments.train", "--config", suites.BASE,
                    "--workdir", workdir, *(f"--config.{k}={v}" for k, v in over.items())],
                   check=True)
    wall = time.time() - start
    records = metrics_lib.read_jsonl(path)
  return records[-1], wall


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/tokens", help="parent directory of the runs")
  parser.add_argument("--out", default=None, help="also write the table (and the command) here")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  args = parser.parse_args(argv)
  seeds = args.seeds
  have = frontier.read()
  key = suites._key  # pylint: disable=protected-access
  base = lambda prefix, s: have[key(frontier.seeded(next(
      r for n, r in suites.methods("quick") if n.startswith(prefix)), s))]
  ddp = [base("DDP (M=2)", s) for s in seeds]
  diloco = [base("DiLoCo (M=2, H=50), config defaults", s) for s in seeds]
  mean = lambda xs: sum(xs) / len(xs)
  lines = ["| islands | " + " | ".join(f"seed {s}" for s in seeds) +
           " | mean ÷ DDP | mean ÷ DiLoCo (equal islands, mesh-axis) | bytes ÷ DDP | wall s |",
           "|---|" + "---|" * (len(seeds) + 4)]
  lines.append("| quick suite DiLoCo (M=2, H=50), mesh-axis, simulated | " +
               " | ".join(f"{r['eval_loss']:.4f}" for r in diloco) +
               f" | {mean([r['eval_loss'] for r in diloco]) / mean([r['eval_loss'] for r in ddp]):.4f}"
               " | 1 | " + f"{diloco[0]['island_bytes'] / ddp[0]['island_bytes']:.4f} | |")
  for name, sizes, devices, merge in ROWS:
    got = []
    for s in seeds:
      tag = "".join(c if c.isalnum() else "_" for c in f"{sizes}_{devices}_{merge}_s{s}")
      got.append(run_one(os.path.join(args.workdir, tag), overrides(sizes, devices, merge, s)))
      print(name, s, got[-1][0]["eval_loss"], flush=True)
    losses = [r["eval_loss"] for r, _ in got]
    lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in losses) +
                 f" | {mean(losses) / mean([r['eval_loss'] for r in ddp]):.4f}"
                 f" | {mean(losses) / mean([r['eval_loss'] for r in diloco]):.4f}"
                 f" | {got[0][0]['island_bytes'] / ddp[0]['island_bytes']:.4f}"
                 f" | {' / '.join(f'{w:.0f}' for _, w in got)} |")
  table = "\n".join(lines)
  print("\n" + table)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(f"Regenerate: `python -m experiments.studies.tokens.run {' '.join(argv)}`"
              f"\n\n{table}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
