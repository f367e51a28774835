"""Methods side by side on the same setup and tokens: runs each, prints a Markdown table.

  python -m experiments.compare --workdir runs/compare                      # DDP/FedAvg/DiLoCo
  python -m experiments.compare --set streaming --simulate --workdir runs/streaming \
      --out experiments/results/streaming/summary.md
  python -m experiments.compare --set dropout --simulate --workdir runs/dropout \
      --out experiments/results/dropout/summary.md
  python -m experiments.compare --set tuning --simulate --workdir runs/tuning \
      --out experiments/results/tuning/summary.md

Each run is ``python -m experiments.train``. By default the configs' own launch (4 local
processes: 2 islands x 2 devices); ``--simulate`` runs every config in one process with the M
islands simulated: on one emulated CPU device per core where M allows (``cpu.island_devices``;
``--override islands.simulated_groups=1`` keeps one device), the same numerics to f32 rounding
(tested), no inter-process collectives.
Extra ``--override key=value`` flags go to every run (e.g. ``--override total_steps=100``).
A run whose workdir already holds its final checkpoint resumes there and trains no further,
so adding a row re-runs only that row. The benchmark suites' methods table and sweeps (one
resized config, simulated, timed, projected over a slow link) are ``python -m experiments.bench
--suite quick|full``; the same methods over a shaped network link, ``python -m experiments.wan``.
"""

import os
import subprocess
import sys

from absl import app
from absl import flags

