"""The fidelity study's run sets (``python -m experiments.compare --set NAME --simulate``): the
rows the 250-step sets left at the configs' own budget, and loss against M at a fixed global
batch."""

from experiments.studies.budgets import AT1000, DILOCO, QUICK, SPARSELOCO, SPARSELOCO_TUNED

RUN_SETS = {
    # 1,000 steps, seed 0: eager and naive delayed against DiLoCo at the shipped H=50, and
    # SparseLoCo at the paper's settings (H=15, 50) and tuned (H=50) against DiLoCo at the same
    # H (DiLoCo and SparseLoCo tuned at H=15: the sparseloco study's sparseloco_1000).
    "fidelity_1000": (
        ("DiLoCo (M=2, H=50)", DILOCO, AT1000),
        ("naive delayed, 1 outer step (M=2, H=50)", DILOCO, [*AT1000, "outer.delay=naive"]),
        ("eager, 1 outer step (M=2, H=50)", DILOCO, [*AT1000, "outer.delay=eager"]),
        ("SparseLoCo paper (M=2, H=15)", SPARSELOCO, AT1000),
        ("SparseLoCo paper (M=2, H=50)", SPARSELOCO, [*AT1000, "outer.sync_every=50"]),
        ("SparseLoCo tuned (M=2, H=50)", SPARSELOCO_TUNED, [*AT1000, "outer.sync_every=50"]),
    ),
}
# Loss vs M at fixed global batch: is our M cost (2-3x the scaling-law fit) the tiny
# per-island batch? The quick size's M sweep (16 rows: 16 / M per island) against 4x the rows.
for _rows in (16, 64):
  RUN_SETS[f"m_rows{_rows}"] = tuple(
      (f"DiLoCo (M={m}, H=50, {_rows} rows: {_rows // m} per island)", DILOCO,
       [*QUICK, f"islands.num={m}", f"data.batch_size={_rows // m}"]) for m in (1, 2, 4, 8))
