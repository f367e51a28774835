"""Studies: one question each, answered by runs of the tools (``experiments.compare``,
``experiments.bench``). Each ``experiments/studies/<name>/`` holds a README.md (the question,
the command, the commit it ran at, the answer), the study's own code (run sets, a measurement
script) and the summaries it wrote; see ``experiments/studies/README.md``."""
