"""Islands: M replicas that train independently for H inner steps, then sync over ``island``.

Two algorithms share one code path, one mesh and one batch layout ``[M, B, T]`` (island ``m``
always reads partition ``m`` of the data):

* ``ddp``: one set of params; every step averages gradients over all ``M x B`` rows, so when
  M > 1 the gradient crosses the island axis every step. With M = 1 it is plain training.
* ``islands``: params and inner optimizer state carry a leading ``[M]`` dim sharded over the
  ``island`` mesh axis; the inner step is the single-island step under
  ``jax.vmap(..., spmd_axis_name="island")`` (:func:`mesh.vmap_islands`: per-core groups on the
  simulated path) and moves no byte across islands. The outer sync runs per fragment
  (:mod:`fedjax_lm.fragments`; P = 1 is the whole model, DiLoCo), through the stages of
  :mod:`fedjax_lm.sync`, each its own jitted program:

    ``encode/p``   island-local: delta_m = global_p - inner_m,p; error feedback; codec
    ``exchange/p`` the one cross-island exchange of the encoded payload; decode, mean, the
                   fragment's own outer optax step on the global copy
    ``merge/p``    tau steps later: islands take the new global fragment (alpha-mixed)

  The inner optimizer state is kept per island across syncs (``outer.reset_inner_opt_state``
  re-initialises it, P = 1 only). Each island sends a weight beside its payload (who sent;
  :mod:`fedjax_lm.health`): islands that skipped a non-finite step, or miss the sync
  (drop-out), are left out of the mean.

M need not equal the island axis size A: each island shard holds M/A islands (A = 1 simulates
all M islands on one device, with no collectives at all).

Global params and the outer optimizer state are replicated over ``island`` but ZeRO-sharded
over the in-island data axes, so their bytes per device shrink with the island's size.

Communication accounting (``island_bytes``): the payload each island sends across the island axis:
per fragment sync, the encoded pseudo-gradient (values + scales + indices; float32 when
uncompressed); for ``ddp``, the gradient every step. A ring all-reduce moves about 2(A-1)/A of that
per device; we report the payload, the same convention for all, and tests check it against the
compiled HLO. Logging's M float32 losses per logged step are not counted.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import codecs
from fedjax_lm import config_lib
from fedjax_lm import fragments
from fedjax_lm import health
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import steps
from fedjax_lm import sync
from fedjax_lm import transport
from fedjax_lm.algorithm import Algorithm, tree_bytes

ALGORITHMS = ("ddp", "islands")
TRANSPORTS = ("xla", "host")


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
  groups = mesh_lib.island_groups(num, mesh, int(config.islands.get("simulated_groups", 0)))
  guard = bool(config.islands.nonfinite_guard)
  train_step = steps.make_train_step(loss_fn, tx, guard=guard)
  named = lambda tree: mesh_lib.shardings(mesh, tree)
  # init: the params in their own program (shared by every algorithm of a model), then the state
  make_params = jax.jit(init_fn, out_shardings=named(specs))
  init_from = lambda build_state: lambda key: build_state(make_params(key))
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
    state_specs = {"params": specs, "opt_state": mesh_lib.opt_state_specs(tx, abstract, zero_specs),
                   "failures_in_a_row": P()}
    shard = named(state_specs)

    def init(params):
      return {"params": params, "opt_state": tx.init(params), "failures_in_a_row": jnp.int32(0)}

    def inner(state, batch):
      # Per-island mean gradients (no cross-island traffic), then one hierarchical mean over
      # islands: each device sends only its ZeRO shard, so one gradient copy per island crosses.
      per_island_grad = mesh_lib.vmap_islands(jax.value_and_grad(loss_fn), groups, (None, 0))
      losses, grads = per_island_grad(state["params"], batch)
      island_ok = jax.vmap(health.all_finite)((losses, grads))  # island-local checks
      grads = island_mean(grads)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
      # The mean gradient is the same everywhere, so every device skips the same steps.
      ok = health.all_finite((grads, new["params"])) if guard else jnp.bool_(True)
      new = health.keep_if(ok, new, {k: state[k] for k in new})
      new["failures_in_a_row"] = jnp.where(ok, 0, state["failures_in_a_row"] + 1)
      return new, {"island_loss": losses, "island_ok": island_ok & ok}

    metric_shardings = {"island_loss": island_loss_sharding, "island_ok": island_loss_sharding}
    inner_step = jax.jit(inner, in_shardings=(shard, batch_sharding),
                         out_shardings=(shard, metric_shardings), donate_argnums=0)
    return Algorithm(
        name="ddp", num_islands=num, init=init_from(jax.jit(init, out_shardings=shard)),
        inner_step=inner_step, eval_params=lambda s: s["params"], state_shardings=shard,
        params_sharding=shard["params"], programs={"inner": inner_step},
        inner_keys=tuple(state_specs), bytes_per_inner_step=payload)

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
  config_lib.check_streaming_options(oc, codec)
  who = health.Participation(num, float(config.islands.dropout), config.islands.absent,
                             int(config.seed))
  keep_absent = config.islands.absent_policy == "keep"
  alpha, beta, eager = float(oc.mixing), float(oc.error_feedback), bool(oc.eager)
  reset_inner, host = bool(oc.reset_inner_opt_state), oc.transport == "host"
  stack = lambda tree: jax.tree.map(lambda s: mesh_lib.with_leading(s, "island"), tree,
                                    is_leaf=lambda x: isinstance(x, P))
  frag_abstract = [frags.abstract(abstract, p) for p in range(frags.num)]
  frag_specs = []  # per fragment: ZeRO specs of its (unstacked) leaves
  for f_abs, f_base in zip(frag_abstract, (frags.specs(specs, p) for p in range(frags.num))):
    f_specs = tuple(mesh_lib.zero_spec(s, a.shape, mesh) for s, a in zip(f_base, f_abs))
    mesh_lib.check_divisible(f_abs, f_specs, dict(mesh.shape))
    frag_specs.append(f_specs)
  state_specs = {
      "global_params": zero_specs,
      "outer_opt_state": tuple(mesh_lib.opt_state_specs(outer_tx, a, s)
                               for a, s in zip(frag_abstract, frag_specs)),
      "inner_params": stack(specs),
      "inner_opt_state": stack(mesh_lib.opt_state_specs(tx, abstract, specs)),
      # Health: tainted by a skipped step since fragment p's last send; what p's merge does.
      "tainted": P("island"), "merge_mode": P("island"), "failures_in_a_row": P(),
  }
  if beta > 0:  # error-feedback residual per island
    state_specs["residual"] = stack(specs)
  if eager:  # last average, own last pseudo-gradient and eager estimate
    state_specs.update(avg_prev=zero_specs, own_prev=stack(specs), eager_base=stack(specs))
  shard = named(state_specs)

  # Fragment p's payload: [M, n_p] flat, padded so each in-island device sends whole blocks.
  in_island = math.prod(mesh.shape[a] for a in mesh_lib.IN_ISLAND_AXES)
  sizes = [sum(math.prod(x.shape) for x in f) for f in frag_abstract]
  padded = [codecs.padded_size(n, codec, in_island) if codec else n for n in sizes]
  key = jax.random.key(int(config.seed) + 1)

  def payload_shardings(p, lead):
    """Fragment p's encoded payload, its island dim over ``lead`` (None: gathered)."""
    if codec is None:
      return named(tuple(mesh_lib.with_leading(s, lead) for s in frag_specs[p]))
    shapes = jax.eval_shape(codec.encode, jax.ShapeDtypeStruct((padded[p],), jnp.float32), key)
    return jax.tree.map(lambda _: NamedSharding(mesh, P(lead, mesh_lib.IN_ISLAND_AXES)), shapes)

  def sent_shardings(p, lead):
    """What an island sends for fragment p: (payload, weight ``[M, D]``)."""
    return payload_shardings(p, lead), NamedSharding(mesh, P(lead, mesh_lib.IN_ISLAND_AXES))

  def broadcast(params):
    stacked = jax.tree.map(lambda g: jnp.broadcast_to(g, (num,) + g.shape), params)
    return jax.lax.with_sharding_constraint(stacked, shard["inner_params"])

  def fresh_inner_opt(inner_params):
    return jax.lax.with_sharding_constraint(jax.vmap(tx.init)(inner_params),
                                            shard["inner_opt_state"])

  def init(params):
    inner_params = broadcast(params)
    zeros = lambda: jax.tree.map(jnp.zeros_like, inner_params)
    state = {"global_params": params,
             "outer_opt_state": tuple(outer_tx.init(frags.take(params, p))
                                      for p in range(frags.num)),
             "inner_params": inner_params, "inner_opt_state": fresh_inner_opt(inner_params),
             "tainted": jnp.zeros((num, frags.num), bool),
             "merge_mode": jnp.zeros((num, frags.num), jnp.int32),
             "failures_in_a_row": jnp.int32(0)}
    if beta > 0:
      state["residual"] = zeros()
    if eager:
      state.update(avg_prev=jax.tree.map(jnp.zeros_like, params), own_prev=zeros(),
                   eager_base=zeros())
    return state

  def inner(sub, batch):
    params, opt_state, loss, ok = mesh_lib.vmap_islands(train_step, groups)(
        sub["inner_params"], sub["inner_opt_state"], batch)
    return ({"inner_params": params, "inner_opt_state": opt_state,
             "tainted": sub["tainted"] | ~ok[:, None]}, {"island_loss": loss, "island_ok": ok})

  def encode(p, rw, ro, done, present):
    """Island-local: pseudo-gradient of fragment p, error feedback, codec (and eager step);
    the islands that are present, untainted and finite send it with weight 1, the rest 0."""
    src = {**ro, **rw}
    g = frags.take(src["global_params"], p)
    delta = sync.pseudo_gradients(g, frags.take(src["inner_params"], p, lead=1))
    ok = present & ~rw["tainted"][:, p]
    if guard:
      ok &= jax.vmap(health.all_finite)(delta)
    delta = health.keep_if(ok, delta, jax.tree.map(jnp.zeros_like, delta))
    mode = jnp.where(ok, health.MERGE, jnp.where(present | (not keep_absent),
                                                 health.RESTART, health.KEEP))
    out = {"tainted": rw["tainted"].at[:, p].set(False),
           "merge_mode": rw["merge_mode"].at[:, p].set(mode)}
    weight = sync.island_weights(ok, present, in_island, mesh)
    if eager:
      d_hat = sync.eager_delta(delta, frags.take(rw["own_prev"], p, lead=1),
                               frags.take(ro["avg_prev"], p), num)
      base = jax.vmap(lambda d: sync.outer_update(outer_tx, d, ro["outer_opt_state"], g)[0])(
          d_hat)
      out["own_prev"] = frags.put(rw["own_prev"], p, delta, lead=1)
      out["eager_base"] = frags.put(rw["eager_base"], p, base, lead=1)
      out["inner_params"] = frags.put(rw["inner_params"], p, base, lead=1)
    if codec is None:
      return out, (delta, weight)
    flat = sync.flatten(delta, padded[p])
    keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, done), p), num)
    residual = sync.flatten(frags.take(rw["residual"], p, lead=1), padded[p]) if beta else None
    payload, new_residual = sync.encode(codec, flat, residual, beta, keys, mesh)
    if beta:  # an island that does not send keeps its residual
      out["residual"] = frags.put(rw["residual"], p, tuple(jax.vmap(
          lambda r: sync.unflatten(r, g))(health.keep_if(ok, new_residual, residual))), lead=1)
    return out, (payload, weight)

  def exchange(p, rw, sent):
    """The exchange of fragment p (already done on the host with the host transport): the
    mean over the islands that sent, then its outer step on the global copy (skipped, and
    counted as a failure when islands were present, if nothing healthy was sent)."""
    payload, weight = sent
    g = frags.take(rw["global_params"], p)
    weights = sync.gather_weights(weight, mesh, gathered=host)
    count = jnp.sum(weights > 0).astype(jnp.float32)
    if codec is None:  # masked islands sent zeros: the mean over M, renormalised
      if host:
        mean = tuple(x.mean(0) for x in payload)
      else:
        mean = sync.island_mean(payload, payload_shardings(p, "island"), named(frag_specs[p]))
      mean = jax.lax.with_sharding_constraint(
          tuple(x * (num / jnp.maximum(count, 1.0)) for x in mean), named(frag_specs[p]))
    else:
      mean = sync.unflatten(sync.exchange(codec, payload, weights, mesh, gathered=host)
                            [:sizes[p]], g)
    new_g, opt_state = sync.outer_update(outer_tx, mean, rw["outer_opt_state"], g)
    ok = (count > 0) & health.all_finite(new_g)
    new_g, opt_state = health.keep_if(ok, (new_g, opt_state), (g, rw["outer_opt_state"]))
    out = {"global_params": frags.put(rw["global_params"], p, new_g),
           "outer_opt_state": opt_state,
           "failures_in_a_row": jnp.where(ok | ((count == 0) & ~jnp.any(weights < 0)), 0,
                                          rw["failures_in_a_row"] + 1)}
    if eager:
      out["avg_prev"] = frags.put(rw["avg_prev"], p, mean)
    return out

  def merge(p, rw, ro):
    """Islands take the new global fragment p (alpha-mixed, or correcting the eager step)."""
    local = frags.take(rw["inner_params"], p, lead=1)
    base = frags.take(ro["eager_base"], p, lead=1) if eager else None
    new_g = frags.take(ro["global_params"], p)
    merged = sync.merge(local, new_g, alpha, base)
    mode = ro["merge_mode"][:, p]
    restart = tuple(jnp.broadcast_to(g[None], l.shape) for g, l in zip(new_g, local))
    merged = health.keep_if(mode == health.RESTART, restart, merged)
    merged = health.keep_if(mode == health.KEEP, local, merged)
    out = {"inner_params": frags.put(rw["inner_params"], p, merged, lead=1)}
    if reset_inner:
      out["inner_opt_state"] = fresh_inner_opt(out["inner_params"])
    return out

  # Which state entries each program updates (donated) and reads.
  inner_rw = ["inner_params", "inner_opt_state", "tainted"]
  enc_rw = (["tainted", "merge_mode"] + ["residual"] * (beta > 0) +
            ["own_prev", "eager_base", "inner_params"] * eager)
  enc_ro = ["global_params"] + ["avg_prev"] * eager + ["inner_params"] * (not eager)
  exch_rw = ["global_params", "failures_in_a_row"] + ["avg_prev"] * eager
  merge_rw = ["inner_params", "inner_opt_state"] if reset_inner else ["inner_params"]
  merge_ro = ["global_params", "merge_mode"] + ["eager_base"] * eager
  sub = lambda keys: {k: shard[k] for k in keys}
  programs = {"inner": jax.jit(
      inner, in_shardings=(sub(inner_rw), batch_sharding),
      out_shardings=(sub(inner_rw), {"island_loss": island_loss_sharding,
                                     "island_ok": island_loss_sharding}), donate_argnums=0)}
  gathered = [sent_shardings(p, None) for p in range(frags.num)]  # host transport's output
  for p in range(frags.num):
    opt = {"outer_opt_state": shard["outer_opt_state"][p]}
    sent = sent_shardings(p, "island")
    received = gathered[p] if host else sent
    programs[f"encode/{p}"] = jax.jit(
        functools.partial(encode, p),
        in_shardings=(sub(enc_rw), {**sub(enc_ro), **opt}, None, None),
        out_shardings=(sub(enc_rw), sent), donate_argnums=0)
    programs[f"exchange/{p}"] = jax.jit(
        functools.partial(exchange, p), in_shardings=({**sub(exch_rw), **opt}, received),
        out_shardings={**sub(exch_rw), **opt}, donate_argnums=0)
    programs[f"merge/{p}"] = jax.jit(
        functools.partial(merge, p), in_shardings=(sub(merge_rw), sub(merge_ro)),
        out_shardings=sub(merge_rw), donate_argnums=0)

  pick = lambda state, keys: {k: state[k] for k in keys}
  exchanger = transport.HostExchange() if host else None
  in_flight: dict[int, Any] = {}  # host transport: fragment -> future of the gathered payload

  def inner_step(state, batch):
    new, metrics = programs["inner"](pick(state, inner_rw), batch)
    return {**state, **new}, metrics

  def encode_args(state, p, done, present):
    return (pick(state, enc_rw), {**pick(state, enc_ro),
                                  "outer_opt_state": state["outer_opt_state"][p]}, done, present)

  exchange_args = lambda state, p: {**pick(state, exch_rw),
                                    "outer_opt_state": state["outer_opt_state"][p]}

  def apply_exchange(state, p, payload):
    new = programs[f"exchange/{p}"](exchange_args(state, p), payload)
    outer_states = list(state["outer_opt_state"])
    outer_states[p] = new.pop("outer_opt_state")
    return {**state, **new, "outer_opt_state": tuple(outer_states)}

  def settle(state, only=None):
    for p in [q for q in list(in_flight) if only is None or q == only]:
      state = apply_exchange(state, p, in_flight.pop(p).result())
    return state

  def run_sync(state, done):
    """Runs the sends and merges due at ``done`` (:meth:`fragments.Schedule.events`).
    Nothing the next inner steps compute feeds an exchange: with the host transport it runs
    on a thread meanwhile; with XLA it is queued on the device (where programs run in order)."""
    for kind, p in schedule.events(done):
      if kind == "send":
        new, payload = programs[f"encode/{p}"](*encode_args(state, p, np.int32(done),
                                                            who.present(done, p)))
        state = {**state, **new}
        if host:
          in_flight[p] = exchanger.start(payload, p, done, gathered[p])
        else:
          state = apply_exchange(state, p, payload)
      else:
        state = settle(state, only=p)
        state = {**state, **programs[f"merge/{p}"](pick(state, merge_rw),
                                                   pick(state, merge_ro))}
    return state

  def lower_sync(state, p):
    """Lowered ``encode/p`` and ``exchange/p`` on (abstract) ``state``, for HLO checks."""
    args = encode_args(state, p, jax.ShapeDtypeStruct((), jnp.int32),
                       jax.ShapeDtypeStruct((num,), jnp.bool_))
    _, payload = jax.eval_shape(programs[f"encode/{p}"], *args)
    return {"encode": programs[f"encode/{p}"].lower(*args),
            "exchange": programs[f"exchange/{p}"].lower(exchange_args(state, p), payload)}

  payload_size = lambda p: (tree_bytes(frag_abstract[p]) if codec is None
                            else codecs.payload_bytes(codec, padded[p]))
  return Algorithm(
      name="islands", num_islands=num, init=init_from(jax.jit(init, out_shardings=shard)),
      inner_step=inner_step, eval_params=lambda s: s["global_params"], state_shardings=shard,
      params_sharding=shard["global_params"], programs=programs, inner_keys=tuple(inner_rw),
      fragment_bytes=tuple(payload_size(p) if num > 1 else 0 for p in range(frags.num)),
      control_bytes_per_send=4 * in_island if num > 1 else 0,
      participation=None if who.always_all else who.present, schedule=schedule,
      sync_fn=run_sync, settle_fn=settle if host else None, lower_sync=lower_sync)
