"""The stages of one outer sync of one fragment, as small pure functions.

    pseudo-gradient -> encode (codec, error feedback) -> exchange -> decode + mean
        -> outer transform -> merge into the islands (tau steps later, alpha-mixed)

Stacked arrays carry a leading island dim ``[M, ...]``; a fragment is a tuple of arrays (see
:mod:`fedjax_lm.fragments`). Only :func:`exchange` (and :func:`island_mean`, its uncompressed
form) moves bytes across the ``island`` mesh axis; every other stage is island-local.

Eager updates (``outer.eager``), adapted from Kale et al. 2025 ("Eager updates for overlapped
communication and computation in DiLoCo", arXiv 2502.12996). Their eager outer gradient for
island m at round t replaces the island's own stale share of the last averaged pseudo-gradient
by its fresh one: ``d~_m = dbar_prev + (d_m - d_m_prev) / M``. They overlap the whole inner
phase and drive a per-island outer optimizer with d~_m. Here the exchange overlaps tau < H
steps and one global copy is driven by the true average, so: at the send, island m steps from
``eager_m = global + outer_update(d~_m)`` at once (the outer state is read, not advanced); when
the average arrives tau steps later the global copy takes the true outer step and the island is
corrected by the difference, ``local += (1 - alpha) (global_new - eager_m)``, keeping the
progress it made from its eager estimate. Without ``eager`` the merge is
``local = alpha local + (1 - alpha) global_new`` (Streaming DiLoCo).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax.sharding import PartitionSpec as P

from fedjax_lm import codecs
from fedjax_lm import mesh as mesh_lib


def pseudo_gradients(global_frag: tuple, local_frag: tuple) -> tuple:
  """``delta_m = global - local_m`` for every island (``[M, ...]``)."""
  return tuple(g[None] - l for g, l in zip(global_frag, local_frag))


def flatten(stacked_frag: tuple, size: int) -> jax.Array:
  """``[M, ...]`` leaves -> one zero-padded ``[M, size]`` float32 vector per island."""
  m = stacked_frag[0].shape[0]
  flat = jnp.concatenate([x.reshape(m, -1).astype(jnp.float32) for x in stacked_frag], axis=1)
  return jnp.pad(flat, ((0, 0), (0, size - flat.shape[1])))


def unflatten(flat: jax.Array, like: tuple) -> tuple:
  """``[size]`` vector -> a fragment shaped like ``like`` (unstacked leaves)."""
  out, start = [], 0
  for x in like:
    n = math.prod(x.shape)
    out.append(flat[start:start + n].reshape(x.shape))
    start += n
  return tuple(out)


def encode(codec: codecs.Codec, flat: jax.Array, residual: jax.Array | None, beta: float,
           keys: jax.Array, mesh: Any) -> tuple[dict, jax.Array | None]:
  """Per island: payload of ``flat`` (``[M, n]``), through error feedback when a residual
  (``[M, n]``) is kept. Island-local by construction (``shard_map``: each device encodes its
  own whole blocks; GSPMD would partition e.g. ``top_k`` over the island axis)."""
  spec = P("island", mesh_lib.IN_ISLAND_AXES)

  def local(x, e, k):
    k = jax.vmap(lambda key: jax.random.fold_in(
        key, jax.lax.axis_index(mesh_lib.IN_ISLAND_AXES)))(k)
    if e is None:
      return jax.vmap(codec.encode)(x, k), None
    return jax.vmap(lambda a, b, c: codecs.error_feedback_step(codec, beta, a, b, c))(x, e, k)

  payload_specs = jax.tree.map(lambda _: spec, jax.eval_shape(
      lambda x, k: jax.vmap(codec.encode)(x, k), flat, keys))
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P("island")),
                       out_specs=(payload_specs, spec), check_vma=False)(flat, residual, keys)


def exchange(codec: codecs.Codec, payload: dict, weights: jax.Array, mesh: Any,
             gathered: bool = False) -> jax.Array:
  """The one cross-island exchange: every device all-gathers its slice of every island's
  encoded payload over ``island`` (nothing else crosses but the weights, :func:`gather_weights`),
  then decodes each and averages in float32 over the islands that sent (``weights > 0``).
  Written with ``shard_map`` so the collective is exactly this all-gather of the encoded dtypes
  (under plain GSPMD, XLA may hoist the decode above the gather). ``gathered``: the host
  transport already gathered it (no collective here)."""
  spec = P(None if gathered else "island", mesh_lib.IN_ISLAND_AXES)

  def local(shard, w):
    if not gathered:
      shard = jax.tree.map(lambda x: jax.lax.all_gather(x, "island", axis=0, tiled=True), shard)
    decoded = jnp.where((w > 0)[:, None], jax.vmap(codec.decode)(shard), 0.0)
    return jnp.mean(decoded, axis=0) * (w.shape[0] / jnp.maximum(jnp.sum(w > 0), 1))

  specs = jax.tree.map(lambda _: spec, payload)
  return jax.shard_map(local, mesh=mesh, in_specs=(specs, P()),
                       out_specs=P(mesh_lib.IN_ISLAND_AXES), check_vma=False)(payload, weights)


def island_weights(ok: jax.Array, present: jax.Array, devices_per_island: int, mesh: Any
                   ) -> jax.Array:
  """Who sent, ``[M, D]`` float32: 1 sent, 0 absent, -1 present but masked (non-finite); each
  of an island's D devices sends its own copy beside its slice of the payload (4 bytes)."""
  w = jnp.where(ok, 1.0, jnp.where(present, -1.0, 0.0)).astype(jnp.float32)
  w = jnp.broadcast_to(w[:, None], (ok.shape[0], devices_per_island))
  return jax.lax.with_sharding_constraint(
      w, jax.sharding.NamedSharding(mesh, P("island", mesh_lib.IN_ISLAND_AXES)))


