"""Mesh-axis islands: M replicas in one SPMD program over the ``island`` mesh axis.

Params and inner optimizer state carry a leading ``[M]`` dim sharded over ``island``; the inner
step is the single-island step under ``jax.vmap(..., spmd_axis_name="island")`` and moves no
byte across islands. M need not equal the island axis size A: each island shard holds M/A
islands (A = 1 simulates all M islands on one device, with no collectives at all). The outer
sync runs per fragment (P = 1 is the whole model: DiLoCo) on the clock's events
(:mod:`fedjax_lm.engine.clock`), each stage its own program (:mod:`fedjax_lm.engine.programs`).

The inner optimizer state is kept per island across syncs (``outer.reset_inner_opt_state``
re-initialises it, P = 1 only). Global params and the outer optimizer state are replicated over
``island`` but ZeRO-sharded over the in-island data axes, so their bytes per device shrink with
the island's size.

Communication accounting (``island_bytes``): per fragment sync, the encoded pseudo-gradient one
island sends across the island axis (values + scales + indices; float32 when uncompressed). A
ring all-reduce moves about 2(A-1)/A of that per device; we report the payload, the same
convention for all, and tests check it against the compiled HLO. Beside it each device sends
one float32 weight per sync (``island_control_bytes``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_lm import codecs
from fedjax_lm import fragments
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import steps
from fedjax_lm.engine.state import tree_bytes
from fedjax_lm.engine import clock as clock_lib
from fedjax_lm.engine import desloc as desloc_lib
from fedjax_lm.engine import links
from fedjax_lm.engine import merges
from fedjax_lm.engine import programs as programs_lib
from fedjax_lm.engine import stages
from fedjax_lm.engine import state as state_lib
from fedjax_lm.engine.state import State


@dataclasses.dataclass(eq=False)
class IslandsEngine:
  """``init(key)``, ``inner_step(state, batch)``, ``sync(state, done)``, ``eval_params``."""

  spec: stages.Spec
  programs: programs_lib.Programs
  clock: clock_lib.Clock
  link: Any
  make_params: Any  # key -> global params
  name: str = "islands"
  desloc: desloc_lib.DesLoc | None = None  # DES-LOC's moment averages (outer.desloc_*_every)

  def __post_init__(self):
    self._in_flight: dict[int, Any] = {}  # fragment -> the link's handle, SEND to RECEIVE

  # ------------------------------------------------------------------ the loop's API
  def init(self, key: jax.Array) -> State:
    return self.programs.init(self.make_params(key))

  def inner_step(self, state: State, batch: dict) -> tuple[State, dict]:
    islands, metrics = self.programs.inner(state.islands, batch)
    return state._replace(islands=islands), metrics

  def sync(self, state: State, done: int) -> State:
    """Runs the clock's events due after ``done`` inner steps. Nothing the next inner steps
    compute feeds an exchange: the host link runs it on a thread meanwhile; an XLA collective
    is queued on the device (where programs run in order)."""
    islands, server = state
    for event in self.clock.events(done):
      p = event.fragment
      if event.kind == clock_lib.SEND:
        islands, sent = self.programs.encode[p](islands, server, np.int32(done), event.who)
        self._in_flight[p] = self.link.start(sent, p, done, self.spec.sent_shardings(p, None))
      elif event.kind == clock_lib.RECEIVE:
        if p in self._in_flight:  # (settle may have received it already, for an eval)
          server = self._receive(server, p)
      elif event.kind == clock_lib.MOMENT:  # DES-LOC: the islands' mean of moment p
        islands = self.desloc.average[p](islands)
      elif self.spec.merge.delayed:  # MERGE / FLUSH: the outer step one round late
        islands, server = self.programs.late[p](islands, server)
      else:
        islands = self.programs.merge[p](islands, server)
    return State(islands, server)

  def _receive(self, server, p: int):
    return self.programs.receive[p](server, self.link.finish(self._in_flight.pop(p)))

  def settle(self, state: State) -> State:
    """``state`` with every exchange in flight received by the server (merges stay due on the
    clock): what evaluation and a checkpoint must see. Only the host link has any."""
    server = state.server
    for p in sorted(self._in_flight):
      server = self._receive(server, p)
    return state._replace(server=server)

  def eval_params(self, state: State) -> Any:
    """The global params; with ``outer.delay``, with every received mean applied (what the
    syncer of decoupled mode holds), though the islands take the last one only at its next
    send; with NoLoCo, the islands' mean outer copy."""
    if not self.spec.merge.has_current:
      return state.server.params
    return self.programs.current(state.server)

  @staticmethod
  def failures_in_a_row(state: State) -> jax.Array:
    return state.server.failures_in_a_row

  # ------------------------------------------------------------------ layout and checks
  @property
  def num_islands(self) -> int:
    return self.spec.num

  @property
  def state_shardings(self) -> State:
    return self.spec.shardings

  @property
  def params_sharding(self) -> Any:
    return self.spec.shardings.server.params

  @property
  def registry(self) -> dict:
    return {**self.programs.registry(), **(self.desloc.registry() if self.desloc else {})}

  def lower(self, state: State, batch: Any) -> dict:
    """Every program lowered on (abstract) ``state``: ``{"inner": ..., "encode/0": ...}``."""
    out = {"inner": self.programs.inner.lower(state.islands, batch)}
    for p in range(self.spec.frags.num):
      out.update({f"{k}/{p}": v for k, v in self.lower_sync(state, p).items()})
    if self.desloc:
      out.update(self.desloc.lower(state.islands))
    return out

  def lower_sync(self, state: State, p: int) -> dict:
    return programs_lib.lower_sync(self.programs, self.spec, self.link, state, p)

  # ------------------------------------------------------------------ byte accounting
  @property
  def sync_every(self) -> int:
    return self.clock.schedule.every

  @property
  def fragment_bytes(self) -> tuple[int, ...]:
    """Payload one island sends in one sync of each fragment (0 with one island)."""
    if self.spec.num == 1:
      return (0,) * self.spec.frags.num
    codec = self.spec.codec
    return tuple(tree_bytes(self.spec.frag_abstract[p]) if codec is None
                 else codecs.payload_bytes(codec, self.spec.padded[p])
                 for p in range(self.spec.frags.num))

  @property
  def bytes_per_sync(self) -> int:
    return sum(self.fragment_bytes)

  def island_bytes(self, done: int) -> float:
    """Cumulative payload one island has sent after ``done`` inner steps (with drop-out, the
    mean over islands: an absent island sends nothing)."""
    sizes = self.fragment_bytes
    return self.clock.sent(done, lambda p: sizes[p]) + self._moment_bytes(done)

  def _moment_bytes(self, done: int) -> int:
    """DES-LOC: one float32 copy of moment k per island at each of its averages."""
    if not self.desloc:
      return 0
    return sum(n * b for n, b in zip(self.clock.moments_sent(done), self.desloc.bytes))

  def island_control_bytes(self, done: int) -> float:
    return self.clock.sent(done, lambda p: self.control_bytes_per_send)

  def island_peak_bytes(self, done: int) -> int:
    moments = (zip(self.clock.moments_sent(done), self.desloc.bytes) if self.desloc else ())
    return max([self.clock.peak(done, self.fragment_bytes)] + [b for n, b in moments if n])

  def clock_state(self, done: int) -> dict:
    return self.clock.state(done)

  @property
  def control_bytes_per_send(self) -> int:
    """Who-sent weights beside each fragment's payload: 4 bytes per device of the island."""
    return 4 * self.spec.devices_per_island if self.spec.num > 1 else 0


