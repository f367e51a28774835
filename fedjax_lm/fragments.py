"""Parameter fragments and the staggered sync schedule of Streaming DiLoCo (Douillard et al. 2025).

**Fragments.** Fragment ``p`` of ``P`` holds rows ``p, p + P, p + 2P, ...`` of every parameter's
leading axis. For the stacked layer weights ``[L, ...]`` that is the paper's *strided* layer
pattern (layers p, p+P, ...); the embedding tables and the final norm are split the same way
along their first axis, so fragments are equal in size whenever the leading dims divide by P
(a leaf with fewer than P rows is simply absent from the higher fragments; scalars go to
fragment 0). A fragment is a tuple of arrays (the parameter leaves' row slices, in tree order).
P = 1 is the whole model.

**Schedule** (``done`` = inner steps completed, 1..T). Fragment p *sends* (its pseudo-gradient
enters the exchange) when ``done % H == p * H // P``, so each fragment syncs every H steps and
the P fragments are staggered by H / P; at ``done = T`` every fragment that did not just send
is flushed, so the final global model has seen every inner step. The result is *merged* into
the islands ``overlap`` (tau) steps after the send; at T every fragment in flight is merged
first, then flushed and merged again. With ``tau < H`` a
fragment has at most one sync in flight, so what is in flight is a function of ``done`` alone:
a checkpoint needs no extra bookkeeping to resume inside an overlap window.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def _rows(shape: tuple[int, ...], p: int, num: int) -> bool:
  """Whether fragment ``p`` holds any rows of a leaf of this shape."""
  if num == 1:
    return True
  if not shape:
    return p == 0
  return shape[0] > p


class Fragments:
  """Row-strided partition of a params tree (or of an ``[M, ...]`` stack of them)."""

  def __init__(self, abstract_params: Any, num: int):
    if num < 1:
      raise ValueError(f"outer.fragments={num} must be >= 1")
    leaves, self.treedef = jax.tree.flatten(abstract_params)
    self.num = num
    self.members = tuple(tuple(i for i, x in enumerate(leaves) if _rows(x.shape, p, num))
                         for p in range(num))
    empty = [p for p, m in enumerate(self.members) if not m]
    if empty:
      raise ValueError(f"outer.fragments={num}: fragments {empty} would hold no parameters "
                       f"(the largest leading dim is {max(x.shape[0] for x in leaves if x.shape)})")

  def _slice(self, x, p: int, lead: int):
    if self.num == 1 or x.ndim == lead:
      return x
    return jax.lax.slice_in_dim(x, p, x.shape[lead], stride=self.num, axis=lead)

  def take(self, tree: Any, p: int, lead: int = 0) -> tuple:
    """Fragment ``p`` of ``tree``; ``lead=1`` for ``[M, ...]`` stacked trees."""
    leaves = self.treedef.flatten_up_to(tree)
    return tuple(self._slice(leaves[i], p, lead) for i in self.members[p])

  def put(self, tree: Any, p: int, values: tuple, lead: int = 0) -> Any:
    """``tree`` with fragment ``p`` replaced by ``values``."""
    leaves = list(self.treedef.flatten_up_to(tree))
    for i, v in zip(self.members[p], values):
      x = leaves[i]
      if self.num == 1 or x.ndim == lead:
        leaves[i] = v.astype(x.dtype)
      else:
        leaves[i] = self._interleave(x, p, v.astype(x.dtype), lead)
    return self.treedef.unflatten(leaves)

  def _interleave(self, x, p: int, v, axis: int):
    """``x`` with rows ``p::P`` (along ``axis``) set to ``v``, by reshapes, not a scatter
    (GSPMD may partition a scatter over the idle ``island`` axis and gather across it)."""
    n, num = x.shape[axis], self.num
    rows = -(-n // num)
    pad = lambda a, r: jnp.pad(a, [(0, r - a.shape[axis]) if d == axis else (0, 0)
                                         for d in range(a.ndim)])
    xp = pad(x, rows * num)
    parts = [pad(v, rows) if q == p else
             jax.lax.slice_in_dim(xp, q, rows * num, stride=num, axis=axis) for q in range(num)]
    out = jnp.stack(parts, axis=axis + 1).reshape(xp.shape)
    return jax.lax.slice_in_dim(out, 0, n, axis=axis)

  def abstract(self, abstract_tree: Any, p: int) -> tuple:
    return jax.eval_shape(lambda t: self.take(t, p), abstract_tree)

  def specs(self, specs: Any, p: int) -> tuple:
    """Row slices keep every dim, so a fragment leaf keeps its parameter's spec."""
    flat = self.treedef.flatten_up_to(specs)
    return tuple(flat[i] for i in self.members[p])


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When each fragment sends and merges; pure function of the step count."""

  every: int  # H
  fragments: int  # P
  overlap: int  # tau
  total: int  # T

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f"outer.sync_every={self.every} must be >= 1")
    if not 0 <= self.overlap < self.every:
      raise ValueError(f"outer.overlap={self.overlap} must be in [0, sync_every={self.every})")
    if self.fragments > self.every:
      raise ValueError(f"outer.fragments={self.fragments} must be <= sync_every={self.every} "
                       "(fragments sync at distinct steps)")

  def offset(self, p: int) -> int:
    return p * self.every // self.fragments

  def regular_sends(self, done: int) -> list[int]:
    return [p for p in range(self.fragments) if done >= 1 and done % self.every == self.offset(p)]

  def sends(self, done: int) -> list[int]:
    """Fragments whose pseudo-gradient is sent after inner step ``done``."""
    regular = self.regular_sends(done)
    if done == self.total:
      return regular + [p for p in range(self.fragments) if p not in regular]
    return regular

  def merges(self, done: int) -> list[int]:
    """Fragments whose exchanged result is merged into the islands after step ``done``."""
    return [p for kind, p in self.events(done) if kind == "merge"]

  def events(self, done: int) -> list[tuple[str, int]]:
    """``("send" | "merge", p)`` after step ``done``, in order: merges of earlier sends, then
    this step's sends, then their merges (tau = 0, or the last step, which waits for every
    fragment in flight before flushing it)."""
    earlier = self.regular_sends(done - self.overlap) if self.overlap else []
    if done == self.total:
      earlier = sorted({p for s in range(max(1, done - self.overlap), done)
                        for p in self.regular_sends(s)})
    now = self.sends(done)
    same_step = now if (self.overlap == 0 or done == self.total) else []
    return ([("merge", p) for p in earlier] + [("send", p) for p in now] +
            [("merge", p) for p in same_step])

  def send_count(self, p: int, done: int) -> int:
    """Number of syncs fragment ``p`` has sent after ``done`` inner steps (closed form)."""
    off = self.offset(p)
    regular = done // self.every if off == 0 else (
        (done - off) // self.every + 1 if done >= off else 0)
    flushed = done == self.total and p not in self.regular_sends(done)
    return regular + int(flushed)
