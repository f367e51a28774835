"""Goodput under random failures: decoupled DiLoCo against sync-every-step, same failures.

    python -m experiments.goodput --out experiments/results/goodput [--steps 200 --mtbf 60,30]

Every run is ``experiments.train --config.launch.mode=decoupled`` on the tiny model, M = 2
islands, each island paced to ``--step-seconds`` per inner step (``islands.step_seconds``: the
two islands share this machine's cores but run as if each had its own hardware). Failures come
from the fault-injection module (:mod:`fedjax_lm.faults`): every island is SIGKILLed at seeded
random steps with mean time between failures ``faults.mtbf_steps`` (its own steps), restarted
by the launcher, and rejoins; with ``--roles 'island/*,syncer'`` the syncer too (its MTBF in
its own rounds; it resumes from its checkpoint and the islands resend what it lacks). For each policy, fault-free and at each MTBF:

* goodput = tokens applied to the global model per second of wall time, ÷ the same policy's
  fault-free run. Tokens applied = Σ over closed rounds of (islands in the round × H × tokens
  per inner step): a contribution lost with a killed island, or a round closed without it,
  does not count;
* final eval loss ÷ the fault-free run's.

Policies: ``DiLoCo H=10`` (rounds wait for a restarted island), ``DiLoCo H=10 quorum 1``
(a round closes with the islands that sent, ``outer.round_timeout_seconds`` after the first),
and ``H=1`` (sync every step: the DDP-like baseline of elastic data parallel, here through the
same syncer). Writes ``summary.md`` (the table, the command, the commit, the machine),
``results.json`` and ``goodput.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from experiments import decoupled as dec
from fedjax_lm import machine


def _tokens_applied(workdir: str, islands: int, h: int, tokens_per_step: int) -> int:
  """Σ over closed rounds of (islands whose contribution entered the round) × H × tokens per
  inner step, from the syncer's events and its last eval's round count."""
  evals = dec._evals(workdir)  # pylint: disable=protected-access
  rounds = int(evals[-1]["rounds"])
  events = dec._jsonl(os.path.join(workdir, "events.jsonl"))  # pylint: disable=protected-access
  missing = sum(len(e.get("missing", [])) for e in events if e["event"] == "round_closed_without")
  refused = sum(1 for e in events if e["event"] == "payload_refused")
  return (rounds * islands - missing - refused) * h * tokens_per_step


def run(base: str, data_dir: str, steps: int, mtbfs: list[int], step_seconds: float,
        seed: int, roles: str = "island/*") -> list[dict]:
  islands, batch, seq = 2, 8, 64
  common = {**dec.TINY, "islands.num": islands, "total_steps": steps, "eval_every": steps,
            "data.data_dir": data_dir, "launch.mode": "decoupled",
            "launch.heartbeat_seconds": 3, "islands.step_seconds": step_seconds,
            "data.batch_size": batch, "data.seq_len": seq, "faults.seed": seed}
  policies = {"DiLoCo H=10": {"outer.sync_every": 10},
              "DiLoCo H=10 quorum 1": {"outer.sync_every": 10, "outer.quorum": 1,
                                       "outer.round_timeout_seconds": 10 * step_seconds},
              "H=1 (sync every step)": {"outer.sync_every": 1, "outer.optimizer": "sgd",
                                        "outer.learning_rate": 1.0, "outer.momentum": 0.0}}
  rows = []
  env = {"FEDJAX_LM_DECOUPLED_RESTARTS": "1000"}
  for name, extra in policies.items():
    h = int(extra["outer.sync_every"])
    ref = None
    for mtbf in [0, *mtbfs]:
      workdir = f"{base}/{name.split()[0].lower()}_{extra.get('outer.quorum', 0)}_h{h}_m{mtbf}"
      faults = {"faults.mtbf_steps": mtbf, "faults.random_roles": roles} if mtbf else {}
      wall = dec._train(workdir, {**common, **extra, **faults}, env=env)  # pylint: disable=protected-access
      tokens = _tokens_applied(workdir, islands, h, batch * seq)
      final = dec._evals(workdir)[-1]["eval_loss"]  # pylint: disable=protected-access
      marks = [f for _, _, files in os.walk(os.path.join(workdir, ".faults")) for f in files]
      kills = len(marks)
      syncer_kills = sum(1 for f in marks if f.startswith("syncer"))
      row = {"policy": name, "mtbf_steps": mtbf, "kills": kills, "syncer_kills": syncer_kills,
             "wall_s": wall,
             "tokens_applied": tokens, "tokens_per_s": tokens / wall, "eval": final}
      ref = ref or row
      row.update(goodput=row["tokens_per_s"] / ref["tokens_per_s"],
                 loss_ratio=final / ref["eval"])
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for policy in dict.fromkeys(r["policy"] for r in rows):
    mine = [r for r in rows if r["policy"] == policy]
    ax.plot([r["mtbf_steps"] or float("inf") for r in mine][1:],
            [r["goodput"] for r in mine][1:], "o-", label=policy)
  ax.set_xlabel("mean steps between an island's failures (MTBF)")
  ax.set_ylabel("goodput ÷ fault-free")
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--out", default="experiments/results/goodput")
  parser.add_argument("--workdir", default="/tmp/fedjax_lm_goodput")
  parser.add_argument("--data-dir", default="")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--mtbf", default="60,30")
  parser.add_argument("--step-seconds", type=float, default=0.2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--roles", default="island/*",
                      help="faults.random_roles: which roles fail at random (the syncer's MTBF "
                           "is in its rounds: 'island/*,syncer')")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.time()
  rows = run(args.workdir, args.data_dir, args.steps, [int(m) for m in args.mtbf.split(",")],
             args.step_seconds, args.seed, args.roles)
  _plot(rows, os.path.join(args.out, "goodput.png"))
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  lines = ["# Goodput under random island failures", "",
           f"Commit {commit}, {time.strftime('%Y-%m-%d')}, {machine.describe()}, "
           f"{time.time() - start:.0f} s.", "",
           "    python -m experiments.goodput " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if k not in ("out", "workdir", "data_dir") and v != ""), "",
           "| policy | MTBF (steps) | kills (of the syncer) | wall s | tokens applied | "
           "goodput ÷ fault-free | final loss ÷ fault-free |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['policy']} | {r['mtbf_steps'] or 'none'} | {r['kills']} "
                 f"({r['syncer_kills']}) | "
                 f"{r['wall_s']:.0f} | {r['tokens_applied']:,} | {r['goodput']:.2f} | "
                 f"{r['loss_ratio']:.3f} |")
  with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n\n![goodput](goodput.png)\n")
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
