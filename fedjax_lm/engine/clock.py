"""The clock: host-side, deterministic from (config, step), and the only place that decides
*when* something happens between islands.

After each inner step ``done`` (1..T) it says which events are due, in order:

* ``SEND p``    islands encode fragment p's pseudo-gradient and hand it to the link; ``who``
                names the islands that take part (drop-out, :class:`health.Participation`);
* ``RECEIVE p`` the link's mean lands and the outer optimizer steps fragment p's global copy;
* ``MERGE p``   islands take the new global fragment (tau steps after its send).
* ``MOMENT k``  DES-LOC (:mod:`fedjax_lm.engine.desloc`): every island takes the islands' mean
                of its inner optimizer's moment k (0: mu, 1: nu), after the step's fragment
                events.

With a one-step-delayed outer step (``outer.delay``) a fragment's mean is applied at its next
send instead: ``MERGE p`` (the late outer step) follows each ``SEND p`` and takes the mean held
since the previous round; the host link's ``RECEIVE p`` comes just before the next ``SEND p``,
so the exchange overlaps a whole inner phase; at T the last mean is received and a final
``MERGE p`` applies it.

When fragments send and merge is :class:`fragments.Schedule` (staggered by H / P, flushed at T).
When the mean is *received* is the link's: an XLA collective is queued on the device right after
the send (``RECEIVE`` follows ``SEND``); the host link exchanges on a thread during the overlap
window, so ``RECEIVE`` comes just before its ``MERGE``.

Its state (:meth:`Clock.state`) is JSON saved in every checkpoint: the step, the schedule, who
is absent, what is in flight, and per-island local-step counts and speeds (all islands step
together here; an asynchronous policy is a clock that lets them differ).

Byte accounting lives here too, since it counts events: an island sends fragment p's payload at
each of its ``SEND p`` events it takes part in, and moment k at each ``MOMENT k``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from fedjax_lm import fragments
from fedjax_lm import health
from fedjax_lm.engine import desloc

SEND, RECEIVE, MERGE, MOMENT = "send", "receive", "merge", "moment"


class Event(NamedTuple):
  kind: str  # SEND | RECEIVE | MERGE | MOMENT
  fragment: int  # MOMENT: the moment k
  who: np.ndarray | None = None  # bool [M]: the islands that send (SEND only)


@dataclasses.dataclass(frozen=True)
class Clock:
  schedule: fragments.Schedule
  participation: health.Participation
  receive_at_merge: bool = False  # the link exchanges during the overlap window
  delayed: bool = False  # outer.delay: a round's mean is applied at the next round's send
  member: int | None = None  # a decoupled island job: ``who`` is this island's entry only
  moments: tuple[int, ...] = ()  # DES-LOC: per moment k, its averaging period (0: never)

  @classmethod
  def from_config(cls, config, receive_at_merge: bool = False, delayed: bool = False,
                  member: int | None = None, num: int | None = None) -> "Clock":
    """``num``: the islands the drop-out schedule is drawn over (default ``islands.num``);
    ``member``: the clock of that one island (a decoupled island job)."""
    oc = config.outer
    schedule = fragments.Schedule(int(oc.sync_every), int(oc.fragments), int(oc.overlap),
                                  int(config.total_steps))
    who = health.Participation(int(num or config.islands.num), float(config.islands.dropout),
                               config.islands.absent, int(config.seed))
    return cls(schedule, who, receive_at_merge, delayed, member, desloc.periods(config))

  @property
  def num_islands(self) -> int:
    return self.participation.num if self.member is None else 1

  def _present(self, done: int, p: int) -> np.ndarray:
    who = self.participation.present(done, p)
    return who if self.member is None else who[self.member:self.member + 1]

  def events(self, done: int) -> list[Event]:
    """The events due after inner step ``done``, in the order they must run."""
    if self.delayed:
      return self._delayed_events(done) + self._moment_events(done)
    out = []
    for kind, p in self.schedule.events(done):
      if kind == "send":
        out.append(Event(SEND, p, self._present(done, p)))
        if not self.receive_at_merge:
          out.append(Event(RECEIVE, p))
      else:
        if self.receive_at_merge:
          out.append(Event(RECEIVE, p))
        out.append(Event(MERGE, p))
    return out + self._moment_events(done)

  def _moment_events(self, done: int) -> list[Event]:
    return [Event(MOMENT, k) for k in desloc.due(self.moments, done, self.schedule.total)]

  def _delayed_events(self, done: int) -> list[Event]:
    """outer.delay (overlap 0): per sending fragment, [RECEIVE the previous round's mean (host
    link)], SEND, MERGE (the late outer step with the held mean), [RECEIVE this round's mean
    (XLA collective, queued now)]; at T also RECEIVE and a final MERGE of the last round."""
    out = []
    for p in self.schedule.sends(done):
      host = self.receive_at_merge
      out += [Event(RECEIVE, p)] * host + [Event(SEND, p, self._present(done, p)),
                                           Event(MERGE, p)]
      out += [Event(RECEIVE, p)] * (not host or done == self.schedule.total)
      out += [Event(MERGE, p)] * (done == self.schedule.total)
    return out

  def in_flight(self, done: int) -> list[int]:
    """Fragments sent but not yet merged after step ``done`` (at most one sync each, tau < H)."""
    if done >= self.schedule.total:
      return []
    if self.delayed:  # sent, received (held) or not, and applied at the next send
      return [p for p in range(self.schedule.fragments) if self.schedule.send_count(p, done)]
    return sorted({p for s in range(max(1, done - self.schedule.overlap + 1), done + 1)
                   for p in self.schedule.regular_sends(s)} if self.schedule.overlap else set())

  def state(self, done: int) -> dict:
    """JSON for the checkpoint: enough to check that a resumed run is on the same clock."""
    s, who = self.schedule, self.participation
    return {"step": done, "sync_every": s.every, "fragments": s.fragments, "overlap": s.overlap,
            "delayed": self.delayed,
            **({"moments_every": list(self.moments)} if any(self.moments) else {}),
            "dropout": who.dropout, "seed": who.seed,
            "absent": {str(k): sorted(v) for k, v in sorted(who.absent.items())},
            "in_flight": self.in_flight(done), "local_steps": [done] * self.num_islands,
            "speeds": [1.0] * self.num_islands}

  # ---------------------------------------------------------------- byte accounting
  def sent(self, done: int, per_send: Callable[[int], float]) -> float:
    """Sum over the sends so far of ``per_send(p)``, each weighted by the share of islands
    that took part (an absent island sends nothing): what one island sent, on average."""
    if self.participation.always_all:
      return sum(self.schedule.send_count(p, done) * per_send(p)
                 for p in range(self.schedule.fragments))
    return sum(per_send(p) * float(np.mean(self.participation.present(s, p)))
               for s in range(1, done + 1) for p in self.schedule.sends(s))

  def moments_sent(self, done: int) -> tuple[int, ...]:
    """Per moment k, the ``MOMENT k`` events so far (every island takes part in each)."""
    return desloc.count(self.moments, done, self.schedule.total)

  def peak(self, done: int, fragment_bytes: Sequence[int]) -> int:
    """The largest single sync (one fragment's payload) sent so far."""
    return max([b for p, b in enumerate(fragment_bytes) if self.schedule.send_count(p, done)],
               default=0)


class LocalClock:
  """The clock of one island under ``outer.policy=async`` (decoupled): the island syncs its one
  fragment after its own H local steps, H set by the syncer at each receive (dynamic local
  updates). Not a pure function of the step: ``h`` and ``last`` follow the syncer's replies."""

  delayed = False

  def __init__(self, h: int, last: int, total: int):
    self.h, self.last = int(h), int(last)
    self.schedule = fragments.Schedule(int(h), 1, 0, int(total))

  @property
  def num_islands(self) -> int:
    return 1

  def events(self, done: int) -> list[Event]:
    if done - self.last < self.h:
      return []
    self.last = done
    return [Event(SEND, 0, np.ones(1, bool)), Event(RECEIVE, 0), Event(MERGE, 0)]
