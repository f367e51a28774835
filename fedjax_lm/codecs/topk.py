"""``topk``: chunked top-k by magnitude (SparseLoCo's compressor), values quantized.

Per chunk of ``outer.topk_chunk`` values the ``k = round(topk_fraction * chunk)`` largest |x| are
kept: their indices as uint16, their values on ``outer.topk_bits`` bits (32: float32, exact).

``outer.topk_quantizer=minmax`` (this repository's 2-bit format): the sign in one bit and the
magnitude on a (2^(b-1))-level grid between the chunk's smallest and largest kept magnitude (sent
as f32 ``[lo, hi]``); |error| <= (hi - lo) / (2 (2^(b-1) - 1)) on a kept value (twice that with
``outer.stochastic_rounding``), |x| on a dropped one.

``outer.topk_quantizer=sigma`` is the SparseLoCo authors' statistical quantizer (Sarfi et al.
2025, arXiv 2508.15706; their public code's ``TopKCompressor``: 4 bins, range 6 sigma): over a
chunk's k kept values v, ``mu = mean(v)``, ``sd`` their unbiased standard deviation,
``s = sigmas * sd / 2^b``; the code is ``clip(round((v - mu) / s + 2^(b-1)), 0, 2^b - 1)`` and
the decoded value of a code is the mean of the kept values that got it (the table sent beside
the codes; the authors send the bins' centred means and ``mu``, here pre-added: the same float
sum). The authors take those statistics over a whole parameter tensor; here over one chunk (the
codec sees one flat vector, cut into whole chunks so that every device sends whole blocks). No
bound on a kept value in general (values past the outer bins decode to their bin's mean; the
decoded value stays within the chunk's kept range).

``outer.topk_aggregate``: ``mean`` (default) averages the decoded payloads over the islands that
sent; ``selected`` is SparseLoCo's sparse aggregation (the authors' code: a scatter-mean of
every replica's kept values): each coordinate is averaged over the islands that *kept* it, so a
coordinate only one island kept gets that island's value whole. The codec then carries a
``support`` (payload -> 0/1 per coordinate) that :func:`fedjax_lm.engine.links.exchange` reads.

Codes pack whole bytes: ``k`` is padded to a multiple of ``8 // bits`` with slots that repeat
index 0 and decode to zero.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fedjax_lm.codecs import bits as bits_lib

QUANTIZERS = ("minmax", "sigma")
AGGREGATES = ("mean", "selected")


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


@dataclasses.dataclass(frozen=True)
class TopK:
  """Top-k of every ``chunk`` values, kept values on ``bits`` bits (see the module docstring)."""

  chunk: int
  fraction: float
  bits: int
  stochastic: bool = False
  quantizer: str = "minmax"
  sigmas: float = 6.0
  aggregate: str = "mean"

  def __post_init__(self):
    if self.chunk > 1 << 16:
      raise ValueError(f"outer.topk_chunk={self.chunk} must be <= 65536 (indices are sent as "
                       "uint16)")

  @property
  def block(self) -> int:
    return self.chunk

  @property
  def k(self) -> int:
    return max(1, int(round(self.fraction * self.chunk)))

  @property
  def levels(self) -> int:
    """Magnitude grid steps between the kept min and max (minmax)."""
    return (1 << (self.bits - 1)) - 1

  @property
  def k_padded(self) -> int:
    per = 8 // self.bits if self.bits < 8 else 1
    return -(-self.k // per) * per

  @property
  def name(self) -> str:
    name = f"topk{self.k}/{self.chunk}@{self.bits}b"
    if self.quantizer != "minmax" and self.bits != 32:
      name += f"/{self.sigmas:g}sigma"
    return name + ("" if self.aggregate == "mean" else "/selected")

  @property
  def support(self):
    """payload -> float32 0/1 per coordinate (1: kept), for ``aggregate=selected``; else None."""
    return self._support if self.aggregate == "selected" else None

  def encode(self, x: jax.Array, key: jax.Array | None) -> dict:
    x = x.reshape(-1, self.chunk)
    _, idx = jax.lax.top_k(jnp.abs(x), self.k)
    vals = jnp.take_along_axis(x, idx, axis=-1)
    if self.bits == 32:
      return {"values": vals, "indices": idx.astype(jnp.uint16)}
    if self.quantizer == "sigma":
      return self._encode_sigma(vals, idx)
    return self._encode_minmax(vals, idx, key)

  def _encode_sigma(self, vals, idx):
    pad = self.k_padded - self.k
    code, table = sigma_quantize(vals, self.bits, self.sigmas)
    return {"values": bits_lib.pack_bits(jnp.pad(code, ((0, 0), (0, pad))), self.bits),
            "indices": jnp.pad(idx, ((0, 0), (0, pad))).astype(jnp.uint16), "scales": table}

  def _encode_minmax(self, vals, idx, key):
    pad, levels = self.k_padded - self.k, self.levels
    mag = jnp.abs(vals)
    lo, hi = jnp.min(mag, axis=-1), jnp.max(mag, axis=-1)
    step = jnp.where(hi > lo, (hi - lo) / max(levels, 1), 1.0)
    m = jnp.clip(bits_lib.round_codes((mag - lo[:, None]) / step[:, None],
                                      key if self.stochastic else None), 0, levels)
    code = (m.astype(jnp.uint8) << 1) | (vals < 0).astype(jnp.uint8)
    code = jnp.pad(code, ((0, 0), (0, pad)))
    idx = jnp.pad(idx, ((0, 0), (0, pad)))
    return {"values": bits_lib.pack_bits(code, self.bits), "indices": idx.astype(jnp.uint16),
            "scales": jnp.stack([lo, hi], axis=-1)}

  def decode(self, p: dict) -> jax.Array:
    idx = p["indices"].astype(jnp.int32)
    if self.bits == 32:
      vals = p["values"]
    elif self.quantizer == "sigma":
      code = bits_lib.unpack_bits(p["values"], self.bits).astype(jnp.int32)
      vals = jnp.take_along_axis(p["scales"], code, axis=-1)
      vals = jnp.where(jnp.arange(idx.shape[-1]) < self.k, vals, 0.0)
    else:
      vals = self._decode_minmax(p, idx)
    return self._scatter(idx, vals)

  def _decode_minmax(self, p, idx):
    code = bits_lib.unpack_bits(p["values"], self.bits)
    lo, hi = p["scales"][:, 0:1], p["scales"][:, 1:2]
    step = jnp.where(hi > lo, (hi - lo) / max(self.levels, 1), 1.0)
    mag = lo + (code >> 1).astype(jnp.float32) * step
    vals = jnp.where((code & 1) == 1, -mag, mag)
    valid = jnp.arange(idx.shape[-1]) < self.k
    return jnp.where(valid, vals, 0.0)

  def _support(self, p: dict) -> jax.Array:
    idx = p["indices"].astype(jnp.int32)
    kept = jnp.broadcast_to(jnp.arange(idx.shape[-1]) < self.k, idx.shape).astype(jnp.float32)
    return self._scatter(idx, kept)

  def _scatter(self, idx, vals):
    """Rows of (index, value) -> the dense flat vector (pad slots add zero at index 0)."""
    out = jnp.zeros((idx.shape[0], self.chunk), jnp.float32)
    rows = jnp.arange(idx.shape[0])[:, None]
    return out.at[rows, idx].add(vals).reshape(-1)


def from_config(cfg) -> TopK:
  """``config.outer`` (``topk_*``, ``stochastic_rounding``) -> :class:`TopK`, one error line per
  bad option."""
  stochastic = bool(cfg.stochastic_rounding)
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
  if quantizer not in QUANTIZERS:
    raise ValueError(f"outer.topk_quantizer={quantizer!r}: expected one of {QUANTIZERS}")
  if aggregate not in AGGREGATES:
    raise ValueError(f"outer.topk_aggregate={aggregate!r}: expected one of {AGGREGATES}")
  if quantizer == "sigma" and not (sigmas > 0 and math.isfinite(sigmas)):
    raise ValueError(f"outer.topk_sigmas={sigmas} must be a positive number")
  if quantizer == "sigma" and stochastic:
    raise ValueError("outer.stochastic_rounding=True is not available with "
                     "outer.topk_quantizer=sigma (its codes are deterministic)")
  return TopK(chunk, fraction, bits, stochastic, quantizer, sigmas, aggregate)
