"""``int8`` / ``int4``: symmetric per-block integer quantization with a float32 absmax scale.

Per block of ``outer.quant_block`` values: ``s = absmax / qmax`` (``qmax = 2^(bits-1) - 1``),
``q = round(x / s)`` in ``[-qmax, qmax]``; |error| <= s / 2, or s with
``outer.stochastic_rounding`` (unbiased). Payload: ``{"values": int8[n/block, block]`` (int8) or
4-bit codes offset by ``qmax + 1`` and packed two per byte (int4), ``"scales": f32[n/block]}``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lm.codecs import bits as bits_lib


@dataclasses.dataclass(frozen=True)
class BlockQuant:
  """``bits`` (8 or 4) per value, one scale per ``block`` values."""

  bits: int
  block: int
  stochastic: bool = False
  support = None

  @property
  def name(self) -> str:
    return f"int{self.bits}"

  @property
  def qmax(self) -> int:
    return (1 << (self.bits - 1)) - 1

  def encode(self, x: jax.Array, key: jax.Array | None) -> dict:
    bits, qmax = self.bits, self.qmax
    x = x.reshape(-1, self.block)
    scale = jnp.max(jnp.abs(x), axis=-1) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(bits_lib.round_codes(x / safe[:, None], key if self.stochastic else None),
                 -qmax, qmax)
    if bits == 8:
      return {"values": q.astype(jnp.int8), "scales": scale}
    return {"values": bits_lib.pack_bits((q + qmax + 1).astype(jnp.uint8), bits),
            "scales": scale}

  def decode(self, p: dict) -> jax.Array:
    if self.bits == 8:
      q = p["values"].astype(jnp.float32)
    else:
      q = bits_lib.unpack_bits(p["values"], self.bits).astype(jnp.float32) - (self.qmax + 1)
    return (q * p["scales"][:, None]).reshape(-1)


def from_config(cfg, bits: int) -> BlockQuant:
  """``config.outer`` (``quant_block``, ``stochastic_rounding``) -> :class:`BlockQuant`."""
  block, stochastic = int(cfg.quant_block), bool(cfg.stochastic_rounding)
  if block < 2 or block % 2:
    raise ValueError(f"outer.quant_block={block} must be an even number >= 2")
  return BlockQuant(bits, block, stochastic)