def build(config, mesh: Mesh, *, loss_fn: Callable, make_params: Callable, abstract: Any,
          param_specs: Any, zero_specs: Any, tx: optax.GradientTransformation, groups: int,
          guard: bool, outer_tx: optax.GradientTransformation, link: Any = None,
          clock: Any = None, world: int = 0) -> IslandsEngine:
  """Mesh-axis islands from ``config.outer`` / ``config.islands``: the codec, the link, the
  clock, the fragments and their ZeRO specs, the typed state's specs, then the programs.
  A decoupled island job passes its own ``link`` (to the syncer), ``clock`` (its own view of
  the run's) and ``world`` (the run's M, for the merge policies that divide by it)."""
  oc = config.outer
  codec = codecs.from_config(oc)
  check_streaming_options(oc, codec)
  merge = merges.from_config(oc)
  link = link or getattr(merge, "link", None) or links.from_config(config)  # NoLoCo: its own
  clock = clock or clock_lib.Clock.from_config(config, receive_at_merge=link.overlaps,
                                               delayed=merge.delayed)
  frags = fragments.Fragments(abstract, clock.schedule.fragments)
  frag_abstract = tuple(frags.abstract(abstract, p) for p in range(frags.num))
  frag_specs = []  # per fragment: ZeRO specs of its (unstacked) leaves
  for p, f_abs in enumerate(frag_abstract):
    f_specs = tuple(mesh_lib.zero_spec(s, a.shape, mesh)
                    for s, a in zip(frags.specs(param_specs, p), f_abs))
    mesh_lib.check_divisible(f_abs, f_specs, dict(mesh.shape))
    frag_specs.append(f_specs)
  # Fragment p's payload: [M, n_p] flat, padded so each in-island device sends whole blocks.
  in_island = math.prod(mesh.shape[a] for a in mesh_lib.IN_ISLAND_AXES)
  sizes = [sum(math.prod(x.shape) for x in f) for f in frag_abstract]
  beta = float(oc.error_feedback)
  specs = state_lib.specs(
      param_specs=param_specs, zero_specs=zero_specs,
      inner_opt_specs=mesh_lib.opt_state_specs(tx, abstract, param_specs),
      outer_specs=tuple(mesh_lib.opt_state_specs(outer_tx, a, s)
                        for a, s in zip(frag_abstract, frag_specs)),
      error_feedback=beta > 0, merge=merge,
      copy_outer_specs=tuple(mesh_lib.opt_state_specs(outer_tx, a, frags.specs(param_specs, p))
                             for p, a in enumerate(frag_abstract)))
  spec = stages.Spec(
      num=int(config.islands.num), mesh=mesh, frags=frags, frag_abstract=frag_abstract,
      frag_specs=tuple(frag_specs),
      padded=tuple(codecs.padded_size(n, codec, in_island) if codec else n for n in sizes),
      codec=codec, train_step=steps.make_train_step(loss_fn, tx, guard=guard), groups=groups,
      inner_tx=tx, outer_tx=outer_tx, shardings=mesh_lib.shardings(mesh, specs),
      merge=merge, beta=beta, guard=guard,
      keep_absent=config.islands.absent_policy == "keep",
      reset_inner=bool(oc.reset_inner_opt_state), seed=int(config.seed),
      world=int(world) or int(config.islands.num))
  return IslandsEngine(spec=spec, programs=programs_lib.build(spec, link), clock=clock,
                       link=link, make_params=make_params,
                       desloc=desloc_lib.build(config, spec, abstract))


