"""The algorithm box: one outer round of (Streaming) DiLoCo as top-level pure functions.

Read first: ``fedjax_lm/reference.py``, the same algorithm in 40 lines of plain jax.numpy with
the paper's numbered steps; the tests hold these stages to it.

    for every inner step:        islands = inner_step(islands, batch)       H local steps each
    for each fragment p sending: islands, sent = encode(p, islands, server)  delta = global - local,
                                                                            error feedback, codec
                                 reduced = reduce(p, link, sent)             mean of the decoded
                                                                            payloads that were sent
                                 server = outer_step(p, server, reduced)     outer optax step
    tau steps after p's send:    islands = merge(p, islands, server)         alpha-mixed

Each stage is island-local except :func:`reduce`, whose only cross-island traffic is the link's
(:mod:`fedjax_lm.engine.links`). Stacked arrays carry a leading island dim ``[M, ...]``; a
fragment is a tuple of arrays (:mod:`fedjax_lm.fragments`). Every stage takes the
:class:`Spec` fixed at build time first; :mod:`fedjax_lm.engine.programs` jits them.

Health (:mod:`fedjax_lm.health`): an island tainted by a skipped non-finite step, absent from
the send (drop-out), or with a non-finite pseudo-gradient sends zeros with weight 0 (absent) or
-1 (masked), is left out of the mean, and restarts from (or, absent with ``keep``, keeps its
params at) the merge.

Variants live in their own modules and enter only through the hooks the stages call:
merge policies (``spec.merge``, :mod:`fedjax_lm.engine.merges`: alpha-mix, our eager updates,
Kale et al.'s one-step-delayed outer step) and codecs (``spec.codec``, :mod:`fedjax_lm.codecs`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lm import codecs
from fedjax_lm import fragments
from fedjax_lm import health
from fedjax_lm import mesh as mesh_lib
from fedjax_lm.engine import links
from fedjax_lm.engine import merges
from fedjax_lm.engine.merges.mix import outer_update
from fedjax_lm.engine.state import Absent, ErrorFeedback, Health, Islands, Server, State


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
  """Everything the stages need that is fixed when the engine is built."""

  num: int  # M
  mesh: Mesh
  frags: fragments.Fragments
  frag_abstract: tuple  # per fragment: its leaves' ShapeDtypeStructs
  frag_specs: tuple  # per fragment: its leaves' ZeRO PartitionSpecs (unstacked)
  padded: tuple  # per fragment: flat payload length (whole codec blocks per device)
  codec: codecs.Codec | None  # None: float32 leaves, mean by all-reduce
  train_step: Callable  # (params, opt_state, batch) -> (params, opt_state, loss, ok)
  groups: int  # simulated islands run as this many concurrent vmaps
  inner_tx: optax.GradientTransformation
  outer_tx: optax.GradientTransformation
  shardings: State  # of the whole state
  merge: merges.Mix = merges.Mix()  # the merge policy (alpha-mix: DiLoCo, Streaming DiLoCo)
  beta: float = 0.0  # error feedback decay; 0 = off
  guard: bool = True  # mask non-finite pseudo-gradients
  keep_absent: bool = False  # an absent island keeps its params at the merge
  reset_inner: bool = False  # re-initialise the inner optimizer state at the merge
  seed: int = 0
  world: int = 0  # M of the algorithm (eager estimates divide by it); 0: num. A decoupled
  #                 island job holds one island (num 1) of a run of M.

  @property
  def m(self) -> int:
    return self.world or self.num

  @property
  def devices_per_island(self) -> int:
    return math.prod(self.mesh.shape[a] for a in mesh_lib.IN_ISLAND_AXES)

  def named(self, specs: Any) -> Any:
    return mesh_lib.shardings(self.mesh, specs)

  def payload_shardings(self, p: int, lead: str | None) -> Any:
    """Fragment p's encoded payload, its island dim over ``lead`` (None: gathered)."""
    if self.codec is None:
      return self.named(tuple(mesh_lib.with_leading(s, lead) for s in self.frag_specs[p]))
    shapes = jax.eval_shape(self.codec.encode, jax.ShapeDtypeStruct((self.padded[p],),
                                                                    jnp.float32),
                            jax.random.key(0))
    return jax.tree.map(lambda _: NamedSharding(self.mesh, P(lead, mesh_lib.IN_ISLAND_AXES)),
                        shapes)

  def sent_shardings(self, p: int, lead: str | None) -> tuple:
    """What an island sends for fragment p: (payload, weight ``[M, D]``)."""
    return (self.payload_shardings(p, lead),
            NamedSharding(self.mesh, P(lead, mesh_lib.IN_ISLAND_AXES)))


