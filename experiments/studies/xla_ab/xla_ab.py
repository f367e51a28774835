"""An XLA:CPU option measured in one process: the inner step compiled twice, timed alternately.

    python -m experiments.studies.xla_ab.xla_ab --option xla_cpu_prefer_vector_width=512 \\
        [--one_core] [--config configs/shakespeare_diloco.py] [--rounds 8 --steps 4]

Fresh processes on a VM here differ by up to ±20% in speed, more than most flags are worth, so
this compiles one lowered inner step (the step bench's ``Stepper``: fixed batch, runtime
defaults) as it is and with ``--option`` (XLA debug options by name, as
``Lowered.compile(compiler_options=...)`` takes them; repeat ``--option`` for several), then
times windows of ``--steps`` steps of each in turn, ``--rounds`` times, on the same state.
Prints variant ÷ baseline time per round and the median (< 1: the option is faster), and how
far one step's loss moves from the same state (a numerics change shows here and in
``tests/test_golden.py``). ``--one_core``: one island pinned to one core, single-threaded XLA
(each process's view with one process per core); otherwise both islands simulated on every
core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fedjax_lm import machine
from experiments.bench import step as step_bench

PATHS = {False: {"mesh.island": 1, "mesh.data": 1, "launch.processes": 1},
         True: {"mesh.island": 1, "mesh.data": 1, "launch.processes": 1, "islands.num": 1}}


def parse_options(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.startswith("xla_"):
      raise SystemExit(f"xla_ab: --option {item!r}: expected xla_NAME=VALUE")
    out[key] = {"true": True, "false": False}.get(value.lower(), value)
  return out


def measure(config: str, options: dict, one_core: bool, rounds: int, steps: int) -> dict:
  where = machine.describe()  # (before pinning to one core)
  if one_core:
    step_bench.pin_one_core()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  s = step_bench.Stepper({"config": config, "overrides": PATHS[one_core]})
  lowered = s.alg.lower(s.state, s.batch)["inner"]
  start = time.perf_counter()
  programs = {"baseline": lowered.compile()}
  compile_base = time.perf_counter() - start
  start = time.perf_counter()
  programs["variant"] = lowered.compile(compiler_options=options)
  compile_variant = time.perf_counter() - start
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  first = {}
  for name, program in programs.items():  # one step each from the same state: the numerics
    _, metrics = program(copy(s.state.islands), s.batch)
    first[name] = float(np.mean(jax.device_get(metrics["island_loss"])))
  state = s.state.islands  # (the inner program steps the islands' part of the state)
  for program in programs.values():  # warm both
    state, metrics = program(state, s.batch)
  jax.block_until_ready(metrics)
  ratios = []
  for r in range(rounds):
    took = {}
    order = list(programs) if r % 2 == 0 else list(reversed(programs))
    for name in order:
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = programs[name](state, s.batch)
      jax.block_until_ready(metrics)
      took[name] = (time.perf_counter() - start) / steps
    ratios.append(took["variant"] / took["baseline"])
    print(json.dumps({"round": r, **{k: round(v * 1e3, 1) for k, v in took.items()},
                      "ratio": round(ratios[-1], 4)}), flush=True)
  return {"machine": where, "config": config, "options": options,
          "path": "1 island / 1 core" if one_core else "simulated",
          "ratio_median": statistics.median(ratios), "ratios": ratios,
          "compile_s": {"baseline": compile_base, "variant": compile_variant},
          "loss_after_one_step": first,
          "loss_rel_diff": abs(first["variant"] - first["baseline"]) / abs(first["baseline"])}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--option", action="append", required=True, help="xla_NAME=VALUE")
  parser.add_argument("--config", default="configs/shakespeare_diloco.py")
  parser.add_argument("--one_core", action="store_true")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args(argv)
  result = measure(args.config, parse_options(args.option), args.one_core, args.rounds,
                   args.steps)
  print(json.dumps(result))


if __name__ == "__main__":
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_defaults()
  main()
