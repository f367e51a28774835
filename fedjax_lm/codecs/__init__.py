"""Codecs for what crosses the island axis, and error feedback.

A codec turns one island's flat float32 pseudo-gradient ``x[n]`` (``n`` a multiple of
``codec.block``) into a *payload*: a dict of small-dtype arrays whose leading dim is the number
of blocks ``n // block``. The payload is what the islands exchange (an all-gather over
``island``); every island decodes every payload and averages in float32. ``payload_bytes`` is
exactly what one island sends: values + scales + indices, padding included.

======= ================== ========================================== ======================
name    module             payload per block of ``block`` values      |decode(encode(x)) - x|
======= ================== ========================================== ======================
bf16    :mod:`.cast`       bfloat16 values                            <= 2^-8 |x|
fp16    :mod:`.fp16`       float16 values (clipped to +-65504)        <= 2^-11 |x| + 2^-25
int8    :mod:`.blockquant` int8 in [-127, 127] + f32 absmax scale     <= s / 2, s = absmax/127
int4    :mod:`.blockquant` 4-bit in [-7, 7] packed 2 per byte + scale <= s / 2, s = absmax/7
topk    :mod:`.topk`       k largest |x| per chunk: uint16 index +    kept (minmax): <= half
                           b-bit sign + magnitude code (minmax) or    a step of the grid from
                           bin of the kept distribution (sigma,       the kept min to max |x|;
                           SparseLoCo) + f32 min/max or bin table     dropped: |x|
demo    :mod:`.demo`       DeMo: k largest DCT coefficients of a      f32 values: the dropped
                           chunk (or s x s tile): uint8/16 index +    coefficients' norm;
                           f32 value or 1-bit sign (decoded +-1)      signs: none (scale-free)
======= ================== ========================================== ======================

With ``outer.stochastic_rounding`` the integer codes round up with probability equal to the
fractional part (unbiased; the bound becomes s). Each module's docstring gives its format.

**A codec** is any object with the :class:`Codec` attributes (each module's is a frozen
dataclass of its parameters with ``encode`` / ``decode`` methods). **Adding one** takes its
module here (the dataclass and ``from_config(outer_config)``), its line in :data:`CODECS`, and
its line in the battery of ``tests/test_codecs.py`` (``BATTERY``: config and numpy error bound),
which checks every registered codec for the round-trip bound, exact payload bytes, jit, vmap and
the error-feedback identity.

Error feedback (Seide et al. 2014; SparseLoCo's form): each island keeps a residual ``e`` of
what it has not yet sent; at a sync ``e <- beta * e + delta``, the island sends ``C(e)`` and
keeps ``e <- e - decode(C(e))``. ``beta = 1`` is classic error feedback. A codec whose decoded
payload is not what leaves the residual (DeMo's 1-bit signs, decoded +-1, remove the kept
coefficients at full precision) says so with ``removed(e, payload)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from fedjax_lm.codecs import blockquant
from fedjax_lm.codecs import cast
from fedjax_lm.codecs import demo
from fedjax_lm.codecs import fp16
from fedjax_lm.codecs import topk
from fedjax_lm.codecs.bits import pack_bits, unpack_bits  # noqa: F401 (public names)
from fedjax_lm.codecs.topk import sigma_quantize  # noqa: F401 (public name)

TOPK_QUANTIZERS = topk.QUANTIZERS
TOPK_AGGREGATES = topk.AGGREGATES


class Codec(Protocol):
  """Flat float32 ``x[n]`` (``n % block == 0``) <-> payload dict of ``[n // block, ...]``."""

  name: str  # for logs and tables, e.g. "int4", "topk8/256@2b/6sigma/selected"
  block: int  # values per payload row; the flat vector is padded to whole blocks

  def encode(self, x: jax.Array, key: jax.Array | None) -> dict:
    """x (float32 [n]) and a PRNG key (stochastic rounding) or None -> payload."""

  def decode(self, payload: dict) -> jax.Array:
    """payload -> x (float32 [n])."""

  # payload -> float32 0/1 per coordinate (1: sent), read by engine.links.exchange to average
  # each coordinate over the islands that sent it; None to average over all that sent a payload
  support: Callable[[dict], jax.Array] | None

  # optional: ``removed(x, payload)``, what error feedback takes out of the residual x that
  # ``payload`` encodes; a codec without it removes ``decode(payload)``


# The registry: ``outer.compression`` -> builder(config.outer) -> codec, None for float32 leaves
# averaged by all-reduce. One line per codec.
CODECS: dict[str, Callable[[Any], Codec | None]] = {
    "none": lambda cfg: None,
    "bf16": cast.from_config,
    "fp16": fp16.from_config,
    "int8": functools.partial(blockquant.from_config, bits=8),
    "int4": functools.partial(blockquant.from_config, bits=4),
    "topk": topk.from_config,
    "demo": demo.from_config,
}


def from_config(cfg) -> Codec | None:
  """``config.outer`` -> codec, or None for uncompressed float32 (exchanged by all-reduce)."""
  name = cfg.compression
  if name not in CODECS:
    raise ValueError(f"outer.compression={name!r}: expected one of {tuple(CODECS)}")
  return CODECS[name](cfg)


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
  """One island: ``e <- beta e + delta``; send ``C(e)``; keep ``e - decode(C(e))`` (or
  ``e - codec.removed(e, C(e))``)."""
  e = beta * residual + delta
  payload = codec.encode(e, key)
  removed = getattr(codec, "removed", None)
  return payload, e - (codec.decode(payload) if removed is None else removed(e, payload))
