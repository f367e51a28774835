"""DDP: one set of params; every step averages gradients over all ``M x B`` rows.

Batches are ``[M, B, ...]`` as for islands (island ``m`` reads partition ``m``), so DDP and
islands read the same tokens. Per-island mean gradients are taken island-locally, then one
hierarchical mean over ``island`` in which each device sends only its ZeRO shard: one gradient
copy per island crosses the island axis every step (``island_bytes`` counts it). The optimizer
state is ZeRO-1 sharded over the island's data devices. With M = 1 it is plain training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from fedjax_lm import cpu
from fedjax_lm import health
from fedjax_lm import mesh as mesh_lib
from fedjax_lm.engine import links
from fedjax_lm.engine import programs as programs_lib
from fedjax_lm.engine.state import tree_bytes


class DdpState(NamedTuple):
  params: Any
  opt_state: Any
  failures_in_a_row: jax.Array  # int32: non-finite steps in a row


def step(loss_fn: Callable, tx: optax.GradientTransformation, groups: int, guard: bool,
         mean: Callable, state: DdpState, batch: dict) -> tuple[DdpState, dict]:
  """One DDP step: island-local gradients, their mean over islands (the only cross-island
  traffic), one optimizer step; a step whose mean gradient (the same on every device) or new
  params are not finite is skipped."""
  per_island_grad = mesh_lib.vmap_islands(jax.value_and_grad(loss_fn), groups, (None, 0))
  losses, grads = per_island_grad(state.params, batch)
  island_ok = jax.vmap(health.all_finite)((losses, grads))  # island-local checks
  grads = mean(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ok = health.all_finite((grads, params)) if guard else jnp.bool_(True)
  params, opt_state = health.keep_if(ok, (params, opt_state), (state.params, state.opt_state))
  failures = jnp.where(ok, 0, state.failures_in_a_row + 1)
  return DdpState(params, opt_state, failures), {"island_loss": losses, "island_ok": island_ok & ok}


@dataclasses.dataclass(eq=False)
class DdpEngine:
  """The same four calls as :class:`fedjax_lm.engine.islands.IslandsEngine`; ``sync`` is a
  no-op (the gradient crossed islands in the step)."""

  num_islands: int
  inner_step: Callable  # jitted (state, batch) -> (state, metrics)
  init: Callable  # key -> state
  state_shardings: DdpState
  bytes_per_inner_step: int
  name: str = "ddp"
  sync_every: int = 0
  bytes_per_sync: int = 0

  def sync(self, state: DdpState, done: int) -> DdpState:
    del done
    return state

  def settle(self, state: DdpState) -> DdpState:
    return state

  @staticmethod
  def eval_params(state: DdpState) -> Any:
    return state.params

  @staticmethod
  def failures_in_a_row(state: DdpState) -> jax.Array:
    return state.failures_in_a_row

  @property
  def params_sharding(self) -> Any:
    return self.state_shardings.params

  @property
  def registry(self) -> dict:
    return {"inner": self.inner_step}

  def lower(self, state: DdpState, batch: Any) -> dict:
    return {"inner": self.inner_step.lower(state, batch)}

  def island_bytes(self, done: int) -> int:
    return done * self.bytes_per_inner_step

  def island_control_bytes(self, done: int) -> int:
    del done
    return 0

  def island_peak_bytes(self, done: int) -> int:
    return self.bytes_per_inner_step if done else 0

  def clock_state(self, done: int) -> dict:
    return {"step": done}


def build(*, mesh: Mesh, num: int, loss_fn: Callable, make_params: Callable, abstract: Any,
          param_specs: Any, zero_specs: Any, tx: optax.GradientTransformation, groups: int,
          guard: bool) -> DdpEngine:
  named = lambda specs: mesh_lib.shardings(mesh, specs)
  specs = DdpState(param_specs, mesh_lib.opt_state_specs(tx, abstract, zero_specs),
                   jax.sharding.PartitionSpec())
  shardings = named(specs)
  stacked_zero = jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"), zero_specs,
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  mean = lambda grads: links.XlaLink.mean(grads, named(stacked_zero), named(zero_specs))
  inner = cpu.jit_step(functools.partial(step, loss_fn, tx, groups, guard, mean), mesh,
                       in_shardings=(shardings, NamedSharding(mesh, mesh_lib.batch_spec())),
                       out_shardings=(shardings, programs_lib.metric_shardings(mesh)),
                       donate_argnums=0)
  init = jax.jit(lambda params: DdpState(params, tx.init(params), jnp.int32(0)),
                 out_shardings=shardings)
  return DdpEngine(num_islands=num, inner_step=inner, init=lambda key: init(make_params(key)),
                   state_shardings=shardings,
                   bytes_per_inner_step=tree_bytes(abstract) if num > 1 else 0)
