"""The budgets and configs the studies' run sets were recorded at (``compare.py`` keeps its own
for its sets): a study's ``sets.py`` builds its rows from these, and ``python -m
experiments.compare --set NAME`` runs them (it looks a name up in every study's ``RUN_SETS``)."""

from experiments.bench import suites

DDP = "configs/shakespeare_ddp.py"
DILOCO = "configs/shakespeare_diloco.py"
SPARSELOCO = "configs/shakespeare_sparseloco.py"
SPARSELOCO_TUNED = "configs/shakespeare_sparseloco_tuned.py"
# The configs ran 250 steps (eval every 50) when the 250-step sets were recorded; they keep it.
AT250 = ["total_steps=250", "eval_every=50", "log_every=25", "checkpoint_every=50"]
# The configs' own budget (1,000 steps), in one process.
AT1000 = ["launch.mode=none"]
# The quick suite's size: TINY model, 300 steps, 16 rows.
QUICK = [f"{k}={v}" for k, v in suites.suite_overrides("quick", {}).items()]
DILOCO_AND_EAGER = (("DiLoCo", []), ("eager, 1 outer step", ["outer.delay=eager"]))
