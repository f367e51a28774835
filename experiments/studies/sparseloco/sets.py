"""The SparseLoCo tuning study's run sets: the paper's settings and tuned, against DiLoCo at the
same H (``python -m experiments.compare --set NAME --simulate``; ``make_summary.py`` writes
``summary.md`` from the ``sparseloco`` set)."""

from experiments.studies.budgets import AT1000, AT250, DILOCO, QUICK, SPARSELOCO, SPARSELOCO_TUNED

RUN_SETS = {
    # At the quick suite's size (TINY model, 300 steps, 16 rows) and at the configs' own 250
    # steps, H=15 and 50.
    "sparseloco": tuple(
        (f"{method} (M=2, H={h}), {size}", config, [*extra, f"outer.sync_every={h}"])
        for size, extra in (
            ("quick", QUICK),
            ("250 steps", [*AT250, "mesh.island=1", "mesh.data=1", "launch.processes=1",
                           "launch.mode=none"]))
        for h in (15, 50)
        for method, config in (("DiLoCo", DILOCO), ("SparseLoCo paper", SPARSELOCO),
                               ("SparseLoCo tuned", SPARSELOCO_TUNED))),
    # At the configs' own budget (1,000 steps), H=15: DiLoCo against SparseLoCo tuned (density
    # 1/8, EF beta 0.8); the paper's settings at 1,000 steps are the full suite's row.
    "sparseloco_1000": tuple(
        (f"{method} (M=2, H=15), 1,000 steps", config, ["outer.sync_every=15", *AT1000])
        for method, config in (("DiLoCo", DILOCO), ("SparseLoCo tuned", SPARSELOCO_TUNED))),
    # ... and at 2,000 steps (at 1,000: +1.00% of DiLoCo, sparseloco_1000's pair)
    "sparseloco_2000": tuple(
        (f"{method} (M=2, H=15), 2,000 steps", config,
         [*AT1000, "outer.sync_every=15", "total_steps=2000"])
        for method, config in (("DiLoCo", DILOCO), ("SparseLoCo tuned", SPARSELOCO_TUNED))),
}
