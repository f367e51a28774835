"""The 2025-26 frontier methods (issue 45) beside DDP and DiLoCo at the quick suite's size.

The rows are the quick suite's methods-table rows (:func:`experiments.bench.suites.methods`)
for DDP, DiLoCo (config defaults; at H=10, DES-LOC's baseline; at M=4 with heavy-ball
momentum, NoLoCo's), DeMo, NoLoCo, DES-LOC, delayed DiLoCo and HeLoCo, each at seeds 0 and 1,
trained as side runs of the quick suite (``suites`` worker kind ``runs``, one process at a
time) into ``experiments/results/frontier/side_runs.jsonl``; runs already there (same
``suites._key``) are not run again.

    python -m experiments.bench.frontier run      # the missing runs (about 1-2 min each)
    python -m experiments.bench.frontier table    # the markdown table from the rows
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments.bench import suites

OUT = "experiments/results/frontier/side_runs.jsonl"
SEEDS = (0, 1)
# (methods-table name prefix, baseline row prefix or None) in table order
ROWS = (("DDP (M=2)", None),
        ("DiLoCo (M=2, H=50), config defaults", None),
        ("DiLoCo (M=2, H=10), config defaults", None),
        ("DeMo", None),
        ("DiLoCo (M=4, H=50), heavy-ball", None),
        ("NoLoCo", "DiLoCo (M=4, H=50), heavy-ball"),
        ("DES-LOC", "DiLoCo (M=2, H=10), config defaults"),
        ("Delayed DiLoCo", None),
        ("HeLoCo", "Delayed DiLoCo"))
# Paper-fidelity checks outside the methods table: DES-LOC's own box (FedAvg on the params)
# against Local Adam (the same with every moment averaged at every sync), the paper's baseline
FEDAVG10 = {"outer.optimizer": "fedavg", "outer.sync_every": 10}
EXTRA = (("Local Adam (FedAvg, H=K_u=K_v=10)",
          {**FEDAVG10, "outer.desloc_mu_every": 10, "outer.desloc_nu_every": 10}, None),
         ("DES-LOC box (FedAvg, H=10, K_u=30, K_v=60)",
          {**FEDAVG10, "outer.desloc_mu_every": 30, "outer.desloc_nu_every": 60},
          "Local Adam (FedAvg, H=K_u=K_v=10)"))
# DeMo with the authors' per-coefficient average (outer.demo_aggregate=selected), against the
# methods table's DeMo row (the mean of the decoded payloads)
_DEMO = next(r for n, r in suites.methods("quick") if n.startswith("DeMo"))
EXTRA += (("DeMo, per-coefficient average (the authors' aggregation)",
           {**_DEMO, "outer.demo_aggregate": "selected"},
           next(n for n, _ in suites.methods("quick") if n.startswith("DeMo"))),)


def rows() -> list[tuple[str, dict, str | None]]:
  """(name, overrides, baseline name) of the table's rows, from the quick methods table, then
  ``EXTRA``."""
  meth = suites.methods("quick")
  find = lambda prefix: next((n, r) for n, r in meth if n.startswith(prefix))
  out = []
  for prefix, base in ROWS:
    name, run = find(prefix)
    out.append((name, run, find(base)[0] if base else None))
  return out + list(EXTRA)


def seeded(run: dict, seed: int) -> dict:
  return {**run, "seed": seed} if seed else dict(run)


def read(path: str = OUT) -> dict[str, dict]:
  """key -> the last row of that key in ``path``."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["key"]: r for r in map(json.loads, f) if r.get("kind") == "runs"}


def run(path: str = OUT) -> None:
  have = read(path)
  todo = [seeded(r, s) for s in SEEDS for _, r, _ in rows()
          if suites._key(seeded(r, s)) not in have]  # pylint: disable=protected-access
  print(f"{len(todo)} runs to do", flush=True)
  if todo:
    spec = {"kind": "runs", "suite": "quick", "one_core": 0, "out": path,
            "workdir": "/tmp/fedjax_lm_frontier", "cache": "/tmp/fedjax_lm_suite_quick/xla_cache",
            "runs": todo}
    subprocess.run([sys.executable, "-m", "experiments.bench.suites", json.dumps(spec)],
                   check=True)


def table(path: str = OUT) -> str:
  have = read(path)
  key = suites._key  # pylint: disable=protected-access
  got = {name: [have.get(key(seeded(r, s))) for s in SEEDS] for name, r, _ in rows()}
  mean = lambda rs: sum(r["eval_loss"] for r in rs) / len(rs)
  ddp = got[rows()[0][0]]
  lines = ["| method | seed 0 loss | seed 1 loss | mean ÷ DDP mean | bytes ÷ DDP | "
           "mean ÷ its baseline |", "|---|---|---|---|---|---|"]
  for name, _, base in rows():
    rs = got[name]
    if any(r is None for r in rs):
      lines.append(f"| {name} | (not run) | | | | |")
      continue
    rel = (f"{mean(rs) / mean(got[base]):.4f} ({base})"
           if base and all(got[base]) else "")
    lines.append(f"| {name} | {rs[0]['eval_loss']:.4f} | {rs[1]['eval_loss']:.4f} | "
                 f"{mean(rs) / mean(ddp):.4f} | "
                 f"{rs[0]['island_bytes'] / ddp[0]['island_bytes']:.4f} | {rel} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if sys.argv[1:] == ["run"]:
    run()
  elif sys.argv[1:] == ["table"]:
    print(table())
  else:
    sys.exit(__doc__)