class Reduced(NamedTuple):
  """The link's result for one fragment: the mean over the islands that sent."""
  mean: tuple  # the fragment's leaves (float32, ZeRO-sharded)
  count: jax.Array  # float32: islands that sent
  masked: jax.Array  # bool: some island was present but masked (non-finite)


# --------------------------------------------------------------------------- init
def init(spec: Spec, params: Any) -> State:
  """Every island starts from the global params; fresh inner and outer optimizer states."""
  stacked = _broadcast(spec, params)
  zeros = lambda: jax.tree.map(jnp.zeros_like, stacked)
  outer = tuple(spec.outer_tx.init(spec.frags.take(params, p)) for p in range(spec.frags.num))
  merge, server_merge = spec.merge.init(spec, params, stacked, outer)
  islands = Islands(
      params=stacked, opt_state=_fresh_inner_opt(spec, stacked),
      codec=ErrorFeedback(zeros()) if spec.beta > 0 else Absent(), merge=merge,
      health=Health(jnp.zeros((spec.num, spec.frags.num), bool),
                    jnp.zeros((spec.num, spec.frags.num), jnp.int32)))
  server = Server(params=params, outer=outer, merge=server_merge,
                  failures_in_a_row=jnp.int32(0))
  return State(islands, server)


# ------------------------------------------------------------------ 1. inner step
def inner_step(spec: Spec, islands: Islands, batch: dict) -> tuple[Islands, dict]:
  """One optimizer step on every island, on its own batch ``[M, B, ...]``: no byte crosses."""
  params, opt_state, loss, ok = mesh_lib.vmap_islands(spec.train_step, spec.groups)(
      islands.params, islands.opt_state, batch)
  tainted = islands.health.tainted | ~ok[:, None]
  return (islands._replace(params=params, opt_state=opt_state,
                           health=islands.health._replace(tainted=tainted)),
          {"island_loss": loss, "island_ok": ok})


# ----------------------------------------------------------------------- 2. encode
def encode(spec: Spec, p: int, islands: Islands, server: Server, done: jax.Array,
           present: jax.Array) -> tuple[Islands, tuple]:
  """Island-local: fragment p's pseudo-gradient ``delta_m = global - local_m``, error
  feedback and codec (and the eager step). The islands that are ``present``, untainted and
  finite send it with weight 1; the rest send zeros, weight 0 (absent) or -1 (masked)."""
  g = spec.merge.origin(spec, p, server)
  start = spec.merge.start(spec, p, islands, g)  # where the island's inner phase started
  delta = tuple(x - l for x, l in zip(start, spec.frags.take(islands.params, p, lead=1)))
  ok = present & ~islands.health.tainted[:, p]
  if spec.guard:
    ok &= jax.vmap(health.all_finite)(delta)
  delta = health.keep_if(ok, delta, jax.tree.map(jnp.zeros_like, delta))
  mode = jnp.where(ok, health.MERGE, jnp.where(present | (not spec.keep_absent),
                                               health.RESTART, health.KEEP))
  islands = islands._replace(health=Health(islands.health.tainted.at[:, p].set(False),
                                           islands.health.merge_mode.at[:, p].set(mode)))
  weight = jnp.where(ok, 1.0, jnp.where(present, -1.0, 0.0)).astype(jnp.float32)
  weight = jax.lax.with_sharding_constraint(  # each of the island's devices sends a copy
      jnp.broadcast_to(weight[:, None], (spec.num, spec.devices_per_island)),
      NamedSharding(spec.mesh, P("island", mesh_lib.IN_ISLAND_AXES)))
  islands = spec.merge.at_send(spec, p, islands, server, delta, g)
  if spec.codec is None:
    return islands, (delta, weight)
  payload, islands = _compress(spec, p, islands, delta, ok, done)
  return islands, (payload, weight)


