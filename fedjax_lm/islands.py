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
import math
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import codecs
from fedjax_lm import fragments
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import steps
from fedjax_lm import sync

ALGORITHMS = ("ddp", "islands")


@dataclasses.dataclass
class Algorithm:
  """Jitted programs and layout of one training algorithm.

  The loop is ``state, metrics = alg.inner_step(state, batch); state = alg.sync(state, done)``.
  ``programs`` names every jitted function (``inner``, and per fragment ``encode/p``,
  ``exchange/p``, ``merge/p``) for HLO checks.
  """

  name: str
  num_islands: int
  init: Callable[[jax.Array], Any]  # key -> state
  inner_step: Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
  eval_params: Callable[[Any], Any]  # state -> params to evaluate (global model)
  state_shardings: Any
  params_sharding: Any  # sharding of eval_params(state)
  programs: dict[str, Callable]
  bytes_per_inner_step: int = 0
  fragment_bytes: tuple[int, ...] = ()  # payload per island of one sync of each fragment
  schedule: fragments.Schedule | None = None
  sync_fn: Callable[[Any, int], Any] | None = None
  lower_sync: Callable[[Any, int], dict] | None = None  # (state, p) -> lowered stages

  @property
  def sync_every(self) -> int:
    return self.schedule.every if self.schedule else 0

  @property
  def bytes_per_sync(self) -> int:
    """Payload per island of one sync of every fragment (one DiLoCo sync when P = 1)."""
    return sum(self.fragment_bytes)

  def sync(self, state: Any, done: int) -> Any:
    """Runs the sends and merges due after ``done`` inner steps (a no-op for ddp)."""
    return state if self.sync_fn is None else self.sync_fn(state, done)

  def island_bytes(self, done: int) -> int:
    """Cumulative payload one island has sent after ``done`` inner steps."""
    sent = done * self.bytes_per_inner_step
    if self.schedule:
      sent += sum(self.schedule.send_count(p, done) * b for p, b in enumerate(self.fragment_bytes))
    return sent

  def island_peak_bytes(self, done: int) -> int:
    """The largest single sync (one fragment's exchange, or one DDP step) so far."""
    if not self.schedule:
      return self.bytes_per_inner_step if done else 0
    return max([b for p, b in enumerate(self.fragment_bytes)
                if self.schedule.send_count(p, done)], default=0)


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _opt_specs(tx, abstract_params, param_specs):
  """Specs of ``tx``'s state: a leaf whose key path ends with a parameter's path and has its
  shape takes that parameter's spec (moments, momenta); anything else (counts) is replicated.
  (``optax.tree_map_params`` does this too, but not for partitioned optimizers like Muon.)"""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  by_path = {tuple(path): (leaf.shape, spec) for (path, leaf), spec in zip(params, flat_specs)}

  def spec_of(path, leaf):
    for n in range(len(path)):
      shape, spec = by_path.get(tuple(path[n:]), (None, None))
      if spec is not None and shape == leaf.shape:
        return spec
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, abstract_state)


