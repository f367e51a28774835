"""The engine's state as typed pytrees, and their partition specs.

Mesh-axis islands (``algorithm=islands``) hold two parts:

* :class:`Islands`, every leaf with a leading ``[M]`` island dim (sharded over ``island``):
  each island's params and inner optimizer state, its codec state (the error-feedback residual,
  or nothing), its merge state (streaming eager's buffers, the paper's eager per-island outer
  copies, or nothing) and its health.
* :class:`Server`, the global copy (replicated over ``island``, ZeRO-sharded over the island's
  data axes): global params, one outer optimizer state per fragment, the server's merge state
  (streaming eager's last mean, or the mean received and not yet applied of a one-step-delayed
  outer step, or nothing) and its failure count.

A part a configuration does not use is ``optax.EmptyState()``: absent by type, with no leaves,
so programs, shardings and checkpoints follow from the structure alone. DDP's state is
:class:`fedjax_lm.engine.ddp.DdpState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import PartitionSpec as P

from fedjax_lm import mesh as mesh_lib

Absent = optax.EmptyState  # a state part this configuration does not have


class Health(NamedTuple):
  """Per island and fragment (``[M, P]``): tainted by a skipped non-finite step since the
  fragment's last send, and what the fragment's next merge does (:mod:`fedjax_lm.health`)."""
  tainted: jax.Array  # bool
  merge_mode: jax.Array  # int32: health.MERGE | RESTART | KEEP


class ErrorFeedback(NamedTuple):
  """Codec state: what each island has not yet sent (``[M, ...]``, like params)."""
  residual: Any


class Islands(NamedTuple):
  params: Any
  opt_state: Any
  codec: ErrorFeedback | Absent
  merge: Any  # the merge policy's island state (fedjax_lm.engine.merges), or Absent
  health: Health


class Server(NamedTuple):
  params: Any
  outer: tuple  # one outer optimizer state per fragment
  merge: Any  # the merge policy's server state, or Absent
  failures_in_a_row: jax.Array  # int32: syncs in a row with nothing healthy applied


class State(NamedTuple):
  islands: Islands
  server: Server


def _stack(specs: Any) -> Any:
  return jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"), specs,
                      is_leaf=lambda x: isinstance(x, P))


def specs(*, param_specs: Any, zero_specs: Any, inner_opt_specs: Any, outer_specs: tuple,
          error_feedback: bool, merge: Any, copy_outer_specs: tuple = ()) -> State:
  """The partition specs of :class:`State`, shaped like it (``merge``: the merge policy, which
  lays out its own state; ``copy_outer_specs``: per fragment, the outer state's specs laid out
  like the params, for policies that keep an outer copy per island)."""
  stacked = _stack(param_specs)
  island_merge, server_merge = merge.state_specs(
      stacked, zero_specs, tuple(_stack(s) for s in copy_outer_specs))
  islands = Islands(
      params=stacked, opt_state=_stack(inner_opt_specs),
      codec=ErrorFeedback(stacked) if error_feedback else Absent(), merge=island_merge,
      health=Health(P("island"), P("island")))
  server = Server(params=zero_specs, outer=tuple(outer_specs), merge=server_merge,
                  failures_in_a_row=P())
  return State(islands, server)


def tree_bytes(tree: Any) -> int:
  """Bytes of every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  return sum(int(x.size) * jax.numpy.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