def _compress(spec, p, islands, delta, ok, done):
  """The codec on each island's flat, padded pseudo-gradient, through error feedback when a
  residual is kept (an island that does not send keeps its residual)."""
  flat = _flatten(delta, spec.padded[p])
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(spec.seed + 1), done), p)
  keys = jax.random.split(key, spec.num)
  if spec.beta == 0:
    return _codec_encode(spec, flat, None, keys)[0], islands
  residual_tree = islands.codec.residual
  residual = _flatten(spec.frags.take(residual_tree, p, lead=1), spec.padded[p])
  payload, new_residual = _codec_encode(spec, flat, residual, keys)
  kept = health.keep_if(ok, new_residual, residual)
  like = spec.frag_abstract[p]
  residual_tree = spec.frags.put(residual_tree, p, tuple(jax.vmap(
      lambda r: unflatten(r, like))(kept)), lead=1)
  return payload, islands._replace(codec=ErrorFeedback(residual_tree))


def _codec_encode(spec, flat, residual, keys):
  """Per island: the payload of ``flat`` (``[M, n]``). Island-local by construction
  (``shard_map``: each device encodes its own whole blocks; GSPMD would partition e.g.
  ``top_k`` over the island axis)."""
  codec, beta, axes = spec.codec, spec.beta, mesh_lib.IN_ISLAND_AXES
  sharded = P("island", axes)

  def local(x, e, k):
    k = jax.vmap(lambda key: jax.random.fold_in(key, jax.lax.axis_index(axes)))(k)
    if e is None:
      return jax.vmap(codec.encode)(x, k), None
    return jax.vmap(lambda a, b, c: codecs.error_feedback_step(codec, beta, a, b, c))(x, e, k)

  payload_specs = jax.tree.map(lambda _: sharded, jax.eval_shape(
      lambda x, k: jax.vmap(codec.encode)(x, k), flat, keys))
  return jax.shard_map(local, mesh=spec.mesh, in_specs=(sharded, sharded, P("island")),
                       out_specs=(payload_specs, sharded), check_vma=False)(flat, residual, keys)


# ----------------------------------------------------------------------- 3. reduce
def reduce(spec: Spec, p: int, link: Any, sent: tuple) -> Reduced:
  """The mean of fragment p's decoded payloads over the islands that sent (weight > 0): the
  only stage that reads other islands' bytes, through ``link``."""
  payload, weight = sent
  weights = links.gather_weights(weight, spec.mesh, link)
  count = jnp.sum(weights > 0).astype(jnp.float32)
  mean_sharding = spec.named(spec.frag_specs[p])
  if spec.codec is None:  # masked islands sent zeros: the mean over M, renormalised
    mean = link.mean(payload, spec.payload_shardings(p, "island"), mean_sharding)
    mean = jax.lax.with_sharding_constraint(
        tuple(x * (spec.num / jnp.maximum(count, 1.0)) for x in mean), mean_sharding)
  else:
    flat = links.exchange(spec.codec, payload, weights, spec.mesh, link)
    mean = unflatten(flat[:sum(math.prod(x.shape) for x in spec.frag_abstract[p])],
                      spec.frag_abstract[p])
  return Reduced(mean, count, jnp.any(weights < 0))


