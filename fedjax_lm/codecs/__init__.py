"""Codecs for what crosses the island axis, and error feedback.

A codec turns one island's flat float32 pseudo-gradient ``x[n]`` (``n`` a multiple of
``codec.block``) into a *payload*: a dict of small-dtype arrays whose leading dim is the number
of blocks ``n // block``. The payload is what the islands exchange (an all-gather over
``island``); every island decodes every payload and averages in float32. ``payload_bytes`` is
exactly what one island sends: values + scales + indices, padding included.

========= ============================================= ==================================
name      payload per block of ``block`` values          bound on |decode(encode(x)) - x|
========= ============================================= ==================================
bf16      bfloat16 values                               2^-8 |x| (round to nearest)
int8      int8 in [-127, 127] + f32 absmax scale         s / 2, s = absmax / 127
int4      4-bit in [-7, 7] packed 2 per byte + scale     s / 2, s = absmax / 7
topk      k largest |x| per chunk: uint16 index +        kept: (max - min) / (2 (2^(b-1) - 1))
          b-bit code (sign + magnitude on a uniform      of the chunk's kept |values|
          grid from the kept min to max, packed)         (exact for b = 32); dropped: |x|
          + f32 min/max of kept |x| (sign kept apart)
topk,     k largest |x| per chunk: uint16 index +        kept: none in general (values past
sigma     b-bit bin of the kept value, centred on the    the outer bins decode to their
          chunk's kept mean, bins of s sigma / 2^b      bin's mean); dropped: |x|
          (packed) + f32 table of each bin's mean
========= ============================================= ==================================

With ``stochastic_rounding`` the integer codecs round up with probability equal to the
fractional part (unbiased; the bound becomes s). Top-k's b-bit code stores the sign in one
bit and the magnitude on a (2^(b-1))-level grid between the chunk's smallest and largest kept
magnitude (``outer.topk_quantizer=minmax``, this repository's 2-bit format).

``outer.topk_quantizer=sigma`` is the SparseLoCo authors' statistical quantizer (Sarfi et al.
2025, arXiv 2508.15706; their public code's ``TopKCompressor``: 4 bins, range 6 sigma): over a
chunk's k kept values v, ``mu = mean(v)``, ``sd`` their unbiased standard deviation,
``s = sigmas * sd / 2^b``; the code is ``clip(round((v - mu) / s + 2^(b-1)), 0, 2^b - 1)`` and
the decoded value of a code is the mean of the kept values that got it (the table sent beside
the codes; the authors send the bins' centred means and ``mu``, here pre-added: the same float
sum). The authors take those statistics over a whole parameter tensor; here over one chunk (the
codec sees one flat vector, cut into whole chunks so that every device sends whole blocks).

``outer.topk_aggregate``: ``mean`` (default) averages the decoded payloads over the islands that
sent; ``selected`` is SparseLoCo's sparse aggregation (the authors' code: a scatter-mean of
every replica's kept values): each coordinate is averaged over the islands that *kept* it, so a
coordinate only one island kept gets that island's value whole. The codec then carries a
``support`` (payload -> 0/1 per coordinate) that :func:`fedjax_lm.engine.links.exchange` reads.

Error feedback (Seide et al. 2014; SparseLoCo's form): each island keeps a residual ``e`` of
what it has not yet sent; at a sync ``e <- beta * e + delta``, the island sends ``C(e)`` and
keeps ``e <- e - decode(C(e))``. ``beta = 1`` is classic error feedback.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

CODECS = ("none", "bf16", "int8", "int4", "topk")
TOPK_QUANTIZERS = ("minmax", "sigma")
TOPK_AGGREGATES = ("mean", "selected")


class Codec(NamedTuple):
  """Flat float32 ``x[n]`` (``n % block == 0``) <-> payload dict of ``[n // block, ...]``."""

  name: str
  block: int
  encode: Callable[[jax.Array, jax.Array | None], dict]  # (x, key or None) -> payload
  decode: Callable[[dict], jax.Array]  # payload -> x (float32)
  # payload -> float32 0/1 per coordinate (1: sent); set only for outer.topk_aggregate=selected
  support: Callable[[dict], jax.Array] | None = None


def pack_bits(q: jax.Array, bits: int) -> jax.Array:
  """uint8 codes < 2^bits along the last dim -> packed uint8 (8 // bits codes per byte)."""
  if bits == 8:
    return q.astype(jnp.uint8)
  per = 8 // bits
  q = q.astype(jnp.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return jnp.bitwise_or.reduce(q << shifts, axis=-1).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
  if bits == 8:
    return packed
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  q = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _round(x: jax.Array, key: jax.Array | None) -> jax.Array:
  """Nearest, or stochastic (unbiased) when a key is given."""
  if key is None:
    return jnp.round(x)
  return jnp.floor(x + jax.random.uniform(key, x.shape, x.dtype))


def _absmax_int(bits: int, block: int, stochastic: bool) -> Codec:
  """Symmetric per-block integer quantizer: q = round(x / s), s = absmax / (2^(bits-1) - 1)."""
  qmax = (1 << (bits - 1)) - 1

  def encode(x, key):
    x = x.reshape(-1, block)
    scale = jnp.max(jnp.abs(x), axis=-1) / qmax
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(_round(x / safe[:, None], key if stochastic else None), -qmax, qmax)
    if bits == 8:
      return {"values": q.astype(jnp.int8), "scales": scale}
    return {"values": pack_bits((q + qmax + 1).astype(jnp.uint8), bits), "scales": scale}

  def decode(p):
    if bits == 8:
      q = p["values"].astype(jnp.float32)
    else:
      q = unpack_bits(p["values"], bits).astype(jnp.float32) - (qmax + 1)
    return (q * p["scales"][:, None]).reshape(-1)

  return Codec(f"int{bits}", block, encode, decode)


def _bf16() -> Codec:
  """bfloat16 values, exchanged as their uint16 bit patterns (so that XLA cannot hoist the
  widening convert above the collective and send float32)."""
  to_bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
  from_bits = lambda b: jax.lax.bitcast_convert_type(b, jnp.bfloat16).astype(jnp.float32)
  return Codec("bf16", 1, lambda x, key: {"values": to_bits(x)[:, None]},
               lambda p: from_bits(p["values"]).reshape(-1))


def sigma_quantize(vals: jax.Array, bits: int, sigmas: float) -> tuple[jax.Array, jax.Array]:
  """Rows of kept values ``[r, k]`` -> (codes ``[r, k]`` uint8 < 2^bits, table ``[r, 2^bits]``
  float32: each bin's mean value, 0 for an empty bin). See the module docstring."""
  bins, k = 1 << bits, vals.shape[-1]
  shift = jnp.mean(vals, axis=-1, keepdims=True)
  centred = vals - shift
  sd = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / max(k - 1, 1))
  scale = sigmas * sd / bins
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  q = jnp.clip(jnp.round(centred / scale + bins // 2), 0, bins - 1).astype(jnp.int32)
  onehot = q[..., None] == jnp.arange(bins)  # [r, k, bins]
  sums = jnp.sum(jnp.where(onehot, centred[..., None], 0.0), axis=-2)
  counts = jnp.sum(onehot, axis=-2).astype(jnp.float32)
  table = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0) + shift, 0.0)
  return q.astype(jnp.uint8), table


def _topk(chunk: int, fraction: float, bits: int, stochastic: bool, quantizer: str = "minmax",
          sigmas: float = 6.0, aggregate: str = "mean") -> Codec:
  """Chunked top-k by magnitude; indices as uint16, values as sign + magnitude code (minmax)
  or as a bin of the chunk's kept-value distribution (sigma)."""
  if chunk > 1 << 16:
    raise ValueError(f"outer.topk_chunk={chunk} must be <= 65536 (indices are sent as uint16)")
  k = max(1, int(round(fraction * chunk)))
  levels = (1 << (bits - 1)) - 1  # magnitude grid steps between the kept min and max
  per = 8 // bits if bits < 8 else 1
  k_padded = -(-k // per) * per  # codes pack whole bytes; extra slots repeat index 0 w/ zero

  def encode(x, key):
    x = x.reshape(-1, chunk)
    _, idx = jax.lax.top_k(jnp.abs(x), k)
    vals = jnp.take_along_axis(x, idx, axis=-1)
    if bits == 32:
      return {"values": vals, "indices": idx.astype(jnp.uint16)}
    pad = k_padded - k
    if quantizer == "sigma":
      code, table = sigma_quantize(vals, bits, sigmas)
      return {"values": pack_bits(jnp.pad(code, ((0, 0), (0, pad))), bits),
              "indices": jnp.pad(idx, ((0, 0), (0, pad))).astype(jnp.uint16), "scales": table}
    mag = jnp.abs(vals)
    lo, hi = jnp.min(mag, axis=-1), jnp.max(mag, axis=-1)
    step = jnp.where(hi > lo, (hi - lo) / max(levels, 1), 1.0)
    m = jnp.clip(_round((mag - lo[:, None]) / step[:, None], key if stochastic else None),
                 0, levels)
    code = (m.astype(jnp.uint8) << 1) | (vals < 0).astype(jnp.uint8)
    code = jnp.pad(code, ((0, 0), (0, pad)))
    idx = jnp.pad(idx, ((0, 0), (0, pad)))
    return {"values": pack_bits(code, bits), "indices": idx.astype(jnp.uint16),
            "scales": jnp.stack([lo, hi], axis=-1)}

  def decode(p):
    idx = p["indices"].astype(jnp.int32)
    if bits == 32:
      vals = p["values"]
    elif quantizer == "sigma":
      code = unpack_bits(p["values"], bits).astype(jnp.int32)
      vals = jnp.take_along_axis(p["scales"], code, axis=-1)
      vals = jnp.where(jnp.arange(idx.shape[-1]) < k, vals, 0.0)
    else:
      code = unpack_bits(p["values"], bits)
      lo, hi = p["scales"][:, 0:1], p["scales"][:, 1:2]
      step = jnp.where(hi > lo, (hi - lo) / max(levels, 1), 1.0)
      mag = lo + (code >> 1).astype(jnp.float32) * step
      vals = jnp.where((code & 1) == 1, -mag, mag)
      valid = jnp.arange(idx.shape[-1]) < k
      vals = jnp.where(valid, vals, 0.0)
    out = jnp.zeros((idx.shape[0], chunk), jnp.float32)
    rows = jnp.arange(idx.shape[0])[:, None]
    return out.at[rows, idx].add(vals).reshape(-1)

  def support(p):
    idx = p["indices"].astype(jnp.int32)
    kept = jnp.broadcast_to(jnp.arange(idx.shape[-1]) < k, idx.shape).astype(jnp.float32)
    out = jnp.zeros((idx.shape[0], chunk), jnp.float32)
    return out.at[jnp.arange(idx.shape[0])[:, None], idx].add(kept).reshape(-1)

  name = f"topk{k}/{chunk}@{bits}b" + ("" if quantizer == "minmax" or bits == 32 else
                                       f"/{sigmas:g}sigma")
  return Codec(name + ("" if aggregate == "mean" else "/selected"), chunk, encode, decode,
               support if aggregate == "selected" else None)


def from_config(cfg) -> Codec | None:
  """``config.outer`` -> codec, or None for uncompressed float32 (exchanged by all-reduce)."""
  name = cfg.compression
  if name not in CODECS:
    raise ValueError(f"outer.compression={name!r}: expected one of {CODECS}")
  block, stochastic = int(cfg.quant_block), bool(cfg.stochastic_rounding)
  if name in ("int8", "int4") and (block < 2 or block % 2):
    raise ValueError(f"outer.quant_block={block} must be an even number >= 2")
  if name == "none":
    return None
  if name == "bf16":
    return _bf16()
  if name == "int8":
    return _absmax_int(8, block, stochastic)
  if name == "int4":
    return _absmax_int(4, block, stochastic)
  bits, chunk, fraction = int(cfg.topk_bits), int(cfg.topk_chunk), float(cfg.topk_fraction)
  if bits not in (2, 4, 8, 32):
    raise ValueError(f"outer.topk_bits={bits}: expected 2, 4, 8 or 32")
  if not 0 < fraction <= 1:
    raise ValueError(f"outer.topk_fraction={fraction} must be in (0, 1]")
  if chunk < 1:
    raise ValueError(f"outer.topk_chunk={chunk} must be >= 1")
  quantizer = cfg.get("topk_quantizer", "minmax")
  sigmas = float(cfg.get("topk_sigmas", 6.0))
  aggregate = cfg.get("topk_aggregate", "mean")
  if quantizer not in TOPK_QUANTIZERS:
    raise ValueError(f"outer.topk_quantizer={quantizer!r}: expected one of {TOPK_QUANTIZERS}")
  if aggregate not in TOPK_AGGREGATES:
    raise ValueError(f"outer.topk_aggregate={aggregate!r}: expected one of {TOPK_AGGREGATES}")
  if quantizer == "sigma" and not (sigmas > 0 and math.isfinite(sigmas)):
    raise ValueError(f"outer.topk_sigmas={sigmas} must be a positive number")
  if quantizer == "sigma" and stochastic:
    raise ValueError("outer.stochastic_rounding=True is not available with "
                     "outer.topk_quantizer=sigma (its codes are deterministic)")
  return _topk(chunk, fraction, bits, stochastic, quantizer, sigmas, aggregate)


def padded_size(n: int, codec: Codec, shards: int) -> int:
  """Length the flat vector is zero-padded to: whole blocks, a multiple of ``shards`` of them
  (so every in-island device sends an equal slice)."""
  unit = codec.block * shards
  return max(1, math.ceil(n / unit)) * unit


def payload_bytes(codec: Codec, n: int) -> int:
  """Exact bytes of ``codec.encode`` of an ``n``-vector (``n`` already padded)."""
  shapes = jax.eval_shape(codec.encode, jax.ShapeDtypeStruct((n,), jnp.float32),
                          jax.random.key(0))
  return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


def error_feedback_step(codec: Codec, beta: float, delta: jax.Array, residual: jax.Array,
                        key: jax.Array | None) -> tuple[dict, jax.Array]:
  """One island: ``e <- beta e + delta``; send ``C(e)``; keep ``e - decode(C(e))``."""
  e = beta * residual + delta
  payload = codec.encode(e, key)
  return payload, e - codec.decode(payload)
