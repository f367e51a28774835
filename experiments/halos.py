"""HALoS against flat asynchronous and synchronous DiLoCo on one timing model, at equal tokens
(``fedjax_lm/hierarchy.py``): the final eval loss of each, the simulated time each takes, and
when each first reaches the synchronous run's final loss.

    python -m experiments.halos --config configs/shakespeare_halos.py --seeds 0 1 \
        --out experiments/results/halos/summary.md [--set total_steps=300 ...]

Each mode trains the config's M workers in this process (one CPU device, one worker at a time:
the wall time is compute, not the simulated time).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time


def _value(text: str):
  """A ``--set`` value: a Python literal (number, bool) or the string itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _first_at(evals: list[dict], target: float) -> float | None:
  """Simulated time of the first eval at or below ``target`` (None if none)."""
  return next((e["time"] for e in evals if e["eval_loss"] <= target + 1e-9), None)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--modes", nargs="+", default=["sync", "async", "halos"])
  parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  parser.add_argument("--equal", choices=("tokens", "time"), default="tokens",
                      help="tokens: every mode runs islands.num x total_steps inner steps; "
                      "time: sync runs those, the others until sync's simulated time")
  parser.add_argument("--out", default=None, help="write the table here (and every row, its evals included, as .json beside it)")
  args = parser.parse_args(argv)
  # pylint: disable=g-import-not-at-top  (JAX after the arguments are read)
  from experiments.bench import step as step_lib
  from fedjax_lm import config_lib, cpu, hierarchy
  cpu.apply_defaults()
  rows = []
  for seed in args.seeds:
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    config = step_lib.load_config(args.config, {**overrides, "seed": seed})
    config_lib.validate(config)
    limit = None
    for mode in sorted(args.modes, key=lambda m: m != "sync"):  # sync first: its time
      start = time.time()
      result = hierarchy.run(config, mode, max_time=limit)
      if mode == "sync" and args.equal == "time":
        limit = result.time
      rows.append({"seed": seed, "mode": mode, "eval_loss": result.evals[-1]["eval_loss"],
                   "time": result.time, "wan_messages": result.wan_messages,
                   "steps": result.steps, "evals": result.evals, "wall_s": time.time() - start})
      print(json.dumps({k: v for k, v in rows[-1].items() if k != "evals"}), flush=True)
  table = _table(rows, args)
  print("\n" + table)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(f"Regenerate: `python -m experiments.halos {' '.join(argv)}`\n\n{table}\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0


def _table(rows: list[dict], args) -> str:
  lines = ["| seed | mode | inner steps | final eval | ÷ sync | simulated time to the end | "
           "÷ sync | time to sync's final loss | speed-up | WAN messages |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for seed in args.seeds:
    mine = {r["mode"]: r for r in rows if r["seed"] == seed}
    sync = mine.get("sync")
    for mode in args.modes:
      r = mine[mode]
      if sync:
        reach = _first_at(r["evals"], sync["eval_loss"])
        rel = (f"{r['eval_loss'] / sync['eval_loss']:.4f} | {r['time']:.0f} | "
               f"{r['time'] / sync['time']:.3f} | " +
               (f"{reach:.0f} | {sync['time'] / reach:.2f}×" if reach else "not reached | —"))
      else:
        rel = f" | {r['time']:.0f} | | | "
      lines.append(f"| {seed} | {mode} | {r['steps']} | {r['eval_loss']:.4f} | {rel} | "
                   f"{r['wan_messages']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
