"""Runs the "sparseloco" set (``sets.py``) one run at a time (simulated, one process)
and writes ``summary.md`` beside this file: final eval loss, loss / DiLoCo at the same size and
H, and the bytes one island sent.

  python experiments/studies/sparseloco/make_summary.py --workdir runs/sparseloco/set

(``python -m experiments.compare --set sparseloco --workdir runs/sparseloco/set`` trains the
same runs into the same workdirs; its table divides by DDP, which this set has none of, hence
this script's table.) A run whose workdir already holds its final metrics is read, not re-run.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from experiments.studies.sparseloco import sets
from fedjax_lm import metrics as metrics_lib  # pylint: disable=g-import-not-at-top


def _machine() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Model name" in l)
  except (OSError, subprocess.CalledProcessError, StopIteration):
    name = platform.processor() or "unknown CPU"
  return f"{name}, {os.cpu_count()} cores"


def _total(records, overrides, config) -> int:
  """The run's total_steps: from its overrides, else its config file's."""
  for o in overrides:
    if o.startswith("total_steps="):
      return int(o.split("=", 1)[1])
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(config[:-3].replace("/", "."))
  return int(module.get_config().total_steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="runs/sparseloco/set")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "summary.md"))
  parser.add_argument("--no_run", action="store_true",
                      help="only read finished runs; list the others as not measured")
  args = parser.parse_args()
  rows = []
  for name, config, overrides in sets.RUN_SETS["sparseloco"]:
    workdir = os.path.join(args.workdir, "".join(c if c.isalnum() else "_" for c in name))
    path = os.path.join(workdir, "metrics.jsonl")
    records = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
    done = bool(records) and records[-1].get("step") == _total(records, overrides, config)
    if not done and args.no_run:
      rows.append((name, None))
      continue
    if not done:
      subprocess.run([sys.executable, "-m", "experiments.train", "--config", config,
                      "--workdir", workdir, *[f"--config.{o}" for o in overrides]],
                     check=True, cwd=ROOT)
      records = metrics_lib.read_jsonl(path)
    rows.append((name, records[-1]))
  base = {name.replace("DiLoCo", "", 1): r["eval_loss"] for name, r in rows
          if name.startswith("DiLoCo") and r}
  lines = ["| method | final eval loss | loss / DiLoCo (same size, H) | island_bytes | "
           "bytes / DiLoCo |", "|---|---|---|---|---|"]
  dil_bytes = {name.replace("DiLoCo", "", 1): r["island_bytes"] for name, r in rows
               if name.startswith("DiLoCo") and r}
  for name, r in rows:
    key = " (" + name.split(" (", 1)[1]
    if r is None or key not in base:
      lines.append(f"| {name} | " + (
          "not measured (ran out of time) | — | — | — |" if r is None
          else f"{r['eval_loss']:.4f} | — | {int(r['island_bytes']):,} | — |"))
      continue
    lines.append(f"| {name} | {r['eval_loss']:.4f} | {r['eval_loss'] / base[key]:.4f} | "
                 f"{int(r['island_bytes']):,} | {r['island_bytes'] / dil_bytes[key]:.4f} |")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
  with open(args.out, "w") as f:
    f.write(f"Regenerate: `python experiments/studies/sparseloco/make_summary.py --workdir "
            f"{args.workdir}`\n\nMeasured at commit {commit} (plus this change's working tree), "
            f"{datetime.date.today()}, {_machine()}, seed 0, islands simulated in one "
            f"process.\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
