"""``bf16``: every value cast to bfloat16 (round to nearest; |error| <= 2^-8 |x|).

The payload is ``{"values": uint16[n, 1]}``, the bfloat16 bit patterns: exchanged as integers so
that XLA cannot hoist the widening convert above the collective and send float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Bf16:
  """The bfloat16 cast: no parameters, one value per block."""

  name = "bf16"
  block = 1
  support = None

  def encode(self, x: jax.Array, key: jax.Array | None) -> dict:
    del key  # round to nearest, always
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return {"values": bits[:, None]}

  def decode(self, p: dict) -> jax.Array:
    return jax.lax.bitcast_convert_type(p["values"], jnp.bfloat16).astype(jnp.float32).reshape(-1)


def from_config(cfg) -> Bf16:
  """``config.outer`` -> :class:`Bf16` (it reads no option)."""
  del cfg
  return Bf16()
