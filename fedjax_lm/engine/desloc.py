"""DES-LOC (Iacob et al. 2025, arXiv 2505.22549): every part of the optimizer state syncs on its
own period.

The paper's box, per island m and step t = 0..T-1 (E_m: the mean over the M islands):

    u <- E_m[u] if t % K_u == 0     (first moment)
    v <- E_m[v] if t % K_v == 0     (second moment)
    x <- E_m[x] if t % K_x == 0     (params)
    g = clip(grad f(x; batch_t,m));  u = b1 u + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    x = x - lr u / (sqrt(v) + eps)

On this engine K_x is ``outer.sync_every``: the params sync as before, through the outer
optimizer (FedAvg's is the box's mean; DiLoCo's Nesterov step is the paper's outer-optimizer
variant). The moments are the inner optimizer's: Adam's ``mu`` / ``nu`` (optax
``ScaleByAdamState``, adamw included) and, for the first moment, SGD momentum's ``trace``, each
with the islands' leading ``[M]`` dim. "Before step t" is the clock's "after t steps are done":
``MOMENT k`` events (:mod:`fedjax_lm.engine.clock`) fall after step ``done`` when
``done % K == 0`` and ``done < T`` (no step reads a moment after the last one).

    outer.desloc_mu_every   K_u (0: never; the paper recommends 3 K_x)
    outer.desloc_nu_every   K_v (0: never; the paper recommends 6 K_x)

Both 0 (the default) is DiLoCo (the islands keep their moments) and builds nothing here.
K_x = K_u = K_v = K with FedAvg is Local Adam. No periods make Adam DDP (the islands' Adam steps
are averaged, not their gradients); with SGD momentum and K_x = 1 the params are DDP's whatever
K_u (linear: the islands' mean momentum is DDP's), and K_u = 1 makes each island's momentum
DDP's too (tests/test_desloc.py).

The average is one program per moment (``moments/k``): each leaf resharded to its ZeRO layout
inside the island, meaned over the island dim (one float32 all-reduce over ``island`` of each
device's shard, as the uncompressed outer exchange), and broadcast back. An island sends one
float32 copy of the moment per average (``DesLoc.bytes``); the engine adds that to
``island_bytes`` and the tests check it against the HLO. Every island takes part (the config
refuses drop-out with DES-LOC).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import mesh as mesh_lib
from fedjax_lm.engine.state import Islands, tree_bytes

MOMENTS = ("mu", "nu")  # MOMENT event k averages MOMENTS[k]
KEYS = ("outer.desloc_mu_every", "outer.desloc_nu_every")


def periods(config) -> tuple[int, ...]:
  """(K_u, K_v) from ``config.outer``; 0 = never."""
  oc = config.outer
  return tuple(int(oc.get(key.split(".")[1], 0) or 0) for key in KEYS)


def due(every: tuple[int, ...], done: int, total: int) -> list[int]:
  """The moments averaged after step ``done`` of ``total``."""
  return [k for k, e in enumerate(every) if e and done % e == 0 and done < total]


def count(every: tuple[int, ...], done: int, total: int) -> tuple[int, ...]:
  """Per moment, the averages after ``done`` steps."""
  last = min(done, total - 1)
  return tuple(last // e if e else 0 for e in every)


def _field(node: Any, k: int) -> str | None:
  """The name of moment k in an optimizer-state node, or None."""
  if isinstance(node, optax.ScaleByAdamState):
    return MOMENTS[k]
  if isinstance(node, optax.TraceState) and k == 0:
    return "trace"
  return None


def _holds_moments(x: Any) -> bool:
  return isinstance(x, (optax.ScaleByAdamState, optax.TraceState))


def moment_trees(opt_state: Any, k: int) -> list[Any]:
  """Every moment-k tree in ``opt_state`` (e.g. adamw's one ``mu``)."""
  nodes = jax.tree.leaves(opt_state, is_leaf=_holds_moments)
  return [getattr(n, _field(n, k)) for n in nodes if _holds_moments(n) and _field(n, k)]


# ------------------------------------------------------------------------ the stage
def average(spec: Any, k: int, islands: Islands) -> Islands:
  """Moment k of every island replaced by its mean over the islands (``spec``: the stages'
  :class:`fedjax_lm.engine.stages.Spec`)."""

  def node(state, shardings):
    name = _field(state, k) if _holds_moments(state) else None
    if name is None:
      return state
    mean = jax.tree.map(functools.partial(_mean, spec.mesh), getattr(state, name),
                        getattr(shardings, name))
    return state._replace(**{name: mean})

  opt_state = jax.tree.map(node, islands.opt_state, spec.shardings.islands.opt_state,
                           is_leaf=_holds_moments)
  return islands._replace(opt_state=opt_state)


def _mean(mesh, x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """``[M, ...]`` -> every island holds the mean: one all-reduce over ``island`` of each
  device's ZeRO shard (as :meth:`fedjax_lm.engine.links.XlaLink.mean`), then back to the
  leaf's own layout (an in-island all-gather)."""
  zero = mesh_lib.zero_spec(P(*sharding.spec[1:]), x.shape[1:], mesh)
  x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("island", *zero)))
  mean = jax.lax.with_sharding_constraint(jnp.mean(x, axis=0), NamedSharding(mesh, zero))
  return jax.lax.with_sharding_constraint(jnp.broadcast_to(mean[None], x.shape), sharding)


# ------------------------------------------------------------------------ the method
@dataclasses.dataclass(frozen=True, eq=False)
class DesLoc:
  """The programs and byte sizes of the moments a config averages."""

  every: tuple[int, ...]  # per moment: its period (0: never)
  average: dict[int, Callable]  # moment k -> islands -> islands (jitted, donates islands)
  bytes: tuple[int, ...]  # per moment: what one island sends per average

  def registry(self) -> dict[str, Callable]:
    return {f"moments/{k}": fn for k, fn in self.average.items()}

  def lower(self, islands: Any) -> dict:
    return {f"moments/{k}": fn.lower(islands) for k, fn in self.average.items()}


def build(config, spec: Any, abstract_params: Any) -> DesLoc | None:
  """DES-LOC for ``config`` on the engine's ``spec`` (None when both periods are 0)."""
  every = periods(config)
  if not any(every):
    return None
  abstract_opt = jax.eval_shape(spec.inner_tx.init, abstract_params)
  sizes = []
  for k, e in enumerate(every):
    trees = moment_trees(abstract_opt, k)
    if e and not trees:
      raise ValueError(f"{KEYS[k]}={e}: the inner optimizer has no {MOMENTS[k]} to average "
                       "(DES-LOC averages Adam's mu / nu, or SGD momentum's trace as mu)")
    sizes.append(sum(tree_bytes(t) for t in trees) if spec.num > 1 else 0)
  sh = spec.shardings.islands
  programs = {k: jax.jit(functools.partial(average, spec, k), in_shardings=(sh,),
                         out_shardings=sh, donate_argnums=0)
              for k, e in enumerate(every) if e}
  return DesLoc(every, programs, tuple(sizes))
