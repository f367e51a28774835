"""alpha-mix, the default merge policy: DiLoCo (alpha = 0: islands restart from the new global
fragment) and Streaming DiLoCo (alpha > 0: ``local <- alpha local + (1 - alpha) global``, tau
steps after the send). It keeps no state. Every other policy overrides some of its hooks."""

from __future__ import annotations

from typing import Any, Callable

import optax

Absent = optax.EmptyState  # a state part this policy does not have


def outer_update(outer_tx: optax.GradientTransformation, delta: tuple, opt_state: Any,
                 global_frag: tuple) -> tuple:
  """One outer optax step of a fragment: (new global fragment, new outer state)."""
  updates, opt_state = outer_tx.update(delta, opt_state, global_frag)
  return optax.apply_updates(global_frag, updates), opt_state


class Mix:
  """The merge policy interface, with alpha-mix's behaviour. Hooks, in the order of a round:

  ``start``       where each island's inner phase started (its pseudo-gradient's origin);
  ``at_send``     what an island does with its fresh pseudo-gradient at the send;
  ``at_receive``  what the global copy does with the link's mean (``outer_step``: the stage);
  ``at_outer``    the server's merge state after the outer step;
  ``merged``      the island's fragment once it takes the new global one.
  A ``delayed`` policy applies round r's outer step at round r + 1's send instead, in ``late``
  (:mod:`fedjax_lm.engine.merges.delayed`). ``shared`` / ``adopt``: the part of the server's
  merge state a joining decoupled island takes from the syncer."""

  name = "mix"
  delayed = False

  def __init__(self, alpha: float = 0.0):
    self.alpha = float(alpha)

  # ------------------------------------------------------------------ state
  def state_specs(self, stacked: Any, zero_specs: Any, copy_outer_specs: tuple) -> tuple:
    """(islands' merge state specs, server's merge state specs)."""
    del stacked, zero_specs, copy_outer_specs
    return Absent(), Absent()

  def init(self, spec, params: Any, stacked: Any, outer: tuple) -> tuple:
    """(islands' merge state, server's merge state) at the start."""
    del spec, params, stacked, outer
    return Absent(), Absent()

  @property
  def has_current(self) -> bool:
    """Whether evaluation reads :meth:`current` instead of the global params."""
    return self.delayed

  # ------------------------------------------------------------------ hooks
  def origin(self, spec, p: int, server) -> tuple:
    """Fragment p of the copy the islands start from: the global one (a policy that keeps
    one per island, :mod:`noloco`, returns it stacked ``[M, ...]``)."""
    return spec.frags.take(server.params, p)

  def start(self, spec, p: int, islands, g: tuple) -> tuple:
    del spec, p, islands
    return tuple(x[None] for x in g)

  def at_send(self, spec, p: int, islands, server, delta: tuple, g: tuple):
    del spec, p, server, delta, g
    return islands

  def at_receive(self, spec, p: int, server, reduced, outer_step: Callable):
    return outer_step(spec, p, server, reduced)

  def at_outer(self, spec, p: int, server_merge: Any, reduced) -> Any:
    """The server's merge state after fragment p's outer step."""
    del spec, p, reduced
    return server_merge

  def merged(self, spec, p: int, islands, local: tuple, new_g: tuple) -> tuple:
    del spec, p, islands
    return tuple(self.alpha * l + (1.0 - self.alpha) * g[None] for l, g in zip(local, new_g))

  # ------------------------------------------------------------------ decoupled joins
  def shared(self, server_merge: Any) -> Any:
    """What a joiner adopts of the syncer's server merge state (leaves; () for none)."""
    del server_merge
    return ()

  def adopt(self, server_merge: Any, shared: Any) -> Any:
    """This island's server merge state with the syncer's ``shared`` part."""
    del shared
    return server_merge
