"""``demo``: DeMo's / DisTrO's compressor (Peng et al., arXiv 2411.19870): the orthonormal DCT of
each chunk, its ``k`` largest coefficients, optionally only their signs (Psyche's 1-bit form).

DeMo, per worker and step, with ``Delta`` its decoupled momentum (error feedback here, with
``outer.error_feedback`` = DeMo's ``compression_decay`` beta)::

  Delta <- beta Delta + lr g                  (the engine: e <- beta e + delta, delta the
  q     <- IDCT(TopK_k(DCT(Delta)))            pseudo-gradient; H = 1 is DeMo's every step)
  Delta <- Delta - q                          (:meth:`DeMo.removed`: the kept coefficients at
  Q     <- IDCT(average of every worker's      full precision, also with ``sign``)
           kept coefficients)                 (the exchange: the mean of :meth:`DeMo.decode`)
  x     <- x - lr sign(Q)                     (``outer.optimizer=sign_sgd``)

**Blocks.** ``outer.demo_chunk`` = s is the DCT length. ``outer.demo_2d=False``: a block is s
consecutive values of the flat vector, one DCT-II of length s, top-k of its s coefficients (the
authors' form for 1-D tensors). ``demo_2d=True``: a block is s * s consecutive values read as an
s x s tile (s runs of s values), the separable 2-D DCT ``D X D^T``, top-k of its s^2 coefficients
(the authors' form for 2-D weights, whose tiles are s x s sub-matrices; here the codec sees one
flat vector, so a tile's rows are consecutive runs of s values, a sub-matrix only where a
weight's rows are s long). ``D[k, n] = a_k cos(pi (2n + 1) k / 2s)``, ``a_0 = sqrt(1/s)``,
``a_k = sqrt(2/s)``: orthonormal, so ``k = block`` with float32 values is lossless up to
rounding.

**Payload** per block: ``indices`` (uint8 where ``block < 256``, else uint16: Psyche's widths)
and ``values`` (float32, ``outer.demo_sign=False``) or ``signs`` (1 bit per kept coefficient,
packed 8 per byte, ``ceil(k / 8)`` bytes; ``demo_sign=True``). A kept coefficient that is exactly
0 (a block with fewer than k nonzero coefficients, e.g. padding) is sent with index ``block``,
which decodes to nothing.

**Decoding signs** as Psyche does (``unpack_tensor_sign_from_boolean``: ``1 - 2 signbit``): each
kept coefficient is +-1, so the exchanged mean is scale-free and is meant for the sign step
(``config_lib`` refuses ``demo_sign`` with another outer optimizer). Error feedback removes the
kept coefficients at full precision (:meth:`DeMo.removed`; Psyche subtracts its own unquantized
result, not the 1-bit one).

**Aggregation** (``outer.demo_aggregate``). ``mean``: the engine averages the decoded payloads
over the islands that sent (IDCT is linear: the IDCT of the mean of the coefficients).
``selected``: the authors' code (``scatter_reduce(..., "mean", include_self=False)`` over every
worker's indices and values, DeMo's and Psyche's alike) averages each coefficient over the
workers that kept it, then inverts once (:meth:`DeMo.aggregate`, which the exchange calls on
the gathered payloads: the count per coefficient comes from the gathered indices, so nothing
more crosses). The two agree at M = 1 and on coefficients that every island or no island
kept; elsewhere ``selected`` divides by fewer. ``selected`` needs the mesh-axis exchange (the
decoupled syncer sums decoded payloads).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.codecs import bits as bits_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def dct_matrix(s: int) -> np.ndarray:
  """The orthonormal DCT-II matrix ``D`` (float64, ``[s, s]``): coefficients ``D x``, inverse
  (DCT-III) ``D^T c``."""
  n = np.arange(s)
  d = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * s)) * np.sqrt(2.0 / s)
  d[0] /= np.sqrt(2.0)
  return d


@dataclasses.dataclass(frozen=True)
class DeMo:
  """DCT of every block, top-k coefficients, float32 values or 1-bit signs (module docstring)."""

  chunk: int = 64
  topk: int = 8
  two_d: bool = True
  sign: bool = True
  selected: bool = False  # outer.demo_aggregate=selected: per coefficient (:meth:`aggregate`)

  support = None  # see "Aggregation" in the module docstring

  def __post_init__(self):
    if self.block >= 1 << 16:
      raise ValueError(f"outer.demo_chunk={self.chunk}: a block of {self.block} values must be "
                       "< 65536 (indices are sent as uint16)")
    if not 1 <= self.topk <= self.block:
      raise ValueError(f"outer.demo_topk={self.topk} must be in [1, {self.block}] (the "
                       "coefficients of one block)")

  @property
  def block(self) -> int:
    return self.chunk * self.chunk if self.two_d else self.chunk

  @property
  def index_dtype(self):
    return jnp.uint8 if self.block < 1 << 8 else jnp.uint16

  @property
  def aggregates(self) -> bool:
    """The exchange averages through :meth:`aggregate`, not the decoded payloads' mean."""
    return self.selected

  @property
  def name(self) -> str:
    shape = f"{self.chunk}x{self.chunk}" if self.two_d else f"{self.chunk}"
    return (f"demo{self.topk}/{shape}@{'1b' if self.sign else '32b'}" +
            ("/sel" if self.selected else ""))

  # ---------------------------------------------------------------- the transform
  def _forward(self, x: jax.Array) -> jax.Array:
    """Rows of ``block`` values -> rows of ``block`` coefficients."""
    d = jnp.asarray(dct_matrix(self.chunk), jnp.float32)
    if self.two_d:
      tiles = x.reshape(-1, self.chunk, self.chunk)
      c = jnp.einsum("kn,rnm,lm->rkl", d, tiles, d, precision=_HIGHEST)
      return c.reshape(-1, self.block)
    return jnp.einsum("rn,kn->rk", x, d, precision=_HIGHEST)

  def _inverse(self, c: jax.Array) -> jax.Array:
    """Rows of coefficients -> the flat vector."""
    d = jnp.asarray(dct_matrix(self.chunk), jnp.float32)
    if self.two_d:
      tiles = c.reshape(-1, self.chunk, self.chunk)
      return jnp.einsum("kn,rkl,lm->rnm", d, tiles, d, precision=_HIGHEST).reshape(-1)
    return jnp.einsum("rk,kn->rn", c, d, precision=_HIGHEST).reshape(-1)

  def _scatter(self, idx: jax.Array, vals: jax.Array) -> jax.Array:
    """(index, value) rows -> dense coefficient rows; index ``block`` adds nothing."""
    out = jnp.zeros((idx.shape[0], self.block), jnp.float32)
    rows = jnp.arange(idx.shape[0])[:, None]
    return out.at[rows, idx.astype(jnp.int32)].add(vals, mode="drop")

  # ---------------------------------------------------------------- the codec
  def _select(self, x: jax.Array):
    coef = self._forward(x.reshape(-1, self.block))
    _, idx = jax.lax.top_k(jnp.abs(coef), self.topk)
    vals = jnp.take_along_axis(coef, idx, axis=-1)
    idx = jnp.where(vals == 0, self.block, idx)  # nothing to send
    return idx, vals

  def encode(self, x: jax.Array, key: jax.Array | None) -> dict:
    del key  # deterministic
    idx, vals = self._select(x)
    out = {"indices": idx.astype(self.index_dtype)}
    if not self.sign:
      out["values"] = vals
      return out
    pad = -self.topk % 8
    neg = jnp.pad((vals < 0).astype(jnp.uint8), ((0, 0), (0, pad)))
    out["signs"] = bits_lib.pack_bits(neg, 1)
    return out

  def _values(self, p: dict) -> jax.Array:
    if self.sign:
      neg = bits_lib.unpack_bits(p["signs"], 1)[:, :self.topk]
      return 1.0 - 2.0 * neg.astype(jnp.float32)
    return p["values"]

  def decode(self, p: dict) -> jax.Array:
    return self._inverse(self._scatter(p["indices"], self._values(p)))

  def aggregate(self, p: dict, sent: jax.Array) -> jax.Array:
    """The islands' payloads (leaves ``[M, ...]``) -> the flat average: each coefficient
    averaged over the islands in ``sent`` (``[M]`` bool) that kept it (0 where none did), then
    one inverse transform."""
    ok = sent.astype(jnp.float32)[:, None, None]
    total = jnp.sum(jax.vmap(lambda q: self._scatter(q["indices"], self._values(q)))(p) * ok,
                    axis=0)
    count = jnp.sum(jax.vmap(lambda q: self._scatter(
        q["indices"], jnp.ones(q["indices"].shape, jnp.float32)))(p) * ok, axis=0)
    return self._inverse(total / jnp.maximum(count, 1.0))

  def removed(self, x: jax.Array, p: dict) -> jax.Array:
    """What error feedback takes out of ``x`` (the vector ``p`` encodes): its kept coefficients
    at full precision, inverse-transformed (with float32 values: ``decode(p)``)."""
    if not self.sign:
      return self.decode(p)
    coef = self._forward(x.reshape(-1, self.block))
    idx = p["indices"].astype(jnp.int32)
    vals = jnp.take_along_axis(coef, jnp.minimum(idx, self.block - 1), axis=-1)
    return self._inverse(self._scatter(idx, vals))


def from_config(cfg) -> DeMo:
  """``config.outer`` (``demo_*``) -> :class:`DeMo`, one error line per bad option."""
  chunk, topk = int(cfg.demo_chunk), int(cfg.demo_topk)
  if chunk < 1:
    raise ValueError(f"outer.demo_chunk={chunk} must be >= 1")
  if cfg.stochastic_rounding:
    raise ValueError("outer.stochastic_rounding=True is not available with "
                     "outer.compression=demo (its codes are deterministic)")
  aggregate = cfg.get("demo_aggregate", "mean")
  if aggregate not in ("mean", "selected"):
    raise ValueError(f"outer.demo_aggregate={aggregate!r}: expected mean or selected")
  return DeMo(chunk, topk, bool(cfg.demo_2d), bool(cfg.demo_sign), aggregate == "selected")