def gather_weights(weight: jax.Array, mesh: Any, gathered: bool = False) -> jax.Array:
  """Every island's weight (``[M]``, on every device): one all-gather over ``island`` of each
  device's copy (none if the host transport ``gathered`` it)."""
  spec = P(None if gathered else "island", mesh_lib.IN_ISLAND_AXES)

  def local(w):
    w = w[:, 0]
    return w if gathered else jax.lax.all_gather(w, "island", axis=0, tiled=True)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=P(),
                       check_vma=False)(weight)


def island_mean(stacked: Any, stacked_sharding: Any, mean_sharding: Any) -> Any:
  """Uncompressed exchange: mean over the island dim, lowered to one all-reduce over
  ``island`` of each device's ZeRO shard (one float32 copy per island crosses)."""
  stacked = jax.lax.with_sharding_constraint(stacked, stacked_sharding)
  return jax.lax.with_sharding_constraint(jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked),
                                          mean_sharding)


def outer_update(outer_tx: optax.GradientTransformation, delta: tuple, opt_state: Any,
                 global_frag: tuple) -> tuple[tuple, Any]:
  updates, opt_state = outer_tx.update(delta, opt_state, global_frag)
  return optax.apply_updates(global_frag, updates), opt_state


def eager_delta(fresh: tuple, own_prev: tuple, avg_prev: tuple, num: int) -> tuple:
  """Kale et al.'s estimate of the average: last average with this island's share refreshed,
  ``dbar_prev + (d_m - d_m_prev) / M`` (stacked over islands)."""
  return tuple(a[None] + (d - o) / num for d, o, a in zip(fresh, own_prev, avg_prev))


def merge(local_frag: tuple, global_frag: tuple, alpha: float,
          eager_base: tuple | None = None) -> tuple:
  """New global fragment into each island: ``alpha local + (1 - alpha) global``, or with an
  eager base, ``local + (1 - alpha) (global - eager_base)``."""
  if eager_base is None:
    return tuple(alpha * l + (1.0 - alpha) * g[None] for l, g in zip(local_frag, global_frag))
  return tuple(l + (1.0 - alpha) * (g[None] - b)
               for l, g, b in zip(local_frag, global_frag, eager_base))
