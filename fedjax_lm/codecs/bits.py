"""Helpers the codecs share: packing small integer codes into bytes, and rounding to the
nearest integer or stochastically (unbiased) when a PRNG key is given."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_bits(q: jax.Array, bits: int) -> jax.Array:
  """uint8 codes < 2^bits along the last dim -> packed uint8 (8 // bits codes per byte)."""
  if bits == 8:
    return q.astype(jnp.uint8)
  per = 8 // bits
  q = q.astype(jnp.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return jnp.bitwise_or.reduce(q << shifts, axis=-1).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: packed uint8 -> uint8 codes (8 // bits per byte)."""
  if bits == 8:
    return packed
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  q = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def round_codes(x: jax.Array, key: jax.Array | None) -> jax.Array:
  """Nearest, or stochastic (round up with probability the fractional part) given a key."""
  if key is None:
    return jnp.round(x)
  return jnp.floor(x + jax.random.uniform(key, x.shape, x.dtype))
