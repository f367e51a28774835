"""The remote link: a decoupled island job's link to the syncer, the island half of the exchange.

A decoupled island runs the mesh-axis engine and loop with M = 1 (:mod:`fedjax_lm.engine`);
this link is the only thing that differs. Like the host link it exchanges off the device while
the island keeps stepping (``overlaps``: the clock puts RECEIVE just before the MERGE, or with
``outer.delay`` just before the next send), with the same two halves:

* ``start(sent, p, step, _)``: the encoded payload (and its weight) goes to the syncer with the
  island's data position, in one signed ``Send``;
* ``finish(ticket)``: long-polls ``Receive`` until the round closed, and returns what the
  syncer delivers, which ``receive_program(spec, p)`` applies to the island's server copy:

  ``mean``    the round's :class:`stages.Reduced` (mean over the islands that sent, count,
              masked): the island runs the *same* outer step (or, delayed, hold) program as the
              mesh-axis mode and the syncer, so its global copy, outer state and merge state
              are the mesh-axis mode's, and every variant (eager, ``outer.delay``, streaming,
              codecs, drop-out) runs unchanged;
  ``state``   the syncer's whole server (global params, outer states, eager merge state):
              when the island's copy does not hold the round just before this one (it joined
              late, missed a round, or the round is older than the syncer keeps) it adopts
              the syncer's instead of applying the mean;
  ``global``  ``outer.policy=async``: the global fragment after the syncer applied this send
              on arrival (Delayed Nesterov), with the H to run next.

The syncer (:mod:`fedjax_lm.decoupled.syncer`) is the server half: it reduces with the stages'
own reduce and runs the same outer-step program on its copy, for evaluation, checkpoints and
joiners. Each island and the syncer apply the same means in the same order with the same
programs, so on one CPU class their copies are bit for bit equal (on different hardware they
may differ by rounding; a mismatch of rounds, not of bits, triggers ``state``).
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from fedjax_lm import wire
from fedjax_lm.engine import stages

MEAN, STATE, GLOBAL = "mean", "state", "global"


class Ticket(NamedTuple):
  fragment: int
  step: int
  meta: dict  # the send's fields and payload (host arrays), kept to resend if the syncer
  arrays: list  # lost it (it restarted): the one payload-sized host buffer an island holds
  sent: Any = None  # the send in flight (a future on the shard's sender thread)


def host_view(x: jax.Array) -> np.ndarray:
  """``x`` as a host array to send: on a CPU device a read-only view of its buffer (DLPack,
  no copy: the payload is not held twice in host memory); elsewhere (or a dtype DLPack lacks,
  bfloat16) a copy to the host. Only for arrays nothing donates while the view lives."""
  if x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()) and (
      len(x.devices()) == 1):
    try:
      return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError):
      pass
  return np.asarray(jax.device_get(x))


def transferable(spec: stages.Spec, server: Any, params_only: bool = False) -> tuple:
  """The parts of a server copy a joiner or a lagging island adopts from the syncer: global
  params, outer states, and what the merge policy shares (eager: the last mean; a delayed
  island's held mean is its own). ``params_only`` (async: the syncer's outer optimizer is its
  own, Delayed Nesterov): the params."""
  if params_only:
    return (server.params, (), ())
  return (server.params, server.outer, spec.merge.shared(server.merge))


def fragment_parts(spec: stages.Spec, server: Any, owned: tuple) -> tuple:
  """A syncer shard's share of :func:`transferable`: the global params and outer state of
  the fragments it owns (a sharded syncer needs a merge policy with no shared server state)."""
  return (tuple(spec.frags.take(server.params, p) for p in owned),
          tuple(server.outer[p] for p in owned))


def adopt_fragments(spec: stages.Spec, owned: tuple, server: Any, parts: tuple) -> Any:
  """``server`` with a syncer shard's :func:`fragment_parts` for the fragments ``owned``."""
  params, outer = server.params, list(server.outer)
  for p, values, state in zip(owned, *parts):
    params = spec.frags.put(params, p, values)
    outer[p] = state
  return server._replace(params=params, outer=tuple(outer))


