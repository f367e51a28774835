"""Islands: M replicas that train independently for H inner steps, then sync over ``island``.

Two algorithms share one code path, one mesh and one batch layout ``[M, B, T]`` (island ``m``
always reads partition ``m`` of the data):

* ``ddp``: one set of params; every step averages gradients over all ``M x B`` rows, so when
  M > 1 the gradient crosses the island axis every step. With M = 1 it is plain training.
* ``islands``: params and inner optimizer state carry a leading ``[M]`` dim sharded over the
  ``island`` mesh axis; the inner step is the single-island step under
  ``jax.vmap(..., spmd_axis_name="island")`` and moves no byte across islands. Every H steps
  the outer step forms the pseudo-gradient ``delta = global - mean_m(inner_m)``, feeds it to an
  optax outer optimizer, and resets every island to the new global params. The inner optimizer
  state is kept per island across syncs (``outer.reset_inner_opt_state`` re-initialises it).

M need not equal the island axis size A: each island shard holds M/A islands (A = 1 simulates
all M islands on one device, with no collectives at all).

Global params and the outer optimizer state are replicated over ``island`` but ZeRO-sharded
over the in-island data axes, so their bytes per device shrink with the island's size.

Communication accounting (``island_bytes``): the payload each island sends across the island
axis: per sync, the pseudo-gradient (sum of size x itemsize of its leaves); for ``ddp``, the
gradient every step. A ring all-reduce moves about 2(A-1)/A of that per device; we report the
payload, the same convention for both, and tests check it against the compiled HLO.
Logging gathers M float32 losses per logged step across islands; that is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import steps

ALGORITHMS = ("ddp", "islands")


@dataclasses.dataclass
class Algorithm:
  """Jitted functions and layout of one training algorithm."""

  name: str
  num_islands: int
  sync_every: int  # 0: never (ddp)
  init: Callable[[jax.Array], Any]  # key -> state
  inner_step: Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
  outer_step: Callable[[Any], Any] | None  # state -> state
  eval_params: Callable[[Any], Any]  # state -> params to evaluate (global model)
  state_shardings: Any
  params_sharding: Any  # sharding of eval_params(state)
  bytes_per_inner_step: int
  bytes_per_sync: int

  def syncs_at(self, step: int, total_steps: int) -> bool:
    """Whether the outer sync runs after inner step ``step`` (0-based). The last step always
    syncs so the final global model has seen every inner step."""
    return bool(self.sync_every) and ((step + 1) % self.sync_every == 0 or step + 1 == total_steps)

  def island_bytes(self, steps_done: int, total_steps: int) -> int:
    syncs = 0
    if self.sync_every:
      syncs = steps_done // self.sync_every + (steps_done == total_steps
                                                and total_steps % self.sync_every != 0)
    return steps_done * self.bytes_per_inner_step + syncs * self.bytes_per_sync


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _opt_specs(tx, abstract_params, param_specs):
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_specs,
                               transform_non_params=lambda _: P(),
                               is_leaf=lambda x: isinstance(x, P))


def build(config, mesh: Mesh, model_cfg: model_lib.ModelConfig,
          outer_tx: optax.GradientTransformation | None = None) -> Algorithm:
  """The algorithm named by ``config.algorithm`` for the transformer LM on ``mesh``."""
  graphdef, abstract = model_lib.build(model_cfg)
  specs = mesh_lib.param_specs(model_lib.logical_axes(model_cfg), dict(config.rules))
  return build_for_loss(
      config, mesh, loss_fn=functools.partial(steps.mean_loss, graphdef),
      init_fn=functools.partial(model_lib.init_params, model_cfg), abstract_params=abstract,
      param_specs=specs, outer_tx=outer_tx)


def build_for_loss(config, mesh: Mesh, *, loss_fn: Callable, init_fn: Callable,
                   abstract_params: Any, param_specs: Any,
                   outer_tx: optax.GradientTransformation | None = None,
                   inner_tx: optax.GradientTransformation | None = None) -> Algorithm:
  """Any model: ``loss_fn(params, batch)`` is the mean loss of one island's ``[B, ...]`` batch,
  ``init_fn(key)`` makes params; batches are ``[M, B, ...]``."""
  num = int(config.islands.num)
  axis = mesh.shape["island"]
  if num < 1 or num % axis:
    raise ValueError(f"islands.num={num} must be a positive multiple of the mesh's island axis "
                     f"size {axis} (mesh {dict(mesh.shape)})")
  abstract, specs = abstract_params, param_specs
  mesh_lib.check_divisible(abstract, specs, dict(mesh.shape))
  tx = inner_tx or steps.inner_optimizer(config.inner, int(config.total_steps))
  train_step = steps.make_train_step(loss_fn, tx)
  named = lambda tree: mesh_lib.shardings(mesh, tree)
  island_loss_sharding = NamedSharding(mesh, P("island"))
  batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec())
  payload = tree_bytes(abstract) if num > 1 else 0

  zero_specs = jax.tree.map(lambda s, a: mesh_lib.zero_spec(s, a.shape, mesh), specs, abstract,
                            is_leaf=lambda x: isinstance(x, P))
  stacked_zero_shard = named(jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"),
                                          zero_specs, is_leaf=lambda x: isinstance(x, P)))

  def island_mean(stacked):
    """Mean over the island dim of an [M, ...] tree: the one cross-island reduction."""
    stacked = jax.lax.with_sharding_constraint(stacked, stacked_zero_shard)
    return jax.lax.with_sharding_constraint(
        jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked), named(zero_specs))

  if config.algorithm == "ddp":
    # ZeRO-1: the optimizer state is sharded over the island's data devices.
    state_specs = {"params": specs, "opt_state": _opt_specs(tx, abstract, zero_specs)}
    shard = named(state_specs)

    def init(key):
      params = init_fn(key)
      return {"params": params, "opt_state": tx.init(params)}

    def inner(state, batch):
      # Per-island mean gradients (no cross-island traffic), then one hierarchical mean over
      # islands: each device sends only its ZeRO shard, so one gradient copy per island crosses.
      per_island_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0),
                                 spmd_axis_name="island")
      losses, grads = per_island_grad(state["params"], batch)
      grads = island_mean(grads)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
              {"island_loss": losses})

    return Algorithm(
        name="ddp", num_islands=num, sync_every=0,
        init=jax.jit(init, out_shardings=shard),
        inner_step=jax.jit(inner, in_shardings=(shard, batch_sharding),
                           out_shardings=(shard, {"island_loss": island_loss_sharding}),
                           donate_argnums=0),
        outer_step=None, eval_params=lambda s: s["params"], state_shardings=shard,
        params_sharding=shard["params"], bytes_per_inner_step=payload, bytes_per_sync=0)

  if config.algorithm != "islands":
    raise ValueError(f"algorithm={config.algorithm!r}: expected one of {ALGORITHMS}")
  if outer_tx is None:
    from fedjax_lm import outer  # pylint: disable=g-import-not-at-top
    outer_tx = outer.from_config(config.outer)
  sync_every = int(config.outer.sync_every)
  if sync_every < 1:
    raise ValueError(f"outer.sync_every={sync_every} must be >= 1")
  reset_inner = bool(config.outer.reset_inner_opt_state)
  global_specs = zero_specs
  inner_specs = jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"), specs,
                             is_leaf=lambda x: isinstance(x, P))
  state_specs = {
      "global_params": global_specs,
      "outer_opt_state": _opt_specs(outer_tx, abstract, global_specs),
      "inner_params": inner_specs,
      "inner_opt_state": jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"),
                                      _opt_specs(tx, abstract, specs),
                                      is_leaf=lambda x: isinstance(x, P)),
  }
  shard = named(state_specs)
  inner_param_shard = shard["inner_params"]
  inner_opt_shard = shard["inner_opt_state"]

  def broadcast(params):
    stacked = jax.tree.map(lambda g: jnp.broadcast_to(g, (num,) + g.shape), params)
    return jax.lax.with_sharding_constraint(stacked, inner_param_shard)

  def fresh_inner_opt(inner_params):
    return jax.lax.with_sharding_constraint(jax.vmap(tx.init)(inner_params), inner_opt_shard)

  def init(key):
    params = init_fn(key)
    inner_params = broadcast(params)
    return {"global_params": params, "outer_opt_state": outer_tx.init(params),
            "inner_params": inner_params, "inner_opt_state": fresh_inner_opt(inner_params)}

  def inner(state, batch):
    params, opt_state, loss = jax.vmap(train_step, spmd_axis_name="island")(
        state["inner_params"], state["inner_opt_state"], batch)
    return ({**state, "inner_params": params, "inner_opt_state": opt_state},
            {"island_loss": loss})

  def outer_sync(state):
    mean = island_mean(state["inner_params"])
    delta = jax.tree.map(jnp.subtract, state["global_params"], mean)
    updates, outer_opt_state = outer_tx.update(delta, state["outer_opt_state"],
                                               state["global_params"])
    global_params = optax.apply_updates(state["global_params"], updates)
    inner_params = broadcast(global_params)
    inner_opt_state = fresh_inner_opt(inner_params) if reset_inner else state["inner_opt_state"]
    return {"global_params": global_params, "outer_opt_state": outer_opt_state,
            "inner_params": inner_params, "inner_opt_state": inner_opt_state}

  return Algorithm(
      name="islands", num_islands=num, sync_every=sync_every,
      init=jax.jit(init, out_shardings=shard),
      inner_step=jax.jit(inner, in_shardings=(shard, batch_sharding),
                         out_shardings=(shard, {"island_loss": island_loss_sharding}),
                         donate_argnums=0),
      outer_step=jax.jit(outer_sync, in_shardings=(shard,), out_shardings=shard,
                         donate_argnums=0),
      eval_params=lambda s: s["global_params"], state_shardings=shard,
      params_sharding=shard["global_params"], bytes_per_inner_step=0, bytes_per_sync=payload)
