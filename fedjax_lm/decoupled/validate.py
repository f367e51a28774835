"""What the syncer checks in every field a member sends, before any of it is kept.

Messages are authenticated, but a member that holds valid credentials can still be compromised
or buggy. So every field that reaches the syncer's state is checked here first; a bad one
raises :class:`Refusal`, one line naming the island, the field and the value, and nothing of
the request is kept. Pure Python and numpy: no jax, no I/O, no clock.

The interface (each returns the value as the syncer keeps it, or raises :class:`Refusal`):

* ``island_id(value, limit)``: an int in ``[0, limit)``, limit = ``islands.max_num`` or
  ``islands.num``. Not a bool, float or str: JSON ``true`` or ``1.5`` would pass ``int()``.
* ``send_step(step, fragment, num_fragments, total_steps, sends=None, island=)``:
  ``(fragment, step)``, both ints, the fragment in range, ``1 <= step <= total_steps``, and,
  given ``sends`` (the schedule's :meth:`fragments.Schedule.sends`), fragment p sends at step s.
  An honest island of policy ``sync`` sends exactly there: its clock is the run's, its loop
  stops at T, and the flush at T is in ``sends(T)``; a late or resent send keeps its step.
  Async islands send after their own dynamic H (and clamp to T): pass ``sends=None``.
* ``local_steps(value, island, h, told=None)``: async, the inner steps an update holds, an int
  in ``[0, h]``; with ``told`` (the H the syncer last gave this island), 0 or ``told``.
* ``step_s(value, island, recorded=None, ratio=STEP_S_RATIO)``: seconds per inner step, finite,
  0 (none measured yet) or in ``[MIN_STEP_S, MAX_STEP_S]`` and within ``ratio`` of the median
  of the other islands' recorded speeds.
* ``data_position(text, island, last=None)``: a data position, the island's iterator state as
  :meth:`input.TrainBatches.global_state` writes it: well formed for the restore its island
  will run, bounded, and not behind ``last``.
* :class:`NormGate`: per fragment, the norms of the last accepted payloads; ``check`` refuses a
  non-finite payload, or one whose norm exceeds ``bound`` x their median; ``accept`` records.
  ``norm_of(arrays)``: ``(norm, finite)`` of decoded float arrays on the host, overflow-safe
  (the syncer may instead compute both on the device, from the decoded payload).

What a Refusal means is the caller's to decide. For a field that an honest island never gets
wrong (ids, steps, counts, positions) the request is refused. For a payload's norm, which an
honest island could exceed in a loss spike, the suggested handling is the drop-out one: the
island's payload is excluded (logged), it counts as absent from the round, and the round closes
with the others, so the honest contributions of that round still count.

:class:`Refusal` is a :class:`wire.WireError`, so the channel answers one that escapes a method
with the refusal's line (and logs it) rather than an internal error.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from fedjax_lm import wire

# step_s (seconds per inner step): no step is faster than a microsecond (a jitted call's
# dispatch alone takes longer) or slower than a day.
MIN_STEP_S, MAX_STEP_S = 1e-6, 86400.0
# The widest honest spread of speeds around the median of the others (this repo's experiments
# run up to 4x, islands.speed "1,1,0.25"; the rest is margin for shared cores). Dynamic local
# updates give the fastest island H and island k H x fastest / own, so an island that claims
# a speed within range can still cut the others' H by up to this factor: a claim outside is
# refused, and the syncer drops the island's speed, which turns dynamic H off (every island H).
STEP_S_RATIO = 20.0
# Data positions: the honest state is ~130 characters; grain replays
# elements_from_buffer_after_checkpoint packed windows on restore (0 or 1 in this pipeline:
# every window refills from the remainder with a checkpoint); indices stay exact as JSON doubles.
MAX_POSITION_CHARS = 1024
MAX_BUFFERED = 64
MAX_INDEX = 2**53
_EMPTY_SLICE = [-1, -1]  # grain: no remainder element


class Refusal(wire.WireError):
  """A field from a member the syncer will not keep: one line naming the island, the field and
  the value (a ValueError, through :class:`wire.WireError`)."""


def _show(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _who(island: Any) -> str:
  return "island ?" if island is None else f"island {island}"


def _refuse(island: Any, field: str, value: Any, why: str) -> Refusal:
  return Refusal(f"{_who(island)}: {field}={_show(value)} {why}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating)) and
          not isinstance(value, (bool, np.bool_)))


def _int(value: Any, island: Any, field: str) -> int:
  if not _is_int(value):
    raise _refuse(island, field, value, f"is a {type(value).__name__}, not an int")
  return int(value)


# ------------------------------------------------------------------------ ids and steps
def island_id(value: Any, limit: int) -> int:
  """An island id: an int in ``[0, limit)`` (``islands.max_num`` or ``islands.num``), so that
  a member cannot join as island 7 of 4, -1 or 1,000,000 (kept in the checkpoint, restored as
  live, waited for by every round)."""
  if not _is_int(value):
    raise Refusal(f"island id {_show(value)} is a {type(value).__name__}, not an int")
  if not 0 <= value < limit:
    raise Refusal(f"island id {_show(value)} is not in [0, {limit}) (islands.max_num or "
                  "islands.num)")
  return int(value)


def send_step(step: Any, fragment: Any, num_fragments: int, total_steps: int,
              sends: Callable[[int], Iterable[int]] | None = None, *,
              island: Any = None) -> tuple[int, int]:
  """``(fragment, step)`` of a send (or of the receive that follows it), on the schedule:
  a send off it would open a round that no honest island ever sends to, so it never closes.
  ``sends``: the fragments the schedule sends after a step (``Schedule.sends``); None (async:
  each island's own dynamic H) checks the ranges only."""
  step, fragment = _int(step, island, "step"), _int(fragment, island, "fragment")
  if not 0 <= fragment < num_fragments:
    raise _refuse(island, "fragment", fragment, f"is not in [0, {num_fragments})")
  if not 1 <= step <= total_steps:
    raise _refuse(island, "step", step, f"is not in [1, total_steps={total_steps}]")
  if sends is not None:
    due = sorted(int(p) for p in sends(step))
    if fragment not in due:
      raise _refuse(island, "step", step, f"is off the schedule for fragment {fragment} (after "
                    f"step {step} the schedule sends fragments {due})")
  return fragment, step


def local_steps(value: Any, island: Any, h: int, told: int | None = None) -> int:
  """Async: the inner steps an update holds, added to the island's applied steps (which end the
  run at ``islands.num x total_steps``). An island reports the H the syncer gave it at its last
  receive, 0 before it was given one (its first update after a start or restart). So: an int in
  ``[0, h]`` (``h``: ``outer.sync_every``, the most dynamic local updates give) and, given
  ``told`` (the H the syncer last gave this island; None after a syncer restart), 0 or that."""
  steps = _int(value, island, "local_steps")
  if not 0 <= steps <= h:
    raise _refuse(island, "local_steps", value, f"is not in [0, outer.sync_every={h}]")
  if told is not None and steps not in (0, int(told)):
    raise _refuse(island, "local_steps", value, f"is not the H the syncer gave it ({told})")
  return steps


def step_s(value: Any, island: Any, recorded: Mapping[Any, float] | None = None,
           ratio: float = STEP_S_RATIO) -> float:
  """Async, dynamic local updates: an island's measured seconds per inner step (0: none yet).
  Finite, 0 or in ``[MIN_STEP_S, MAX_STEP_S]``, and, when other islands have reported
  (``recorded``: island -> seconds, the island's own entry ignored), within ``[m / ratio,
  m x ratio]`` of their median m: one island claiming 1e-9 s would otherwise be the fastest by
  far and cut every other island's H to 1. The median of the *others* is what a claim is held
  to, so a liar cannot move its own reference. On a refusal the syncer should drop the
  island's recorded speed (so that a liar's earlier claim does not stay in force) and still
  count the heartbeat: without it, dynamic H is off, each island runs H."""
  if not _is_number(value):
    raise _refuse(island, "step_s", value, f"is a {type(value).__name__}, not a number")
  seconds = float(value)
  if not math.isfinite(seconds) or seconds < 0:
    raise _refuse(island, "step_s", value, "must be finite and >= 0")
  if seconds == 0:
    return 0.0
  if not MIN_STEP_S <= seconds <= MAX_STEP_S:
    raise _refuse(island, "step_s", value, f"is not in [{MIN_STEP_S:g}, {MAX_STEP_S:g}] s")
  others = [float(v) for k, v in (recorded or {}).items()
            if k != island and _is_number(v) and math.isfinite(float(v)) and float(v) > 0]
  if others:
    median = float(np.median(others))
    if not median / ratio <= seconds <= median * ratio:
      raise _refuse(island, "step_s", value, f"is more than {ratio:g}x off the other islands' "
                    f"median {median:.3g} s")
  return seconds


# ------------------------------------------------------------------------ data positions
def _position_index(text: str) -> int:
  """The parent's ``next_index`` of a position that already passed :func:`data_position`."""
  return int(json.loads(text)["parent_state"]["next_index"])


def _pairs(pairs: list) -> dict:
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a key appears twice in {keys}")
  return dict(pairs)


def _constant(name: str) -> Any:
  raise ValueError(f"{name} is not JSON")


def _bounded(value: Any, low: int, high: int) -> bool:
  return _is_int(value) and low <= value <= high


def data_position(text: Any, island: Any, last: str | None = None) -> str:
  """An island's data position: its train iterator's state as JSON, what the syncer keeps and
  hands back to the island when it restarts (:meth:`input.TrainBatches.set_global_state`).
  A poisoned one would make that restart fail to parse it (or replay without end), so it must
  be exactly the shape the pipeline's iterator writes (grain's concat-then-split packing over
  the indexed dataset; tests hold this to the real iterator)::

    {"elements_from_buffer_after_checkpoint": E, "parent_state": {"next_index": N},
     "remainder_slices": {"tokens": [A, B]}}

  with ints ``0 <= E <= MAX_BUFFERED``, ``0 <= N <= MAX_INDEX`` and ``[A, B]`` either
  ``[-1, -1]`` (no remainder) or ``0 <= A < B <= MAX_INDEX``; at most ``MAX_POSITION_CHARS``.
  N counts the examples the island has read (the shuffled partition repeated), so it never goes
  back: given ``last`` (the island's last accepted position, reset to what the syncer hands it
  when it rejoins), N must be at least last's. The state does not name a partition, so that it
  is the island's own cannot be checked here; the syncer keeps positions by island, and hands
  each only to its own island. ``""`` (no position) is returned as is."""
  if not isinstance(text, str):
    raise _refuse(island, "data", text, f"is a {type(text).__name__}, not a str")
  if not text:
    return text
  if len(text) > MAX_POSITION_CHARS:
    raise _refuse(island, "data", text, f"is longer than {MAX_POSITION_CHARS} characters")
  try:
    state = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
  except ValueError as e:
    raise _refuse(island, "data", text, f"is not a data position ({e})") from None
  expected = {"elements_from_buffer_after_checkpoint", "parent_state", "remainder_slices"}
  if not isinstance(state, dict) or set(state) != expected:
    raise _refuse(island, "data", text, f"is not a data position (expected keys "
                  f"{sorted(expected)})")
  buffered, parent, slices = (state["elements_from_buffer_after_checkpoint"],
                              state["parent_state"], state["remainder_slices"])
  if not _bounded(buffered, 0, MAX_BUFFERED):
    raise _refuse(island, "data", text, "has elements_from_buffer_after_checkpoint out of "
                  f"[0, {MAX_BUFFERED}]")
  if (not isinstance(parent, dict) or set(parent) != {"next_index"} or
      not _bounded(parent["next_index"], 0, MAX_INDEX)):
    raise _refuse(island, "data", text, f"has no parent_state.next_index in [0, {MAX_INDEX}]")
  tokens = slices.get("tokens") if isinstance(slices, dict) and set(slices) == {"tokens"} else None
  if not (isinstance(tokens, list) and len(tokens) == 2 and
          (tokens == _EMPTY_SLICE or (_bounded(tokens[0], 0, MAX_INDEX) and
                                      _bounded(tokens[1], tokens[0] + 1, MAX_INDEX)))):
    raise _refuse(island, "data", text, "has no remainder_slices.tokens [-1, -1] or [A, B] "
                  "with 0 <= A < B")
  if last:
    try:
      before = _position_index(last)
    except (ValueError, KeyError, TypeError):
      before = None  # a last position that is not one (an older format): nothing to compare
    if before is not None and parent["next_index"] < before:
      raise _refuse(island, "data", text, f"moves back: next_index {parent['next_index']} < "
                    f"{before}, the island's last accepted position")
  return text


# ------------------------------------------------------------------------ payload norms
def norm_of(arrays: Iterable[Any]) -> tuple[float, bool]:
  """``(L2 norm, every value finite)`` of float arrays: a decoded payload (with a codec, the
  *decoded* values: bit-cast or quantized codes say nothing by themselves). Scaled by the
  largest magnitude, so 1e30 values give a norm of ~1e30, not an overflow to inf."""
  arrays = [np.asarray(a) for a in arrays]
  biggest = max((float(np.max(np.abs(a))) if a.size else 0.0 for a in arrays), default=0.0)
  if not math.isfinite(biggest):
    return math.inf, False
  if biggest == 0:
    return 0.0, True
  total = 0.0
  for a in arrays:
    scaled = a.ravel() / np.asarray(biggest, np.float64 if a.dtype == np.float64 else np.float32)
    total += float(np.dot(scaled, scaled))
  return biggest * math.sqrt(total), True


class NormGate:
  """Per fragment, the norms of the last ``window`` accepted payloads (all islands pooled), and
  the check a payload passes before it enters a round's sum.

  ``check`` refuses a payload that is not finite (always: one NaN would make the round's mean
  NaN, and the outer step skip the whole round, the honest contributions with it), or, once
  ``min_history`` norms are recorded, whose norm exceeds ``bound`` x their median (``bound`` 0:
  no norm check; else > 1). The median, not the mean or the max: one liar's values, even
  accepted ones (at most ``bound`` x the median), move it by one rank, not by their size, so
  while liars send fewer than half the recent payloads the bound stays the honest islands'.
  A refused payload is excluded alone and never recorded: the round's honest contributions
  still count, and the liar cannot raise its own bar. ``accept`` records a payload that entered
  a sum (a zero norm, an absent island's, carries no scale and is not recorded).

  Before ``min_history`` norms (at most ``window``) are recorded, a payload is checked for
  finiteness only: the first payloads of a fragment have nothing honest to be compared with.
  The median lags the newest norm by about ``window / 2`` payloads (pooled: ``window / (2M)``
  rounds of M islands), so an honest norm may grow by ``bound`` over that lag: a linear inner
  lr warm-up easily (round r's norm ~ 2r - 1), even 1.6x per payload with the defaults.

  ``to_json`` / ``from_json``: the state as a small JSON dict, for the syncer's checkpoint."""

  def __init__(self, bound: float = 10.0, window: int = 8, min_history: int = 2):
    bound, window, min_history = float(bound), int(window), int(min_history)
    if not (bound == 0 or 1 < bound < math.inf):
      raise ValueError(f"launch.norm_bound={bound} must be 0 (off) or > 1")
    if window < 1:
      raise ValueError(f"launch.norm_window={window} must be >= 1")
    if min_history < 1:
      raise ValueError(f"min_history={min_history} must be >= 1")
    self.bound, self.window, self.min_history = bound, window, min(min_history, window)
    self.norms: dict[int, collections.deque] = {}

  @classmethod
  def from_config(cls, config) -> "NormGate":
    return cls(float(config.launch.norm_bound), int(config.launch.norm_window))

  def history(self, fragment: int) -> list[float]:
    return list(self.norms.get(int(fragment), ()))

  def median(self, fragment: int) -> float | None:
    """The reference a payload of this fragment is held to; None while too few are recorded."""
    norms = self.history(fragment)
    return float(np.median(norms)) if len(norms) >= self.min_history else None

  def check(self, island: Any, fragment: int, norm: float, finite: bool) -> None:
    """Raises :class:`Refusal` unless the payload may enter the sum (see the class)."""
    norm = float(norm)
    if not finite:
      raise Refusal(f"{_who(island)}: fragment {fragment} payload has non-finite values")
    if not math.isfinite(norm):
      raise Refusal(f"{_who(island)}: fragment {fragment} payload norm={norm} (it overflows)")
    median = self.median(fragment)
    if self.bound and median is not None and norm > self.bound * median:
      raise Refusal(f"{_who(island)}: fragment {fragment} payload norm={norm:.4g} exceeds "
                    f"{self.bound:g} x the median {median:.4g} of the last "
                    f"{len(self.history(fragment))} accepted")

  def accept(self, fragment: int, norm: float) -> None:
    """Records the norm of a payload that entered a sum (positive and finite ones only)."""
    norm = float(norm)
    if math.isfinite(norm) and norm > 0:
      self.norms.setdefault(int(fragment), collections.deque(maxlen=self.window)).append(norm)

  def to_json(self) -> dict:
    return {"bound": self.bound, "window": self.window, "min_history": self.min_history,
            "norms": {str(p): list(v) for p, v in sorted(self.norms.items())}}

  @classmethod
  def from_json(cls, data: Mapping | None, bound: float | None = None,
                window: int | None = None) -> "NormGate":
    """A gate from :meth:`to_json`; ``bound`` / ``window`` (the config's, if it changed since
    the checkpoint) override the saved ones, the history cut to the last ``window``."""
    data = data or {}
    gate = cls(data.get("bound", 10.0) if bound is None else bound,
               data.get("window", 8) if window is None else window,
               data.get("min_history", 2))
    for p, norms in dict(data.get("norms", {})).items():
      for norm in norms:
        gate.accept(int(p), norm)
    return gate
