"""Island health: the non-finite guard and island drop-out (who takes part in each sync).

Non-finite guard (``islands.nonfinite_guard``). Inside the jitted inner step, an island whose
loss, gradients or updated params are not all finite skips that step (params and optimizer
state kept; no host round-trip) and is *tainted*: at the next send of each fragment it is
masked out of the exchange (weight 0; the mean is renormalised over the islands that sent) and
at that fragment's merge it restarts from the new global params. A pseudo-gradient that is not
finite is masked the same way. DDP skips a step whose mean gradient (the same on every device)
is not finite. If nothing healthy was sent for ``islands.max_nonfinite`` syncs (DDP: steps) in a
row, the loop stops with :class:`NonFiniteError`; the global params never take a non-finite
value, so no checkpoint holds one.

Who sent is one float32 weight per device of an island per fragment sync, exchanged beside the
payload and counted as ``island_control_bytes`` (``island_bytes`` stays the payload).

Drop-out (``islands.dropout``, ``islands.absent``): a seeded schedule, a pure function of
(seed, step, fragment), says which islands miss a send (a straggler or a lost link). A missing
island is left out of the mean like a masked one and its bytes are not counted; at the merge it
either restarts from the new global params (``islands.absent_policy=reset``) or keeps its local
params and sends its accumulated progress at its next sync (``keep``). In this single-program
simulation the absent island's slot still travels, as zeros, in the same collective; a real
deployment would not send it, and the accounting counts what a deployment sends.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ABSENT_POLICIES = ("reset", "keep")
# Per island and fragment, what its merge does (set at the send).
MERGE, RESTART, KEEP = 0, 1, 2


class NonFiniteError(RuntimeError):
  """Every island (DDP: the step) was non-finite for ``islands.max_nonfinite`` syncs in a row."""


def all_finite(tree: Any) -> jax.Array:
  """One boolean: every element of every leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok``, else ``old`` (``ok`` a scalar, or ``[M]`` for stacked trees)."""
  def pick(n, o):
    cond = ok.reshape(ok.shape + (1,) * (n.ndim - ok.ndim))
    return jnp.where(cond, n, o)
  return jax.tree.map(pick, new, old)


def parse_pairs(text: str, key: str) -> list[tuple[int, int]]:
  """``"50:1,100:3"`` -> ``[(50, 1), (100, 3)]``; one clear error naming ``key`` otherwise."""
  pairs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    m = re.fullmatch(r"(\d+):(\d+)", item)
    if not m:
      raise ValueError(f"{key}={text!r}: expected 'step:island' pairs separated by commas")
    pairs.append((int(m.group(1)), int(m.group(2))))
  return pairs


class Participation:
  """Which islands take part in the send of fragment ``p`` after inner step ``step``."""

  def __init__(self, num: int, dropout: float, absent: str, seed: int):
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"islands.dropout={dropout} must be in [0, 1)")
    self.num, self.dropout, self.seed = num, float(dropout), int(seed)
    self.absent: dict[int, set[int]] = {}
    for step, island in parse_pairs(absent, "islands.absent"):
      if island >= num:
        raise ValueError(f"islands.absent names island {island}, but islands.num={num}")
      self.absent.setdefault(step, set()).add(island)

  @property
  def always_all(self) -> bool:
    return self.dropout == 0 and not self.absent

  def present(self, step: int, p: int) -> np.ndarray:
    """bool ``[M]``: the islands that send fragment ``p`` after ``step`` inner steps."""
    out = np.ones(self.num, bool)
    if self.dropout:
      out &= np.random.default_rng([self.seed, step, p]).random(self.num) >= self.dropout
    for island in self.absent.get(step, ()):
      out[island] = False
    return out


@jax.jit
def poison(batch: dict, islands: jax.Array) -> dict:
  """``batch`` with the loss mask of the rows of ``islands`` (bool ``[M]``) set to NaN (a bad
  batch; ``faults.nonfinite`` says which, :mod:`fedjax_lm.faults`)."""
  bad = islands.reshape((-1,) + (1,) * (batch["mask"].ndim - 1))
  return {**batch, "mask": jnp.where(bad, jnp.nan, batch["mask"])}