def adopt(spec: stages.Spec, server: Any, parts: tuple) -> Any:
  """``server`` with the syncer's ``parts`` (:func:`transferable`)."""
  params, outer, shared = parts
  if not outer:
    return server._replace(params=params)
  return server._replace(params=params, outer=outer,
                         merge=spec.merge.adopt(server.merge, shared))


class RemoteLink:
  """The link of a decoupled island job to the syncer: ``clients``, one channel.Client per
  syncer shard (fragment p goes to shard p % S). Each shard's sends run in order on its own
  thread, so the upload overlaps the next inner steps and the shards receive in parallel."""

  lead = None
  overlaps = True

  def __init__(self, clients, island: int, *, position: Callable[[], str], total_steps: int,
               asynchronous: bool = False, reply_limit: int = 0):
    self.clients = list(clients) if isinstance(clients, (list, tuple)) else [clients]
    self.client, self.island = self.clients[0], int(island)
    self._senders = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="send")
                     for _ in self.clients]
    self.reply_limit = int(reply_limit)  # bytes: the largest reply (the syncer's server state)
    self.position, self.total = position, int(total_steps)
    self.asynchronous = asynchronous
    self.applied: dict[int, int] = {}  # fragment -> the last round this island's copy holds
    self.version = 0  # the syncer's rounds (async: updates) when this island last pulled
    self.progress = None  # async: the run's progress in inner steps, at the last pull
    self.local_steps = None  # async: the H the syncer set for the next local phase
    self.phase_start = 0  # async: the island's step when its current local phase began
    self.stopping = False  # async: the run's tokens are in; the island stops
    self.sent_bytes = 0  # encoded payload bytes sent (the weight is control, not counted)

  # ------------------------------------------------------------------ the link's halves
  def start(self, sent: Any, fragment: int, step: int, gathered: Any = None) -> Ticket:
    del gathered
    arrays = [host_view(x) for x in jax.tree.leaves(sent)]
    arrays[-1] = arrays[-1][:, :1]  # the weight: one copy (each of the island's devices holds one)
    step = min(int(step), self.total)
    meta = {"island": self.island, "fragment": int(fragment), "step": step,
            "data": self.position(), "version": self.version,
            "local_steps": self._phase_steps(step)}
    self.phase_start = step
    self.sent_bytes += sum(a.nbytes for a in arrays[:-1])
    return Ticket(int(fragment), step, meta, arrays, self._send(int(fragment), meta, arrays))

  def _phase_steps(self, step: int) -> int:
    """Async: the inner steps the update holds: the H the syncer gave at the last pull, or,
    before the first pull since this island (re)joined, the steps it ran since joining (not
    0: the run's applied steps, which end it and set the islands' schedule position, would
    miss every island's first phase)."""
    return int(self.local_steps) if self.local_steps else max(0, int(step) - self.phase_start)

  def owner(self, fragment: int) -> int:
    """The syncer shard that owns ``fragment``."""
    return int(fragment) % len(self.clients)

  def _send(self, fragment: int, meta: dict, arrays: list) -> concurrent.futures.Future:
    def send():
      reply = self.clients[self.owner(fragment)].call("Send", "send", meta, arrays)[1]
      self.stopping |= self.asynchronous and bool(reply.get("stop", False))
    return self._senders[self.owner(fragment)].submit(send)

  def close(self) -> None:
    for sender in self._senders:
      sender.shutdown()

  def finish(self, ticket: Ticket) -> tuple[str, Any]:
    """What the syncer delivers for the ticket's round, as ``(kind, arrays)``."""
    if ticket.sent is not None:
      ticket.sent.result()  # (the send's error, if it failed, raised here)
    request = {"island": self.island, "fragment": ticket.fragment, "step": ticket.step,
               "applied": self.applied.get(ticket.fragment, 0)}
    while True:
      kind, meta, arrays = self.clients[self.owner(ticket.fragment)].call(
          "Receive", "receive", request, reply=(MEAN, STATE, GLOBAL, "pending", "resend"),
          reply_limit=self.reply_limit)
      if kind == "resend":  # the syncer restarted from a checkpoint without our send
        self._send(ticket.fragment, ticket.meta, ticket.arrays).result()
      elif kind != "pending":
        break
    self.version = int(meta.get("version", self.version))
    if kind == MEAN:
      self.applied[ticket.fragment] = ticket.step
    elif kind == STATE:
      self.applied.update({int(p): int(s) for p, s in meta["closed"].items()})
    else:
      self.progress, self.local_steps = int(meta["progress"]), int(meta["local_steps"])
      self.stopping |= bool(meta.get("stop", False))
    return kind, arrays

  # ------------------------------------------------------------------ what it delivers
  def receive_program(self, spec: stages.Spec, p: int) -> Callable:
    """``receive/p`` for what the syncer delivers: the round's mean through the mesh-axis
    mode's own outer-step (or hold) program, the syncer's server adopted, or (async) the
    global fragment put in place."""
    sh = spec.shardings.server
    mean_sh = spec.named(spec.frag_specs[p])
    scalar = jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
    apply_mean = jax.jit(functools.partial(stages.receive, spec, p), donate_argnums=0,
                         out_shardings=sh)
    put = jax.jit(lambda server, values: server._replace(
        params=spec.frags.put(server.params, p, values)), donate_argnums=0, out_shardings=sh)
    if len(self.clients) > 1:
      owned = tuple(q for q in range(spec.frags.num) if self.owner(q) == self.owner(p))
      take_over = jax.jit(functools.partial(adopt_fragments, spec, owned), donate_argnums=0,
                          out_shardings=sh)
    else:
      take_over = jax.jit(functools.partial(adopt, spec), donate_argnums=0, out_shardings=sh)
    shapes = [tuple(x.shape) for x in spec.frag_abstract[p]]

    def program(server: Any, delivered: tuple[str, list]) -> Any:
      kind, arrays = delivered
      if kind in (MEAN, GLOBAL) and ([tuple(a.shape) for a in arrays[:len(shapes)]] != shapes
                                     or len(arrays) != len(shapes) + 2 * (kind == MEAN)):
        raise wire.WireError(f"the syncer's {kind} of fragment {p} does not match its layout")
      if kind == MEAN:
        *mean, count, masked = arrays
        reduced = stages.Reduced(tuple(jax.device_put(m, s) for m, s in zip(mean, mean_sh)),
                                 jax.device_put(np.float32(count), scalar),
                                 jax.device_put(np.bool_(masked), scalar))
        return apply_mean(server, reduced)
      if kind == GLOBAL:
        return put(server, tuple(jax.device_put(a, s) for a, s in zip(arrays, mean_sh)))
      return take_over(server, self.parts(spec, server, arrays, self.owner(p)))
    return program

  def parts(self, spec: stages.Spec, server: Any, arrays: list, shard: int = 0) -> tuple:
    """The syncer's (or, sharded, shard ``shard``'s) :func:`transferable` leaves
    (:func:`fragment_parts`) as this island's server parts, checked."""
    if len(self.clients) > 1:
      owned = tuple(q for q in range(spec.frags.num) if self.owner(q) == shard)
      shapes = jax.eval_shape(functools.partial(fragment_parts, spec, owned=owned), server)[0]
      like = (tuple(tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh) for x, sh in zip(
          xs, spec.named(spec.frag_specs[p]))) for p, xs in zip(owned, shapes)),
              tuple(server.outer[p] for p in owned))
    else:
      like = transferable(spec, server, self.asynchronous)
    leaves, treedef = jax.tree.flatten(like)
    if [tuple(a.shape) for a in arrays] != [tuple(x.shape) for x in leaves]:
      raise wire.WireError("the syncer's server state does not match this island's layout")
    return treedef.unflatten([jax.device_put(a.astype(x.dtype, copy=False), x.sharding)
                              for a, x in zip(arrays, leaves)])
