"""Benchmarks: ``python -m experiments.bench --suite step|quick|full|gpu [--out DIR]``.

``quick`` / ``full``: methods table, sweeps, projected wall time over a slow link
(``experiments/bench/suites.py``, ``jobs.py``, ``report.py``, ``projection.py``); ``quick`` fits
about 15 minutes on 2 cores, ``full`` (the config's own model size) takes hours. ``gpu``:
tokens/s and MFU of the inner step (``experiments/bench/gpu.py``; a tiny model on CPU).

``step``: the jitted inner step (and one outer sync) of a config on a fixed batch, for a ladder
of model / runtime variants from the old defaults to the new ones, simulated on all cores and on
one core, each measurement in a fresh process; tokens/s, FLOP/s against the same run's matmul
peak, and a per-op breakdown of the default step (``experiments/bench/step.py``).

Writes ``DIR/summary.md`` and ``DIR/results.jsonl`` (raw rows with git commit, jax version,
device kind, XLA flags and config overrides; ``DIR`` defaults to ``experiments/results/<suite>``).
The parent process of the step, quick and full suites never imports jax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments.bench import git_commit


def _write(out: str, rows: list[dict], summary: str) -> None:
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(summary)


def run_train_suite(args, out: str, start: float, command: str) -> None:
  from experiments.bench import jobs, report  # pylint: disable=g-import-not-at-top
  res = jobs.run_suite(args.suite, out, workers=args.workers, methods_only=args.methods_only,
                       hours=args.hours)
  first = res["methods"][0][1]
  info = {"suite": args.suite, "git_commit": git_commit(), "jax": first["jax"],
          "device": first["device"], "wall_s": time.time() - start,
          "methods_only": args.methods_only}
  report.write(res, out, info, command, args.gbps, args.latency_ms / 1e3)
  print(f"wrote {out}/summary.md, results.jsonl and plots in {time.time() - start:.0f} s")


def run_gpu_suite(args, out: str, command: str) -> None:
  from experiments.bench import gpu  # pylint: disable=g-import-not-at-top
  row = {**gpu.measure(args.size, args.peak_tflops), "git_commit": git_commit()}
  _write(out, [row], gpu.summary(row, command))
  print(f"{row['size']} on {row['device']}: {row['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {row['mfu']:.1%} of {row['peak_flops'] / 1e12:.2f} TFLOP/s ({row['peak_source']})")


def run_step_suite(args, out: str, start: float, command: str) -> None:
  from experiments.bench import step  # pylint: disable=g-import-not-at-top  (no jax)
  rungs = [int(i) for i in args.rungs.split(",")] if args.rungs else None
  if rungs and not all(0 <= i < len(step.STEP_VARIANTS) for i in rungs):
    sys.exit(f"error: --rungs {args.rungs}: indices into the {len(step.STEP_VARIANTS)} rungs")
  rows = step.run_suite(args.config, args.rounds, args.steps, rungs)
  _write(out, rows, step.summary(rows, command))
  print(f"wrote {out}/summary.md and results.jsonl in {time.time() - start:.0f} s")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", choices=["step", "quick", "full", "smoke", "gpu"],
                      default="step")
  parser.add_argument("--config", default="configs/shakespeare_diloco.py")
  parser.add_argument("--out", default=None, help="default experiments/results/<suite>")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat (3 repeats)")
  parser.add_argument("--rungs", default=None,
                      help="step: only these rungs of the ladder, by index (e.g. 8,9)")
  parser.add_argument("--workers", type=int, default=2, help="sweep worker processes")
  parser.add_argument("--methods_only", action="store_true",
                      help="quick / full: the methods table, goals and projections, no sweeps")
  parser.add_argument("--hours", type=float, default=None,
                      help="quick / full: stop training after this long, then time and report "
                      "what is done (run again to continue)")
  parser.add_argument("--gbps", type=float, default=1.0, help="projected link, Gbit/s")
  parser.add_argument("--latency_ms", type=float, default=50.0, help="projected link latency")
  parser.add_argument("--peak_tflops", type=float, default=None, help="gpu: device peak")
  parser.add_argument("--size", choices=["350m", "tiny"], default=None, help="gpu: model")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.config):
    sys.exit(f"error: --config {args.config}: no such file")
  out = args.out or os.path.join("experiments", "results", args.suite)
  os.makedirs(out, exist_ok=True)
  start = time.time()
  command = "python -m experiments.bench " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.suite in ("quick", "full", "smoke"):
    run_train_suite(args, out, start, command.strip())
  elif args.suite == "gpu":
    run_gpu_suite(args, out, command.strip())
  else:
    run_step_suite(args, out, start, command.strip())


if __name__ == "__main__":
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_defaults()
  main()