DELAYS = ("none", "naive", "eager")  # outer.delay


def check_streaming_options(oc, codec) -> None:
  """One clear error for a bad combination of streaming / compression options."""
  _check(0.0 <= float(oc.mixing) <= 1.0, f"outer.mixing={oc.mixing} must be in [0, 1]")
  _check(0.0 <= float(oc.error_feedback) <= 1.0,
         f"outer.error_feedback={oc.error_feedback} must be in [0, 1] (0 = off)")
  _check(not (float(oc.error_feedback) > 0 and codec is None),
         "outer.error_feedback > 0 needs a lossy outer.compression (not 'none')")
  _check(not (oc.eager and int(oc.overlap) < 1),
         "outer.eager needs outer.overlap >= 1 (it fills the overlap window)")
  _check(oc.delay in DELAYS, f"outer.delay={oc.delay!r}: expected one of {DELAYS}")
  if oc.delay != "none":
    for key, ok in (("outer.overlap", int(oc.overlap) == 0), ("outer.mixing", float(oc.mixing) == 0),
                    ("outer.eager", not oc.eager),
                    ("outer.reset_inner_opt_state", not oc.reset_inner_opt_state)):
      _check(ok, f"outer.delay={oc.delay} overlaps the whole inner phase: leave {key} at its "
                 "default")
  _check(oc.transport in links.TRANSPORTS,
         f"outer.transport={oc.transport!r}: expected one of {links.TRANSPORTS}")
  _check(not (oc.reset_inner_opt_state and int(oc.fragments) > 1),
         "outer.reset_inner_opt_state is only defined for outer.fragments=1")


def _check(ok: bool, msg: str) -> None:
  if not ok:
    raise ValueError(msg)