def build(config, mesh: Mesh, model_cfg: model_lib.ModelConfig,
          outer_tx: optax.GradientTransformation | None = None) -> Algorithm:
  """The algorithm named by ``config.algorithm`` for the transformer LM on ``mesh``."""
  graphdef, abstract = model_lib.build(model_cfg)
  axes = model_lib.logical_axes(model_cfg)
  specs = mesh_lib.param_specs(axes, dict(config.rules))
  inner_tx = steps.inner_optimizer(config.inner, int(config.total_steps),
                                   muon_dims=steps.muon_dimensions(axes))
  return build_for_loss(
      config, mesh, loss_fn=functools.partial(steps.mean_loss, graphdef),
      init_fn=functools.partial(model_lib.init_params, model_cfg), abstract_params=abstract,
      param_specs=specs, outer_tx=outer_tx, inner_tx=inner_tx)


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

  island_mean = functools.partial(sync.island_mean, stacked_sharding=stacked_zero_shard,
                                  mean_sharding=named(zero_specs))

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

    inner_step = jax.jit(inner, in_shardings=(shard, batch_sharding),
                         out_shardings=(shard, {"island_loss": island_loss_sharding}),
                         donate_argnums=0)
    return Algorithm(
        name="ddp", num_islands=num, init=jax.jit(init, out_shardings=shard),
        inner_step=inner_step, eval_params=lambda s: s["params"], state_shardings=shard,
        params_sharding=shard["params"], programs={"inner": inner_step},
        bytes_per_inner_step=payload)

  if config.algorithm != "islands":
    raise ValueError(f"algorithm={config.algorithm!r}: expected one of {ALGORITHMS}")
  if outer_tx is None:
    from fedjax_lm import outer  # pylint: disable=g-import-not-at-top
    outer_tx = outer.from_config(config.outer)
  oc = config.outer
  schedule = fragments.Schedule(int(oc.sync_every), int(oc.fragments), int(oc.overlap),
                                int(config.total_steps))
  frags = fragments.Fragments(abstract, schedule.fragments)
  codec = codecs.from_config(oc)
  alpha, beta, eager = float(oc.mixing), float(oc.error_feedback), bool(oc.eager)
  reset_inner = bool(oc.reset_inner_opt_state)
  check_streaming_options(oc, codec)
  stack = lambda tree: jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"), tree,
                                    is_leaf=lambda x: isinstance(x, P))
  frag_specs = []  # per fragment: ZeRO specs of its (unstacked) leaves
  for p in range(frags.num):
    f_abs = frags.abstract(abstract, p)
    f_specs = tuple(mesh_lib.zero_spec(s, a.shape, mesh)
                    for s, a in zip(frags.specs(specs, p), f_abs))
    mesh_lib.check_divisible(f_abs, f_specs, dict(mesh.shape))
    frag_specs.append(f_specs)
  state_specs = {
      "global_params": zero_specs,
      "outer_opt_state": tuple(_opt_specs(outer_tx, frags.abstract(abstract, p), frag_specs[p])
                               for p in range(frags.num)),
      "inner_params": stack(specs),
      "inner_opt_state": stack(_opt_specs(tx, abstract, specs)),
  }
  if beta > 0:  # error-feedback residual per island
    state_specs["residual"] = stack(specs)
  if eager:  # last average, own last pseudo-gradient and eager estimate
    state_specs.update(avg_prev=zero_specs, own_prev=stack(specs), eager_base=stack(specs))
  shard = named(state_specs)

  # The flat payload of fragment p: [M, n_p] padded so each in-island device sends a slice.
  in_island = int(np.prod([mesh.shape[a] for a in mesh_lib.IN_ISLAND_AXES]))
  sizes = [sum(math.prod(x.shape) for x in frags.abstract(abstract, p)) for p in range(frags.num)]
  padded = [codecs.padded_size(n, codec, in_island) if codec else n for n in sizes]
  flat_shard = NamedSharding(mesh, P("island", mesh_lib.IN_ISLAND_AXES))
  key = jax.random.key(int(config.seed) + 1)

  def payload_shardings(n):
    shapes = jax.eval_shape(codec.encode, jax.ShapeDtypeStruct((n,), jnp.float32), key)
    return jax.tree.map(lambda s: NamedSharding(mesh, P("island", mesh_lib.IN_ISLAND_AXES)),
                        shapes)

  def stacked_frag_shard(p):
    return named(tuple(mesh_lib.with_leading(s, "island") for s in frag_specs[p]))

  def broadcast(params):
    stacked = jax.tree.map(lambda g: jnp.broadcast_to(g, (num,) + g.shape), params)
    return jax.lax.with_sharding_constraint(stacked, shard["inner_params"])

  def fresh_inner_opt(inner_params):
    return jax.lax.with_sharding_constraint(jax.vmap(tx.init)(inner_params),
                                            shard["inner_opt_state"])

  def init(key):
    params = init_fn(key)
    inner_params = broadcast(params)
    zeros = lambda: jax.tree.map(jnp.zeros_like, inner_params)
    state = {"global_params": params,
             "outer_opt_state": tuple(outer_tx.init(frags.take(params, p))
                                      for p in range(frags.num)),
             "inner_params": inner_params, "inner_opt_state": fresh_inner_opt(inner_params)}
    if beta > 0:
      state["residual"] = zeros()
    if eager:
      state.update(avg_prev=jax.tree.map(jnp.zeros_like, params), own_prev=zeros(),
                   eager_base=zeros())
    return state

  def inner(sub, batch):
    params, opt_state, loss = jax.vmap(train_step, spmd_axis_name="island")(
        sub["inner_params"], sub["inner_opt_state"], batch)
    return {"inner_params": params, "inner_opt_state": opt_state}, {"island_loss": loss}

  def encode(p, rw, ro, done):
    """Island-local: pseudo-gradient of fragment p, error feedback, codec (and eager step)."""
    src = {**ro, **rw}
    g = frags.take(src["global_params"], p)
    delta = sync.pseudo_gradients(g, frags.take(src["inner_params"], p, lead=1))
    out = {}
    if eager:
      d_hat = sync.eager_delta(delta, frags.take(rw["own_prev"], p, lead=1),
                               frags.take(ro["avg_prev"], p), num)
      base = jax.vmap(lambda d: sync.outer_update(outer_tx, d, ro["outer_opt_state"], g)[0])(
          d_hat)
      out["own_prev"] = frags.put(rw["own_prev"], p, delta, lead=1)
      out["eager_base"] = frags.put(rw["eager_base"], p, base, lead=1)
      out["inner_params"] = frags.put(rw["inner_params"], p, base, lead=1)
    if codec is None:
      return out, delta
    flat = sync.flatten(delta, padded[p])
    keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, done), p), num)
    residual = sync.flatten(frags.take(rw["residual"], p, lead=1), padded[p]) if beta else None
    payload, residual = sync.encode(codec, flat, residual, beta, keys, mesh)
    if beta:
      out["residual"] = frags.put(rw["residual"], p, tuple(
          jax.vmap(lambda r: sync.unflatten(r, g))(residual)), lead=1)
    return out, payload

  def exchange(p, rw, payload):
    """The one cross-island exchange of fragment p, then the outer step on the global copy."""
    g = frags.take(rw["global_params"], p)
    if codec is None:
      mean = sync.island_mean(payload, stacked_frag_shard(p), named(frag_specs[p]))
    else:
      mean = sync.unflatten(sync.exchange(codec, payload, mesh)[:sizes[p]], g)
    new_g, opt_state = sync.outer_update(outer_tx, mean, rw["outer_opt_state"], g)
    out = {"global_params": frags.put(rw["global_params"], p, new_g),
           "outer_opt_state": opt_state}
    if eager:
      out["avg_prev"] = frags.put(rw["avg_prev"], p, mean)
    return out

  def merge(p, rw, ro):
    """Islands take the new global fragment p (alpha-mixed, or correcting the eager step)."""
    local = frags.take(rw["inner_params"], p, lead=1)
    base = frags.take(ro["eager_base"], p, lead=1) if eager else None
    merged = sync.merge(local, frags.take(ro["global_params"], p), alpha, base)
    out = {"inner_params": frags.put(rw["inner_params"], p, merged, lead=1)}
    if reset_inner:
      out["inner_opt_state"] = fresh_inner_opt(out["inner_params"])
    return out

  sub = lambda keys: {k: shard[k] for k in keys}
  enc_rw = ((["residual"] if beta else []) +
            (["own_prev", "eager_base", "inner_params"] if eager else []))
  enc_ro = (["global_params"] + ([] if eager else ["inner_params"]) +
            (["avg_prev"] if eager else []))
  exch_rw = ["global_params"] + (["avg_prev"] if eager else [])
  merge_rw = ["inner_params"] + (["inner_opt_state"] if reset_inner else [])
  merge_ro = ["global_params"] + (["eager_base"] if eager else [])
  programs = {"inner": jax.jit(
      inner, in_shardings=(sub(["inner_params", "inner_opt_state"]), batch_sharding),
      out_shardings=(sub(["inner_params", "inner_opt_state"]),
                     {"island_loss": island_loss_sharding}), donate_argnums=0)}
  for p in range(frags.num):
    opt_shard = shard["outer_opt_state"][p]
    stacked_payload = (stacked_frag_shard(p) if codec is None
                       else payload_shardings(padded[p]))
    enc_ro_shard = {**sub(enc_ro), **({"outer_opt_state": opt_shard} if eager else {})}
    programs[f"encode/{p}"] = jax.jit(
        functools.partial(encode, p), in_shardings=(sub(enc_rw), enc_ro_shard, None),
        out_shardings=(sub(enc_rw), stacked_payload), donate_argnums=0)
    exch_shard = {**sub(exch_rw), "outer_opt_state": opt_shard}
    programs[f"exchange/{p}"] = jax.jit(
        functools.partial(exchange, p), in_shardings=(exch_shard, stacked_payload),
        out_shardings=exch_shard, donate_argnums=0)
    programs[f"merge/{p}"] = jax.jit(
        functools.partial(merge, p), in_shardings=(sub(merge_rw), sub(merge_ro)),
        out_shardings=sub(merge_rw), donate_argnums=0)

  pick = lambda state, keys: {k: state[k] for k in keys}

  def inner_step(state, batch):
    new, metrics = programs["inner"](pick(state, ["inner_params", "inner_opt_state"]), batch)
    return {**state, **new}, metrics

  def with_outer(state, p, new):
    """``new`` may hold fragment p's outer state; put it back into the per-fragment tuple."""
    new = dict(new)
    if "outer_opt_state" in new:
      states = list(state["outer_opt_state"])
      states[p] = new.pop("outer_opt_state")
      new["outer_opt_state"] = tuple(states)
    return {**state, **new}

  def encode_args(state, p, done):
    ro = pick(state, enc_ro)
    if eager:
      ro["outer_opt_state"] = state["outer_opt_state"][p]
    return pick(state, enc_rw), ro, done

  def exchange_args(state, p, payload):
    return {**pick(state, exch_rw), "outer_opt_state": state["outer_opt_state"][p]}, payload

  def run_sync(state, done):
    """Send every fragment due at ``done`` (encode, then the exchange, dispatched
    asynchronously: nothing the next inner steps compute feeds it), then merge those whose
    overlap window ends now."""
    for p in schedule.sends(done):
      new, payload = programs[f"encode/{p}"](*encode_args(state, p, np.int32(done)))
      state = {**state, **new}
      state = with_outer(state, p, programs[f"exchange/{p}"](*exchange_args(state, p, payload)))
    for p in schedule.merges(done):
      state = {**state, **programs[f"merge/{p}"](pick(state, merge_rw), pick(state, merge_ro))}
    return state

  def lower_sync(state, p):
    """Lowered ``encode/p`` and ``exchange/p`` on (abstract) ``state``, for HLO checks."""
    args = encode_args(state, p, jax.ShapeDtypeStruct((), jnp.int32))
    _, payload = jax.eval_shape(programs[f"encode/{p}"], *args)
    return {"encode": programs[f"encode/{p}"].lower(*args),
            "exchange": programs[f"exchange/{p}"].lower(*exchange_args(state, p, payload))}

  payload_size = lambda p: (tree_bytes(frags.abstract(abstract, p)) if codec is None
                            else codecs.payload_bytes(codec, padded[p]))
  return Algorithm(
      name="islands", num_islands=num, init=jax.jit(init, out_shardings=shard),
      inner_step=inner_step, eval_params=lambda s: s["global_params"], state_shardings=shard,
      params_sharding=shard["global_params"], programs=programs,
      fragment_bytes=tuple(payload_size(p) if num > 1 else 0 for p in range(frags.num)),
      schedule=schedule, sync_fn=run_sync, lower_sync=lower_sync)


def check_streaming_options(oc, codec) -> None:
  """One clear error for a bad combination of streaming / compression options."""
  if not 0.0 <= float(oc.mixing) <= 1.0:
    raise ValueError(f"outer.mixing={oc.mixing} must be in [0, 1]")
  if not 0.0 <= float(oc.error_feedback) <= 1.0:
    raise ValueError(f"outer.error_feedback={oc.error_feedback} must be in [0, 1] (0 = off)")
  if float(oc.error_feedback) > 0 and codec is None:
    raise ValueError("outer.error_feedback > 0 needs a lossy outer.compression (not 'none')")
  if oc.eager and int(oc.overlap) < 1:
    raise ValueError("outer.eager needs outer.overlap >= 1 (it fills the overlap window)")
  if oc.reset_inner_opt_state and int(oc.fragments) > 1:
    raise ValueError("outer.reset_inner_opt_state is only defined for outer.fragments=1")