# ------------------------------------------------------------------- 4. outer step
def outer_step(spec: Spec, p: int, server: Server, reduced: Reduced) -> Server:
  """Fragment p's own outer optax step on the global copy; skipped (and counted as a failure
  when islands were present) if nothing healthy was sent or the result is not finite."""
  g, state = spec.frags.take(server.params, p), server.outer[p]
  new_g, new_state = outer_update(spec.outer_tx, reduced.mean, state, g)
  ok = (reduced.count > 0) & health.all_finite(new_g)
  new_g, new_state = health.keep_if(ok, (new_g, new_state), (g, state))
  nothing_sent = (reduced.count == 0) & ~reduced.masked
  merge = spec.merge.at_outer(spec, p, server.merge, reduced)
  return Server(params=spec.frags.put(server.params, p, new_g),
                outer=server.outer[:p] + (new_state,) + server.outer[p + 1:], merge=merge,
                failures_in_a_row=jnp.where(ok | nothing_sent, 0,
                                            server.failures_in_a_row + 1))


def receive(spec: Spec, p: int, server: Server, reduced: Reduced) -> Server:
  """What the global copy does with fragment p's mean: the outer step (a delayed policy holds
  the mean for its late step at p's next send instead)."""
  return spec.merge.at_receive(spec, p, server, reduced, outer_step)


def late_merge(spec: Spec, p: int, islands: Islands, server: Server
               ) -> tuple[Islands, Server]:
  """A delayed policy's outer step one round late, at fragment p's send (islands restart)."""
  return spec.merge.late(spec, p, islands, server, outer_step, Reduced)


def current_params(spec: Spec, server: Server) -> Any:
  """The global params with every received mean applied (a delayed policy's held ones too;
  NoLoCo: the islands' mean outer copy)."""
  if not spec.merge.has_current:
    return server.params
  return spec.merge.current(spec, server, outer_step, Reduced)


# ------------------------------------------------------------------------ 5. merge
def merge(spec: Spec, p: int, islands: Islands, server: Server) -> Islands:
  """Islands take the new global fragment p as the merge policy says (alpha-mix:
  ``alpha local + (1 - alpha) global``); restart from it, or keep local params, as the
  island's health says."""
  local = spec.frags.take(islands.params, p, lead=1)
  new_g = spec.merge.origin(spec, p, server)
  merged = spec.merge.merged(spec, p, islands, local, new_g)
  mode = islands.health.merge_mode[:, p]
  restart = tuple(jnp.broadcast_to(g, l.shape)
                  for g, l in zip(spec.merge.start(spec, p, islands, new_g), local))
  merged = health.keep_if(mode == health.RESTART, restart, merged)
  merged = health.keep_if(mode == health.KEEP, local, merged)
  params = spec.frags.put(islands.params, p, merged, lead=1)
  opt_state = _fresh_inner_opt(spec, params) if spec.reset_inner else islands.opt_state
  return islands._replace(params=params, opt_state=opt_state)


# ----------------------------------------------------------------------- helpers
def _broadcast(spec: Spec, params: Any) -> Any:
  stacked = jax.tree.map(lambda g: jnp.broadcast_to(g, (spec.num,) + g.shape), params)
  return jax.lax.with_sharding_constraint(stacked, spec.shardings.islands.params)


def _fresh_inner_opt(spec: Spec, stacked_params: Any) -> Any:
  return jax.lax.with_sharding_constraint(jax.vmap(spec.inner_tx.init)(stacked_params),
                                          spec.shardings.islands.opt_state)


def _flatten(stacked_frag: tuple, size: int) -> jax.Array:
  """``[M, ...]`` leaves -> one zero-padded ``[M, size]`` float32 vector per island."""
  m = stacked_frag[0].shape[0]
  flat = jnp.concatenate([x.reshape(m, -1).astype(jnp.float32) for x in stacked_frag], axis=1)
  return jnp.pad(flat, ((0, 0), (0, size - flat.shape[1])))


def unflatten(flat: jax.Array, like: tuple) -> tuple:
  """``[n]`` vector -> a fragment shaped like ``like`` (unstacked leaves)."""
  out, start = [], 0
  for x in like:
    n = math.prod(x.shape)
    out.append(flat[start:start + n].reshape(x.shape))
    start += n
  return tuple(out)
