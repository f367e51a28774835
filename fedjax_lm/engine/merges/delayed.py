"""The one-step-delayed outer step (``outer.delay``; Kale et al. 2025, arXiv 2502.12996, their
naive delayed and eager variants): the exchange of round r overlaps the whole inner phase
r + 1, so the outer step of round r is applied at round r + 1's send.

    at fragment p's send (round r):  islands, sent = encode(p, ...)      delta_r = start - local
                                                                         (eager: each island's
                                                                         outer copy steps with
                                                                         its eager estimate)
                                     islands, server = late(p, ...)      server: outer step with
                                                                         the held mean of r - 1;
                                                                         islands restart (naive:
                                                                         from global; eager:
                                                                         from their own copy)
    when round r's mean lands:       server = at_receive(p, ...)         held, not applied
    at T, after the last mean lands: late once more                      the last outer step

Naive: every island starts round r + 1 from ``global_r = OuterOpt(global_{r-1}, dbar_{r-1})``.
Eager: island m replaces its own stale share of the held mean by its fresh pseudo-gradient,
``d~_m = dbar_{r-1} + (d_m,r - d_m,r-1) / M`` (own current, others' previous), and steps its own
outer copy and outer optimizer state with it: each pseudo-gradient is applied once, its own
share one round earlier. The global copy (what evaluation reads) applies the true means in
order, one round late, in both variants.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.engine.merges import mix

VARIANTS = ("naive", "eager")


class Pending(NamedTuple):
  """The mean each fragment last received, to be applied at its next send, and how many
  islands it averages (``[P]``; 0: nothing to apply)."""
  mean: Any  # like params (ZeRO-sharded)
  count: jax.Array  # float32 [P]


class OuterCopies(NamedTuple):
  """Eager: each island's own outer copy, stepped by its own outer optimizer with the eager
  estimate, and its last pseudo-gradient (all ``[M, ...]``)."""
  params: Any
  outer: tuple  # per fragment: the island's outer optimizer state
  own_prev: Any


class Delayed(mix.Mix):
  delayed = True

  def __init__(self, variant: str):
    super().__init__(0.0)
    if variant not in VARIANTS:
      raise ValueError(f"outer.delay={variant!r}: expected one of {VARIANTS}")
    self.variant = variant
    self.name = f"delayed_{variant}"

  @property
  def eager(self) -> bool:
    return self.variant == "eager"

  def state_specs(self, stacked, zero_specs, copy_outer_specs):
    islands = OuterCopies(stacked, copy_outer_specs, stacked) if self.eager else mix.Absent()
    return islands, Pending(zero_specs, jax.sharding.PartitionSpec())

  def init(self, spec, params, stacked, outer):
    server = Pending(jax.tree.map(jnp.zeros_like, params),
                     jnp.zeros((spec.frags.num,), jnp.float32))
    if not self.eager:
      return mix.Absent(), server
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (spec.num,) + x.shape), outer)
    return OuterCopies(stacked, copies, jax.tree.map(jnp.zeros_like, stacked)), server

  def start(self, spec, p, islands, g):
    if self.eager:  # the island's own outer copy
      return spec.frags.take(islands.merge.params, p, lead=1)
    return super().start(spec, p, islands, g)

  def at_send(self, spec, p, islands, server, delta, g):
    """Eager: ``d~_m = dbar_prev + (d_m - d_m_prev) / M`` (the held mean with the island's
    own stale share replaced by its fresh one), applied by the island's own outer optimizer
    to its own outer copy."""
    if not self.eager:
      return islands
    take = lambda tree: spec.frags.take(tree, p, lead=1)
    put = lambda tree, values: spec.frags.put(tree, p, values, lead=1)
    copies = islands.merge
    held = spec.frags.take(server.merge.mean, p)
    d_eager = tuple(h[None] + (d - o) / spec.m
                    for d, o, h in zip(delta, take(copies.own_prev), held))
    new, outer = jax.vmap(lambda d, s, x: mix.outer_update(spec.outer_tx, d, s, x))(
        d_eager, copies.outer[p], take(copies.params))
    return islands._replace(merge=OuterCopies(
        put(copies.params, new), copies.outer[:p] + (outer,) + copies.outer[p + 1:],
        put(copies.own_prev, delta)))

  def at_receive(self, spec, p, server, reduced, outer_step: Callable):
    """Fragment p's mean is kept, not applied: :meth:`late` takes it at p's next send."""
    del outer_step
    held = server.merge
    return server._replace(merge=Pending(spec.frags.put(held.mean, p, reduced.mean),
                                         held.count.at[p].set(reduced.count)))

  def held_mean(self, spec, p, server, reduced_type):
    """Fragment p's held mean, as the reduce stage returns it (count 0: nothing held)."""
    held = server.merge
    return reduced_type(spec.frags.take(held.mean, p), held.count[p], jnp.bool_(False))

  def late(self, spec, p, islands, server, outer_step: Callable, reduced_type):
    """At fragment p's send, one round late: the global copy takes the outer step with the
    held mean (skipped while nothing is held); the islands restart their next inner phase
    from it (naive) or from their own outer copy, already stepped at the send (eager)."""
    held = server.merge
    server = outer_step(spec, p, server, self.held_mean(spec, p, server, reduced_type))
    server = server._replace(merge=held._replace(count=held.count.at[p].set(0.0)))  # applied
    start = (spec.frags.take(islands.merge.params, p, lead=1) if self.eager
             else tuple(jnp.broadcast_to(g[None], (spec.num,) + g.shape)
                        for g in spec.frags.take(server.params, p)))
    islands = islands._replace(params=spec.frags.put(islands.params, p, start, lead=1))
    return islands, server

  def current(self, spec, server, outer_step: Callable, reduced_type):
    """The global params with every held mean applied (the server is not changed)."""
    for p in range(spec.frags.num):
      server = outer_step(spec, p, server, self.held_mean(spec, p, server, reduced_type))
    return server.params

  def adopt(self, server_merge, shared):
    """A joiner's held means count as applied: the syncer's copy holds every closed round."""
    del shared
    return server_merge._replace(count=jnp.zeros_like(server_merge.count))
