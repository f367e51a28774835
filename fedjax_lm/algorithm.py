"""What a training algorithm hands the loop: jitted programs, state layout, byte accounting."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import fragments


@dataclasses.dataclass
class Algorithm:
  """Jitted programs and layout of one training algorithm.

  The loop is ``state, metrics = alg.inner_step(state, batch); state = alg.sync(state, done)``.
  ``programs`` names every jitted function (``inner``, and per fragment ``encode/p``,
  ``exchange/p``, ``merge/p``) for HLO checks.
  """

  name: str
  num_islands: int
  init: Callable[[jax.Array], Any]  # key -> state
  inner_step: Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
  eval_params: Callable[[Any], Any]  # state -> params to evaluate (global model)
  state_shardings: Any
  params_sharding: Any  # sharding of eval_params(state)
  programs: dict[str, Callable]
  inner_keys: tuple[str, ...]  # the state entries ``programs["inner"]`` takes
  bytes_per_inner_step: int = 0
  fragment_bytes: tuple[int, ...] = ()  # payload per island of one sync of each fragment
  control_bytes_per_send: int = 0  # who-sent weights beside each fragment's payload
  # (step, p) -> bool [M]: islands that send p after step (None: all, always)
  participation: Callable[[int, int], Any] | None = None
  schedule: fragments.Schedule | None = None
  sync_fn: Callable[[Any, int], Any] | None = None
  settle_fn: Callable[[Any], Any] | None = None  # applies in-flight host exchanges
  lower_sync: Callable[[Any, int], dict] | None = None  # (state, p) -> lowered stages

  @property
  def sync_every(self) -> int:
    return self.schedule.every if self.schedule else 0

  @property
  def bytes_per_sync(self) -> int:
    """Payload per island of one sync of every fragment (one DiLoCo sync when P = 1)."""
    return sum(self.fragment_bytes)

  def sync(self, state: Any, done: int) -> Any:
    """Runs the sends and merges due after ``done`` inner steps (a no-op for ddp)."""
    return state if self.sync_fn is None else self.sync_fn(state, done)

  def settle(self, state: Any) -> Any:
    """``state`` with every in-flight exchange applied to the global copy (merges stay due
    on schedule): what a checkpoint must hold. A no-op unless ``outer.transport=host``."""
    return state if self.settle_fn is None else self.settle_fn(state)

  def _sends(self, done: int, per_send: Callable[[int], float]) -> float:
    """Sum of ``per_send(p)`` over the sends so far, each weighted by the share of islands
    that took part (drop-out)."""
    if self.participation is None:
      return sum(self.schedule.send_count(p, done) * per_send(p)
                 for p in range(self.schedule.fragments))
    return sum(per_send(p) * float(np.mean(self.participation(s, p)))
               for s in range(1, done + 1) for p in self.schedule.sends(s))

  def island_bytes(self, done: int) -> int | float:
    """Cumulative payload one island has sent after ``done`` inner steps (with drop-out, the
    mean over islands: an absent island sends nothing)."""
    sent = done * self.bytes_per_inner_step
    if self.schedule:
      sent += self._sends(done, lambda p: self.fragment_bytes[p])
    return sent

  def island_control_bytes(self, done: int) -> int | float:
    """Cumulative who-sent weights one island has sent beside its payload."""
    if not self.schedule:
      return 0
    return self._sends(done, lambda p: self.control_bytes_per_send)

  def island_peak_bytes(self, done: int) -> int:
    """The largest single sync (one fragment's exchange, or one DDP step) so far."""
    if not self.schedule:
      return self.bytes_per_inner_step if done else 0
    return max([b for p, b in enumerate(self.fragment_bytes)
                if self.schedule.send_count(p, done)], default=0)


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