from experiments.bench import report
from experiments.bench import suites
from fedjax_lm import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Parent directory of the runs.")
_SET = flags.DEFINE_string("set", "methods", "Which runs: a key of RUN_SETS.")
_SIMULATE = flags.DEFINE_bool("simulate", False, "One process, islands simulated in it.")
_OUT = flags.DEFINE_string("out", None, "Also write the table (and the command) here.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "key=value applied to every run.")

_STREAM = "configs/shakespeare_streaming.py"
# The configs ran 250 steps (eval every 50, streaming tau 5 and outer momentum 0.9) when the
# sets below were recorded; they keep that budget (the configs now run 1,000 steps).
_AT250 = ["total_steps=250", "eval_every=50", "log_every=25", "checkpoint_every=50"]
_STREAM250 = [*_AT250, "outer.overlap=5", "outer.momentum=0.9"]
# The methods, streaming and dropout tables were measured with the DiLoCo paper's outer
# Nesterov 0.7 / 0.9 (the config's default then) and keep it; the tuning set varies it.
_DILOCO = "configs/shakespeare_diloco.py"
_DILOCO_AND_EAGER = (("DiLoCo", []), ("eager, 1 outer step", ["outer.delay=eager"]))
_PAPER = [f"{k}={v}" for k, v in suites.PAPER_OUTER.items()]
# DiLoCo, M=4, H=10, 240 steps (24 syncs); island 3 misses every 4th sync (6 of 24 = 25%).
_DROP = [*_PAPER, "islands.num=4", "outer.sync_every=10", "total_steps=240", "data.batch_size=8",
         "eval_every=40", "log_every=20", "checkpoint_every=240"]
_ABSENT = "islands.absent=" + ",".join(f"{s}:3" for s in range(40, 241, 40))
RUN_SETS = {
    # The shipped configs at their own budget (1,000 steps), side by side at equal tokens.
    "shipped": (
        ("DDP", "configs/shakespeare_ddp.py", []),
        ("DiLoCo (M=2, H=50)", _DILOCO, []),
        ("Streaming DiLoCo (P=4, tau=2, alpha=0, 4-bit)", _STREAM, []),
    ),
    "methods": (
        ("DDP", "configs/shakespeare_ddp.py", _AT250),
        ("FedAvg (M=2, H=50)", "configs/shakespeare_diloco.py",
         [*_AT250, "outer.optimizer=fedavg"]),
        ("DiLoCo (M=2, H=50)", _DILOCO, [*_AT250, *_PAPER]),
    ),
    "streaming": (
        ("DDP", "configs/shakespeare_ddp.py", _AT250),
        ("DiLoCo (M=2, H=50)", _DILOCO, [*_AT250, *_PAPER]),
        ("Streaming (P=4, tau=5, alpha=0.5), f32", _STREAM,
         [*_STREAM250, "outer.compression=none"]),
        ("Streaming + int8", _STREAM, [*_STREAM250, "outer.compression=int8"]),
        ("Streaming + 4-bit", _STREAM, _STREAM250),
        ("Streaming + 4-bit + eager", _STREAM, [*_STREAM250, "outer.eager=True"]),
        ("SparseLoCo (H=15, top-k 3.1% 2-bit, EF 0.95)", "configs/shakespeare_sparseloco.py",
         _AT250),
        # Ablations: eager with the full correction; SparseLoCo with exact float32 values.
        ("Streaming + 4-bit + eager, alpha=0", _STREAM,
         [*_STREAM250, "outer.eager=True", "outer.mixing=0.0"]),
        ("SparseLoCo, 32-bit values", "configs/shakespeare_sparseloco.py",
         [*_AT250, "outer.topk_bits=32"]),
    ),
    "dropout": (
        ("DiLoCo (M=4, H=10), every island at every sync", "configs/shakespeare_diloco.py",
         _DROP),
        ("island 3 absent at 25% of syncs, rejoins from global (reset)",
         "configs/shakespeare_diloco.py", [*_DROP, _ABSENT]),
        ("island 3 absent at 25% of syncs, keeps its progress (keep)",
         "configs/shakespeare_diloco.py", [*_DROP, _ABSENT, "islands.absent_policy=keep"]),
    ),
    # SparseLoCo at the paper's settings and tuned, against DiLoCo at the same H, at the quick
    # suite's size (TINY model, 300 steps, 16 rows) and at the configs' own (250 steps).
    "sparseloco": tuple(
        (f"{method} (M=2, H={h}), {size}", config, [*extra, f"outer.sync_every={h}"])
        for size, extra in (
            ("quick", [f"{k}={v}" for k, v in suites.suite_overrides("quick", {}).items()]),
            ("250 steps", [*_AT250, "mesh.island=1", "mesh.data=1", "launch.processes=1",
                           "launch.mode=none"]))
        for h in (15, 50)
        for method, config in (("DiLoCo", "configs/shakespeare_diloco.py"),
                               ("SparseLoCo paper", "configs/shakespeare_sparseloco.py"),
                               ("SparseLoCo tuned", "configs/shakespeare_sparseloco_tuned.py"))),
}
# The same at the configs' own budget (1,000 steps), H=15: DiLoCo against SparseLoCo tuned
# (density 1/8, EF beta 0.8); the paper's settings at 1,000 steps are the full suite's row.
RUN_SETS["sparseloco_1000"] = tuple(
    (f"{method} (M=2, H=15), 1,000 steps", config, ["outer.sync_every=15", "launch.mode=none"])
    for method, config in (("DiLoCo", "configs/shakespeare_diloco.py"),
                           ("SparseLoCo tuned", "configs/shakespeare_sparseloco_tuned.py")))
# The rows the 250-step sets left at the configs' own budget (1,000 steps, seed 0): eager and
# naive delayed against DiLoCo at the shipped H=50, and SparseLoCo at the paper's settings
# (H=15, 50) and tuned (H=50) against DiLoCo at the same H (DiLoCo and SparseLoCo tuned at H=15:
# the sparseloco_1000 set).
_AT1000 = ["launch.mode=none"]
RUN_SETS["fidelity_1000"] = (
    ("DiLoCo (M=2, H=50)", _DILOCO, _AT1000),
    ("naive delayed, 1 outer step (M=2, H=50)", _DILOCO, [*_AT1000, "outer.delay=naive"]),
    ("eager, 1 outer step (M=2, H=50)", _DILOCO, [*_AT1000, "outer.delay=eager"]),
    ("SparseLoCo paper (M=2, H=15)", "configs/shakespeare_sparseloco.py", _AT1000),
    ("SparseLoCo paper (M=2, H=50)", "configs/shakespeare_sparseloco.py",
     [*_AT1000, "outer.sync_every=50"]),
    ("SparseLoCo tuned (M=2, H=50)", "configs/shakespeare_sparseloco_tuned.py",
     [*_AT1000, "outer.sync_every=50"]),
)
# Eager's gap at that size against the outer momentum it amplifies (quick size: within 1% of
# DiLoCo at 0.3): the pair at outer 0.7 / 0.3.
RUN_SETS["eager_1000_outer"] = tuple(
    (f"{method} (M=2, H=50), outer 0.7 / 0.3", _DILOCO, [*_AT1000, "outer.momentum=0.3", *extra])
    for method, extra in _DILOCO_AND_EAGER)
# ... and at momentum 0 (at the quick size eager was then +0.3% of DiLoCo)
RUN_SETS["eager_1000_m0"] = tuple(
    (f"{method} (M=2, H=50), outer 0.7 / 0", _DILOCO, [*_AT1000, "outer.momentum=0.0", *extra])
    for method, extra in _DILOCO_AND_EAGER)
# Eager's gap at the config's budget against the number of outer steps: H=10 (100 outer steps
# in 1,000) against the shipped H=50 (20) of fidelity_1000, the config's outer 0.7 / 0.5.
RUN_SETS["eager_1000_h10"] = tuple(
    (f"{method} (M=2, H=10)", _DILOCO, [*_AT1000, "outer.sync_every=10", *extra])
    for method, extra in _DILOCO_AND_EAGER)
# ... and against the budget: 2,000 steps (40 outer steps), the config's outer 0.7 / 0.5
RUN_SETS["eager_2000"] = tuple(
    (f"{method} (M=2, H=50), 2,000 steps", _DILOCO, [*_AT1000, "total_steps=2000", *extra])
    for method, extra in _DILOCO_AND_EAGER)
# ... and both levers at once (eager at its best momentum, 0.3, against DiLoCo at its own 0.5),
# and SparseLoCo tuned at the shipped H=50 at twice the budget (at 1,000: +0.74% of DiLoCo).
# Run with --workdir runs/eager_2000 to reuse eager_2000's two rows.
RUN_SETS["budget_2000"] = (
    *RUN_SETS["eager_2000"],
    ("eager, 1 outer step (M=2, H=50), 2,000 steps, outer 0.7 / 0.3", _DILOCO,
     [*_AT1000, "total_steps=2000", "outer.delay=eager", "outer.momentum=0.3"]),
    ("SparseLoCo tuned (M=2, H=50), 2,000 steps", "configs/shakespeare_sparseloco_tuned.py",
     [*_AT1000, "total_steps=2000", "outer.sync_every=50"]),
)
# ... and at the paper's H=15 (at 1,000 steps: +1.00% of DiLoCo, sparseloco_1000's pair)
RUN_SETS["sparseloco_2000"] = tuple(
    (f"{method} (M=2, H=15), 2,000 steps", config,
     [*_AT1000, "outer.sync_every=15", "total_steps=2000"])
    for method, config in (("DiLoCo", _DILOCO),
                           ("SparseLoCo tuned", "configs/shakespeare_sparseloco_tuned.py")))
# Eager updates (Kale et al. 2025): the outer step one round late, naive and eager, against
# DiLoCo and our tau < H streaming adaptation, at the quick suite's size (TINY model, 300 steps,
# 16 rows; seeds 0 and 1) and at the config's own (250 steps); DiLoCo's config defaults.
_QUICK = [f"{k}={v}" for k, v in suites.suite_overrides("quick", {}).items()]


def _delay_rows(size: list, hs: tuple, seeds: tuple, ours: bool = True) -> tuple:
  rows = [("DDP", "configs/shakespeare_ddp.py", size)]
  for seed in seeds:
    for h in hs:
      tag = f"M=2, H={h}" + (f", seed {seed}" if len(seeds) > 1 else "")
      at = [*size, f"outer.sync_every={h}", f"seed={seed}"]
      rows += [(f"DiLoCo ({tag})", _DILOCO, at),
               (f"naive delayed, 1 outer step ({tag})", _DILOCO, [*at, "outer.delay=naive"]),
               (f"eager, 1 outer step ({tag})", _DILOCO, [*at, "outer.delay=eager"])]
      if ours and seed == seeds[0]:
        rows.append((f"ours: eager in a tau=5 window ({tag})", _DILOCO,
                     [*at, "outer.eager=True", "outer.overlap=5"]))
  return tuple(rows)


RUN_SETS["eager_quick"] = _delay_rows(_QUICK, (10, 50), (0, 1))
RUN_SETS["eager"] = _delay_rows(_AT250, (50,), (0,), ours=False)
# Does the delay's cost shrink with more outer steps (the paper's runs have thousands)? The
# quick size at H=10 over 4x the steps (120 outer steps instead of 30), same schedule shape.
_LONG = [*_QUICK, "total_steps=1200", "eval_every=300", "log_every=300", "outer.sync_every=10"]
RUN_SETS["eager_long"] = (
    ("DDP", "configs/shakespeare_ddp.py", _LONG),
    ("DiLoCo (M=2, H=10, 1200 steps)", _DILOCO, _LONG),
    ("naive delayed, 1 outer step (M=2, H=10, 1200 steps)", _DILOCO,
     [*_LONG, "outer.delay=naive"]),
    ("eager, 1 outer step (M=2, H=10, 1200 steps)", _DILOCO, [*_LONG, "outer.delay=eager"]),
    # ... and does the paper's outer momentum 0.9 win back with 120 outer steps?
    ("DiLoCo (M=2, H=10, 1200 steps), paper outer 0.7 / 0.9", _DILOCO,
     [*_LONG, "outer.momentum=0.9"]),
)
# Syncs or steps? The eager gap at 120 syncs (1,200 steps, H=10) against 240 syncs reached two
# ways: twice the steps at the same H, or the same steps at half the H.
RUN_SETS["eager_syncs"] = tuple(
    (f"{method} (M=2, H={h}, {steps} steps)", _DILOCO,
     [*_QUICK, f"total_steps={steps}", f"eval_every={steps // 4}", f"log_every={steps // 4}",
      f"outer.sync_every={h}", *extra])
    for steps, h in ((2400, 10), (1200, 5))
    for method, extra in _DILOCO_AND_EAGER)
# Is the eager gap the noise of the one fresh local Δ it trusts? DiLoCo and eager at the quick
# size, H=10, 300 steps, with the global batch at 16 (the suite's), 64 and 256 rows.
RUN_SETS["eager_batch"] = tuple(
    (f"{method} (M=2, H=10, {rows} rows: {rows // 2} per island)", _DILOCO,
     [*_QUICK, "outer.sync_every=10", f"data.batch_size={rows // 2}", *extra])
    for rows in (16, 64, 256)
    for method, extra in _DILOCO_AND_EAGER)
# ... or the outer step it is given? Eager and DiLoCo over outer lr and momentum (quick, H=10).
RUN_SETS["eager_outer"] = tuple(
    (f"{method} (M=2, H=10), outer {lr} / {mom}", _DILOCO,
     [*_QUICK, "outer.sync_every=10", f"outer.learning_rate={lr}", f"outer.momentum={mom}",
      *extra])
    for method, extra in _DILOCO_AND_EAGER
    for lr, mom in ((0.3, 0.5), (0.7, 0.5), (1.0, 0.5), (0.7, 0.0), (0.7, 0.9)))
# The outer momentum eager prefers, over the long quick run (120 outer steps).
RUN_SETS["eager_long_outer"] = tuple(
    (f"{method} (M=2, H=10, 1200 steps), outer 0.7 / {mom}", _DILOCO,
     [*_LONG, f"outer.momentum={mom}", *extra])
    for method, extra in _DILOCO_AND_EAGER
    for mom in (0.5, 0.3, 0.0))
# Loss vs M at fixed global batch: is our M cost (2-3x the scaling-law fit) the tiny
# per-island batch? The quick size's M sweep (16 rows: 16 / M per island) against 4x the rows.
for _rows in (16, 64):
  RUN_SETS[f"m_rows{_rows}"] = tuple(
      (f"DiLoCo (M={m}, H=50, {_rows} rows: {_rows // m} per island)", _DILOCO,
       [*_QUICK, f"islands.num={m}", f"data.batch_size={_rows // m}"]) for m in (1, 2, 4, 8))
# Candidates for the shipped configs at their own 250 steps: which H and outer momentum bring
# DiLoCo and Streaming within 2% of DDP at equal tokens.
_S10 = ["outer.sync_every=10", "outer.fragments=2", "outer.overlap=2"]
RUN_SETS["shipped_candidates"] = (
    ("DDP", "configs/shakespeare_ddp.py", _AT250),
    ("DiLoCo (M=2, H=10), outer 0.7 / 0.5", _DILOCO, [*_AT250, "outer.sync_every=10"]),
    ("Streaming 4-bit (P=2, H=10, tau=2), outer 0.7 / 0.9", _STREAM,
     [*_AT250, *_S10, "outer.momentum=0.9"]),
)
# The shipped Streaming config at its own 1,000 steps against the overlap tau (shipped: 2): the
# DDP and DiLoCo rows are the "shipped" set's (same workdir names, reused when present).
# Measured with the paper's alpha=0.5 (the shipped config's then).
RUN_SETS["streaming_tau"] = (
    *RUN_SETS["shipped"][:2],
    *((f"Streaming DiLoCo (P=4, tau={tau}, 4-bit), alpha=0.5", _STREAM,
       [f"outer.overlap={tau}", "outer.mixing=0.5"]) for tau in (2, 5, 1)),
)
# Why Streaming with the paper's alpha=0.5 ended 0.4% behind DiLoCo at 1,000 steps: the
# shipped alpha=0 (a fragment's merge takes the global copy, as DiLoCo's does) against 0.5,
# and 0.5 at H=25 (twice the syncs and bytes).
# (alpha=0.5 at H=50 is the streaming_tau set's tau=2 row.)
RUN_SETS["streaming_candidates"] = (
    RUN_SETS["shipped"][0], RUN_SETS["shipped"][2],
    ("Streaming DiLoCo (P=4, H=25, tau=2, 4-bit)", _STREAM,
     ["outer.sync_every=25", "outer.mixing=0.5"]),
)
# The outer hyper-parameters of configs/shakespeare_diloco.py at its own size (250 steps):
# the paper's Nesterov 0.7 / 0.9 against lower outer momentum and more outer steps.
RUN_SETS["tuning"] = tuple((name, config, [*_AT250, *over]) for name, config, over in (
    ("DDP", "configs/shakespeare_ddp.py", []),
    ("FedAvg (M=2, H=50)", _DILOCO, ["outer.optimizer=fedavg"]),
    ("DiLoCo (M=2, H=50), paper outer lr 0.7, momentum 0.9", _DILOCO, _PAPER),
    ("DiLoCo (M=2, H=50), outer lr 0.7, momentum 0.5", _DILOCO,
     ["outer.learning_rate=0.7", "outer.momentum=0.5"]),
    ("DiLoCo (M=2, H=50), outer lr 1.0, momentum 0.5", _DILOCO,
     ["outer.learning_rate=1.0", "outer.momentum=0.5"]),
    ("DiLoCo (M=2, H=25), outer lr 0.7, momentum 0.5", _DILOCO,
     ["outer.learning_rate=0.7", "outer.momentum=0.5", "outer.sync_every=25"]),
    ("DiLoCo (M=1, batch 32, H=50), outer lr 0.7, momentum 0.5", _DILOCO,
     ["outer.learning_rate=0.7", "outer.momentum=0.5", "islands.num=1", "data.batch_size=32"]),
    ("DiLoCo (M=1, batch 32, H=50), paper outer lr 0.7, momentum 0.9", _DILOCO,
     [*_PAPER, "islands.num=1", "data.batch_size=32"]),
))
_SIMULATED = ["mesh.island=1", "mesh.data=1", "launch.processes=1"]


def main(argv):
  del argv
  if _SET.value not in RUN_SETS:
    sys.exit(f"--set={_SET.value!r}: expected one of {sorted(RUN_SETS)}")
  rows, curves = [], {}
  for name, config, overrides in RUN_SETS[_SET.value]:
    workdir = os.path.join(_WORKDIR.value, "".join(c if c.isalnum() else "_" for c in name))
    extra = _SIMULATED if _SIMULATE.value else []
    args = [f"--config.{o}" for o in (*overrides, *extra, *_OVERRIDES.value)]
    subprocess.run([sys.executable, "-m", "experiments.train", "--config", config,
                    "--workdir", workdir, *args], check=True)
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rows.append((name, records[-1]))
    curves[name] = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  table = report.compare_table(rows, curves, _SET.value)
  print("\n" + table)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(f"Regenerate: `python -m experiments.compare {' '.join(sys.argv[1:])}`\n\n"
              f"{table}\n")


if __name__ == "__main__":
  import fedjax_lm  # pylint: disable=g-import-not-at-top
  fedjax_lm.reexec_with_malloc_defaults()
  app.run(main)
