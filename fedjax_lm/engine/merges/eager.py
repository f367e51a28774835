"""Eager updates within the overlap window (``outer.eager``; ours, adapted from Kale et al.
2025, arXiv 2502.12996).

Their eager outer gradient for island m replaces the island's own stale share of the last
averaged pseudo-gradient by its fresh one: ``d~_m = dbar_prev + (d_m - d_m_prev) / M``. They
overlap the whole inner phase and drive a per-island outer optimizer with d~_m (that is
:mod:`fedjax_lm.engine.merges.delayed`, ``outer.delay=eager``). Here the exchange overlaps
tau < H steps and one global copy is driven by the true average, so: at the send, island m
steps from ``eager_m = global + outer_update(d~_m)`` at once (the outer state is read, not
advanced); when the mean lands the global copy takes the true outer step and, at the merge, the
island is corrected by the difference, ``local += (1 - alpha) (global_new - eager_m)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.engine.merges import mix


class EagerIslands(NamedTuple):
  """Per island (``[M, ...]``): its own last pseudo-gradient, and the point its eager outer
  step started from."""
  own_prev: Any
  base: Any


class EagerServer(NamedTuple):
  """The server's last mean pseudo-gradient."""
  avg_prev: Any


class Eager(mix.Mix):
  name = "eager"

  def state_specs(self, stacked, zero_specs, copy_outer_specs):
    del copy_outer_specs
    return EagerIslands(stacked, stacked), EagerServer(zero_specs)

  def init(self, spec, params, stacked, outer):
    del spec, outer
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return EagerIslands(zeros(stacked), zeros(stacked)), EagerServer(zeros(params))

  def at_send(self, spec, p, islands, server, delta, g):
    """Kale et al.'s estimate of the mean, ``dbar_prev + (d_m - d_m_prev) / M``, and the
    island's step from ``global + outer_update(estimate)`` (the outer state read only)."""
    take = lambda tree: spec.frags.take(tree, p, lead=1)
    put = lambda tree, values: spec.frags.put(tree, p, values, lead=1)
    avg_prev = spec.frags.take(server.merge.avg_prev, p)
    d_hat = tuple(a[None] + (d - o) / spec.m
                  for d, o, a in zip(delta, take(islands.merge.own_prev), avg_prev))
    base = jax.vmap(lambda d: mix.outer_update(spec.outer_tx, d, server.outer[p], g)[0])(d_hat)
    return islands._replace(params=put(islands.params, base),
                            merge=EagerIslands(put(islands.merge.own_prev, delta),
                                               put(islands.merge.base, base)))

  def at_outer(self, spec, p, server_merge, reduced):
    return EagerServer(spec.frags.put(server_merge.avg_prev, p, reduced.mean))

  def merged(self, spec, p, islands, local, new_g):
    base = spec.frags.take(islands.merge.base, p, lead=1)
    return tuple(l + (1.0 - self.alpha) * (g[None] - b) for l, g, b in zip(local, new_g, base))

  def shared(self, server_merge):
    return server_merge

  def adopt(self, server_merge, shared):
    del server_merge
    return shared
