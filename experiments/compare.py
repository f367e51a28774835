"""DDP vs FedAvg vs DiLoCo on the same setup and tokens: runs each, prints a Markdown table.

  python -m experiments.compare --workdir runs/compare

Each run is ``python -m experiments.train`` (4 local processes: 2 islands x 2 devices);
extra ``--override key=value`` flags go to every run (e.g. ``--override total_steps=100``).
"""

import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from fedjax_lm import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Parent directory of the runs.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "key=value applied to every run.")

RUNS = (
    ("DDP", "configs/shakespeare_ddp.py", []),
    ("FedAvg (M=2, H=50)", "configs/shakespeare_diloco.py", ["outer.optimizer=fedavg"]),
    ("DiLoCo (M=2, H=50)", "configs/shakespeare_diloco.py", []),
)


def main(argv):
  del argv
  rows = []
  for name, config, overrides in RUNS:
    workdir = os.path.join(_WORKDIR.value, name.split()[0].lower())
    args = [f"--config.{o}" for o in (*overrides, *_OVERRIDES.value)]
    start = time.time()
    subprocess.run([sys.executable, "-m", "experiments.train", "--config", config,
                    "--workdir", workdir, *args], check=True)
    last = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
    rows.append((name, last, time.time() - start))
  print("\n| algorithm | tokens | eval loss (nats/byte) | island_bytes (per island) | "
        "vs DDP bytes | wall (s) |")
  print("|---|---|---|---|---|---|")
  ddp_bytes = rows[0][1]["island_bytes"]
  for name, last, wall in rows:
    print(f"| {name} | {last['tokens']:,} | {last['eval_loss']:.4f} | "
          f"{last['island_bytes']:,} | {last['island_bytes'] / ddp_bytes:.4f} | {wall:.0f} |")


if __name__ == "__main__":
  app.run(main)
