"""The eager-updates study's run sets (Kale et al. 2025: the outer step one round late, naive
and eager, against DiLoCo): ``python -m experiments.compare --set NAME --simulate``. README.md
says which set wrote which file here."""

from experiments.studies.budgets import AT1000, AT250, DDP, DILOCO, DILOCO_AND_EAGER, QUICK
from experiments.studies.budgets import SPARSELOCO_TUNED


def _delay_rows(size: list, hs: tuple, seeds: tuple, ours: bool = True) -> tuple:
  """DDP, then per seed and H: DiLoCo, naive delayed, eager (and our tau < H streaming
  adaptation, first seed only)."""
  rows = [("DDP", DDP, size)]
  for seed in seeds:
    for h in hs:
      tag = f"M=2, H={h}" + (f", seed {seed}" if len(seeds) > 1 else "")
      at = [*size, f"outer.sync_every={h}", f"seed={seed}"]
      rows += [(f"DiLoCo ({tag})", DILOCO, at),
               (f"naive delayed, 1 outer step ({tag})", DILOCO, [*at, "outer.delay=naive"]),
               (f"eager, 1 outer step ({tag})", DILOCO, [*at, "outer.delay=eager"])]
      if ours and seed == seeds[0]:
        rows.append((f"ours: eager in a tau=5 window ({tag})", DILOCO,
                     [*at, "outer.eager=True", "outer.overlap=5"]))
  return tuple(rows)


RUN_SETS = {
    # At the quick suite's size (seeds 0 and 1) and at the config's own 250 steps.
    "eager_quick": _delay_rows(QUICK, (10, 50), (0, 1)),
    "eager": _delay_rows(AT250, (50,), (0,), ours=False),
}
# Does the delay's cost shrink with more outer steps (the paper's runs have thousands)? The
# quick size at H=10 over 4x the steps (120 outer steps instead of 30), same schedule shape.
_LONG = [*QUICK, "total_steps=1200", "eval_every=300", "log_every=300", "outer.sync_every=10"]
RUN_SETS["eager_long"] = (
    ("DDP", DDP, _LONG),
    ("DiLoCo (M=2, H=10, 1200 steps)", DILOCO, _LONG),
    ("naive delayed, 1 outer step (M=2, H=10, 1200 steps)", DILOCO,
     [*_LONG, "outer.delay=naive"]),
    ("eager, 1 outer step (M=2, H=10, 1200 steps)", DILOCO, [*_LONG, "outer.delay=eager"]),
    # ... and does the paper's outer momentum 0.9 win back with 120 outer steps?
    ("DiLoCo (M=2, H=10, 1200 steps), paper outer 0.7 / 0.9", DILOCO,
     [*_LONG, "outer.momentum=0.9"]),
)
# Syncs or steps? The eager gap at 120 syncs (1,200 steps, H=10) against 240 syncs reached two
# ways: twice the steps at the same H, or the same steps at half the H.
RUN_SETS["eager_syncs"] = tuple(
    (f"{method} (M=2, H={h}, {steps} steps)", DILOCO,
     [*QUICK, f"total_steps={steps}", f"eval_every={steps // 4}", f"log_every={steps // 4}",
      f"outer.sync_every={h}", *extra])
    for steps, h in ((2400, 10), (1200, 5))
    for method, extra in DILOCO_AND_EAGER)
# Is the eager gap the noise of the one fresh local Δ it trusts? DiLoCo and eager at the quick
# size, H=10, 300 steps, with the global batch at 16 (the suite's), 64 and 256 rows.
RUN_SETS["eager_batch"] = tuple(
    (f"{method} (M=2, H=10, {rows} rows: {rows // 2} per island)", DILOCO,
     [*QUICK, "outer.sync_every=10", f"data.batch_size={rows // 2}", *extra])
    for rows in (16, 64, 256)
    for method, extra in DILOCO_AND_EAGER)
# ... or the outer step it is given? Eager and DiLoCo over outer lr and momentum (quick, H=10).
RUN_SETS["eager_outer"] = tuple(
    (f"{method} (M=2, H=10), outer {lr} / {mom}", DILOCO,
     [*QUICK, "outer.sync_every=10", f"outer.learning_rate={lr}", f"outer.momentum={mom}",
      *extra])
    for method, extra in DILOCO_AND_EAGER
    for lr, mom in ((0.3, 0.5), (0.7, 0.5), (1.0, 0.5), (0.7, 0.0), (0.7, 0.9)))
# The outer momentum eager prefers, over the long quick run (120 outer steps).
RUN_SETS["eager_long_outer"] = tuple(
    (f"{method} (M=2, H=10, 1200 steps), outer 0.7 / {mom}", DILOCO,
     [*_LONG, f"outer.momentum={mom}", *extra])
    for method, extra in DILOCO_AND_EAGER
    for mom in (0.5, 0.3, 0.0))
# At the config's own budget (1,000 steps): eager's gap against the outer momentum it amplifies
# (quick size: within 1% of DiLoCo at 0.3), the pair at outer 0.7 / 0.3 ...
RUN_SETS["eager_1000_outer"] = tuple(
    (f"{method} (M=2, H=50), outer 0.7 / 0.3", DILOCO, [*AT1000, "outer.momentum=0.3", *extra])
    for method, extra in DILOCO_AND_EAGER)
# ... and at momentum 0 (at the quick size eager was then +0.3% of DiLoCo)
RUN_SETS["eager_1000_m0"] = tuple(
    (f"{method} (M=2, H=50), outer 0.7 / 0", DILOCO, [*AT1000, "outer.momentum=0.0", *extra])
    for method, extra in DILOCO_AND_EAGER)
# ... against the number of outer steps: H=10 (100 outer steps in 1,000) against the shipped
# H=50 (20) of the fidelity study's fidelity_1000, the config's outer 0.7 / 0.5
RUN_SETS["eager_1000_h10"] = tuple(
    (f"{method} (M=2, H=10)", DILOCO, [*AT1000, "outer.sync_every=10", *extra])
    for method, extra in DILOCO_AND_EAGER)
# ... and against the budget: 2,000 steps (40 outer steps), the config's outer 0.7 / 0.5
RUN_SETS["eager_2000"] = tuple(
    (f"{method} (M=2, H=50), 2,000 steps", DILOCO, [*AT1000, "total_steps=2000", *extra])
    for method, extra in DILOCO_AND_EAGER)
# ... and both levers at once (eager at its best momentum, 0.3, against DiLoCo at its own 0.5),
# and SparseLoCo tuned at the shipped H=50 at twice the budget (at 1,000: +0.74% of DiLoCo).
# Run with --workdir runs/eager_2000 to reuse eager_2000's two rows.
RUN_SETS["budget_2000"] = (
    *RUN_SETS["eager_2000"],
    ("eager, 1 outer step (M=2, H=50), 2,000 steps, outer 0.7 / 0.3", DILOCO,
     [*AT1000, "total_steps=2000", "outer.delay=eager", "outer.momentum=0.3"]),
    ("SparseLoCo tuned (M=2, H=50), 2,000 steps", SPARSELOCO_TUNED,
     [*AT1000, "total_steps=2000", "outer.sync_every=50"]),
)
