"""Benchmark tooling: how fast, how big, and how far the methods get in a fixed budget.

Commands (each writes under ``experiments/results/``):

  python -m experiments.bench --suite step|quick|full|gpu [--out DIR]   # the suites
  python -m experiments.bench.projection [OUT]                          # vs the paper's Table 4
  python -m experiments.bench.scale compile|run|pipeline|report ...     # real size, emulated

Modules: ``__main__`` (the suites' command line), ``step`` (the step suite and its one-process
measurement, ``python -m experiments.bench.step '<json spec>'``), ``suites`` (the ``quick`` /
``full`` suites' runs and their worker, ``python -m experiments.bench.suites '<json spec>'``),
``jobs`` (their parent side: plan, run, resume), ``report`` (their summary, results and plots),
``memory`` (outer-state bytes, peak RSS), ``projection`` (wall time over a slow link), ``gpu``
(tokens/s and MFU), ``scale`` (real size on an emulated CPU mesh), ``machine`` (the CPU a table
was measured on). The step and ``quick`` / ``full`` suites' parent processes never import jax:
their measurements run in processes of their own. Studies built on these tools (the PyTorch
peer, load, contention, XLA A/B, the step ladder's data) are in ``experiments/studies/``.
"""

from __future__ import annotations

import subprocess


def git_commit() -> str:
  """HEAD's commit, ``-dirty`` if the tree has changes; ``unknown`` outside git."""
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
