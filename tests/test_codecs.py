"""Codecs: round-trip error bounds, exact payload sizes, bit packing, top-k, error feedback."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_lm import codecs


def _codec(name, **kw):
  cfg = ml_collections.ConfigDict(dict(
      compression=name, quant_block=64, stochastic_rounding=False, topk_fraction=1 / 8,
      topk_chunk=64, topk_bits=2))
  cfg.update(kw)
  return codecs.from_config(cfg)


def _x(n=1024, seed=0):
  rng = np.random.default_rng(seed)
  # Blocks with very different scales, so a per-block scale matters.
  return jnp.asarray(rng.standard_normal(n) * np.repeat(10.0 ** rng.integers(-4, 2, n // 64), 64),
                     jnp.float32)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip(bits):
  q = jnp.asarray(np.random.default_rng(0).integers(0, 1 << bits, (3, 64)), jnp.uint8)
  packed = codecs.pack_bits(q, bits)
  assert packed.shape == (3, 64 * bits // 8) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(codecs.unpack_bits(packed, bits), q)


@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
def test_integer_codecs_within_half_a_step_per_block(name, qmax):
  codec, x = _codec(name), _x()
  err = np.abs(np.asarray(codec.decode(codec.encode(x, None)) - x)).reshape(-1, 64)
  step = np.abs(np.asarray(x)).reshape(-1, 64).max(axis=1) / qmax
  assert np.all(err <= step[:, None] / 2 * (1 + 1e-5) + 1e-30)
  assert np.all(err.max(axis=1) > step / 20)  # not trivially exact: the bound is near tight


@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased_within_one_step(name, qmax):
  codec, x = _codec(name, stochastic_rounding=True), _x(256)
  decoded = jax.vmap(lambda k: codec.decode(codec.encode(x, k)))(
      jax.random.split(jax.random.key(0), 2000))
  step = np.repeat(np.abs(np.asarray(x)).reshape(-1, 64).max(axis=1) / qmax, 64)
  assert np.all(np.abs(np.asarray(decoded - x)) <= step * (1 + 1e-5))
  # Mean of 2000 draws: within 4 standard errors (each draw's error has std <= step / 2).
  assert np.all(np.abs(np.asarray(decoded.mean(0) - x)) <= 4 * step / 2 / np.sqrt(2000) + 1e-30)


def test_bf16_relative_error_and_payload_dtype():
  codec, x = _codec("bf16"), _x()
  payload = codec.encode(x, None)
  assert payload["values"].dtype == jnp.uint16  # bf16 bit patterns: 2 bytes per value
  err = np.abs(np.asarray(codec.decode(payload) - x))
  assert np.all(err <= np.abs(np.asarray(x)) * 2.0**-8)


def test_payload_bytes_are_values_plus_scales_plus_indices():
  n = 4096
  assert codecs.payload_bytes(_codec("bf16"), n) == 2 * n
  assert codecs.payload_bytes(_codec("int8"), n) == n + 4 * n // 64
  assert codecs.payload_bytes(_codec("int4"), n) == n // 2 + 4 * n // 64
  # top-k: 8 of 64 per chunk; 2-bit codes (2 bytes), uint16 indices (16 bytes), f32 min/max.
  assert codecs.payload_bytes(_codec("topk"), n) == (n // 64) * (2 + 16 + 8)
  assert codecs.payload_bytes(_codec("topk", topk_bits=32), n) == (n // 64) * (32 + 16)


def test_topk_keeps_the_largest_per_chunk_exactly_with_32_bit_values():
  codec, x = _codec("topk", topk_bits=32), _x(256)
  out = np.asarray(codec.decode(codec.encode(x, None))).reshape(-1, 64)
  xs = np.asarray(x).reshape(-1, 64)
  for row, orig in zip(out, xs):
    kept = np.flatnonzero(row)
    assert len(kept) == 8
    assert set(kept) == set(np.argsort(-np.abs(orig))[:8])
    np.testing.assert_array_equal(row[kept], orig[kept])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_topk_quantized_values_keep_sign_within_bound(bits):
  codec, x = _codec("topk", topk_bits=bits), _x(256)
  out = np.asarray(codec.decode(codec.encode(x, None))).reshape(-1, 64)
  xs = np.asarray(x).reshape(-1, 64)
  levels = 2 ** (bits - 1) - 1
  for row, orig in zip(out, xs):
    top = np.argsort(-np.abs(orig))[:8]
    mags = np.abs(orig[top])
    bound = (mags.max() - mags.min()) / levels / 2
    assert np.all(np.sign(row[top]) == np.sign(orig[top]))
    assert np.all(np.abs(row[top] - orig[top]) <= bound * (1 + 1e-5) + 1e-30)
    assert np.count_nonzero(row) == 8


def test_error_feedback_eventually_sends_every_coordinate_of_a_fixed_vector():
  """Top-k keeps 8 of 64 per sync. Sending the same delta (magnitudes 1 ... 0.05) for 200
  syncs: with error feedback every coordinate is sent, sent + residual = 200 x delta exactly,
  and the residual stays bounded (below the top-k threshold, ~sum|delta| / k, not growing
  with the number of syncs); without it the small coordinates are never sent."""
  codec = _codec("topk", topk_bits=32)
  delta = jnp.asarray(np.linspace(1.0, 0.05, 64) * np.tile([1, -1], 32), jnp.float32)
  for beta, expect_all in ((1.0, True), (0.0, False)):
    residual, total, ever = jnp.zeros(64), np.zeros(64), np.zeros(64, bool)
    for _ in range(200):
      payload, residual = codecs.error_feedback_step(codec, beta, delta, residual, None)
      sent = np.asarray(codec.decode(payload))
      total += sent
      ever |= sent != 0
    assert ever.all() == expect_all
    if expect_all:
      np.testing.assert_allclose(total + np.asarray(residual), 200 * np.asarray(delta),
                                 rtol=1e-4)
      threshold = float(jnp.abs(delta).sum()) / 8
      assert np.abs(np.asarray(residual)).max() <= 2 * threshold < 200 * 0.05
    else:
      assert np.count_nonzero(total) == 8


def test_bad_codec_options_name_the_key():
  with pytest.raises(ValueError, match="outer.compression='int3'"):
    _codec("int3")
  with pytest.raises(ValueError, match="outer.topk_bits=3"):
    _codec("topk", topk_bits=3)
  with pytest.raises(ValueError, match="outer.quant_block=7"):
    _codec("int4", quant_block=7)
  with pytest.raises(ValueError, match="outer.topk_fraction"):
    _codec("topk", topk_fraction=0.0)


# ------------------------------------------------------------------ the battery, over CODECS
#
# One line per codec configuration: its outer.* options (on _codec's defaults: blocks and chunks
# of 64, top-k keeps 8 per chunk) and a numpy reference of the bound on |decode(encode(x)) - x|
# per coordinate. A new codec adds its line here; test_battery_covers_the_registry fails until
# it does.


def _blocks(x, qmax):
  """Per coordinate: its block's absmax / qmax (the integer codecs' step)."""
  return np.repeat(np.abs(x).reshape(-1, 64).max(axis=1) / qmax, 64)


def _kept(x):
  """Per chunk of 64: a mask of the 8 largest |x| (the reference top-k)."""
  rows = np.abs(x).reshape(-1, 64)
  mask = np.zeros(rows.shape, bool)
  np.put_along_axis(mask, np.argsort(-rows, axis=1)[:, :8], True, axis=1)
  return mask.reshape(-1)


def _topk_bound(steps):
  """Kept: ``steps`` grid steps of the chunk's kept |x| range over 2^(b-1) - 1 levels
  (b = 2 here; 0 steps: exact); dropped: |x|."""
  def bound(x):
    kept = _kept(x)
    mags = np.where(kept, np.abs(x), np.nan).reshape(-1, 64)
    step = (np.nanmax(mags, axis=1) - np.nanmin(mags, axis=1)) / (2 ** (2 - 1) - 1)
    return np.where(kept, np.repeat(steps * step, 64), np.abs(x))
  return bound


def _sigma_bound(x):
  """Kept: the chunk's kept range (a kept value decodes to its bin's mean, which lies between
  the chunk's smallest and largest kept value); dropped: |x|."""
  kept = _kept(x)
  vals = np.where(kept, x, np.nan).reshape(-1, 64)
  spread = np.nanmax(vals, axis=1) - np.nanmin(vals, axis=1)
  return np.where(kept, np.repeat(spread + 1e-6 * np.nanmax(np.abs(vals), axis=1), 64),
                  np.abs(x))


def _dct_rows(s):
  """The orthonormal DCT-II matrix, from its formula: D[k, n] = a_k cos(pi (2n + 1) k / 2s)."""
  k, n = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
  scale = np.where(k == 0, np.sqrt(1 / s), np.sqrt(2 / s))
  return scale * np.cos(np.pi * (2 * n + 1) * k / (2 * s))


def _demo_values_bound(x):
  """1-D DCT of chunks of 64, 8 kept, float32 values: a coordinate's error is a coordinate of
  the inverse transform of the dropped coefficients, so at most their norm (D is orthonormal)."""
  coef = x.reshape(-1, 64) @ _dct_rows(64).T
  dropped = np.sort(coef ** 2, axis=1)[:, :-8].sum(axis=1)
  return np.repeat(np.sqrt(dropped), 64) * (1 + 1e-4) + 1e-6 * np.abs(x).max()


def _demo_signs_bound(x):
  """8 x 8 tiles, 8 kept, each decoded +-1: a decoded coordinate is at most 8 max|D|^2 = 8 / 4
  (scale-free; the exact value is tests/test_demo.py's)."""
  return np.abs(x) + 8 * (2 / 8)


class Case(NamedTuple):
  config: dict  # outer.* overrides on _codec's defaults; "compression" names the codec
  bound: Callable[[np.ndarray], np.ndarray]  # x -> per-coordinate bound on the round trip


BATTERY = {
    "bf16": Case(dict(compression="bf16"), lambda x: np.abs(x) * 2.0**-8),
    "fp16": Case(dict(compression="fp16"), lambda x: np.abs(x) * 2.0**-11 + 2.0**-25),
    "int8": Case(dict(compression="int8"), lambda x: _blocks(x, 127) / 2),
    "int8/stochastic": Case(dict(compression="int8", stochastic_rounding=True),
                            lambda x: _blocks(x, 127)),
    "int4": Case(dict(compression="int4"), lambda x: _blocks(x, 7) / 2),
    "topk": Case(dict(compression="topk"), _topk_bound(0.5)),
    "topk/stochastic": Case(dict(compression="topk", stochastic_rounding=True), _topk_bound(1.0)),
    "topk@32b": Case(dict(compression="topk", topk_bits=32), _topk_bound(0.0)),
    "topk/sigma/selected": Case(dict(compression="topk", topk_quantizer="sigma",
                                     topk_aggregate="selected"), _sigma_bound),
    "demo": Case(dict(compression="demo", demo_chunk=8, demo_topk=8, demo_2d=True,
                      demo_sign=True), _demo_signs_bound),
    "demo/1d@32b": Case(dict(compression="demo", demo_chunk=64, demo_topk=8, demo_2d=False,
                             demo_sign=False), _demo_values_bound),
}


def _battery_codec(case):
  return _codec(case.config["compression"], **case.config)


def test_battery_covers_the_registry():
  tested = {case.config["compression"] for case in BATTERY.values()}
  assert tested == set(codecs.CODECS) - {"none"}
  assert codecs.from_config(ml_collections.ConfigDict(dict(compression="none"))) is None


@pytest.mark.parametrize("name", BATTERY)
def test_battery_round_trip_within_the_numpy_bound(name):
  case = BATTERY[name]
  codec, x = _battery_codec(case), _x()
  out = codec.decode(codec.encode(x, jax.random.key(1)))
  assert out.shape == x.shape and out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - np.asarray(x))
  assert np.all(err <= case.bound(np.asarray(x)) * (1 + 1e-5) + 1e-30)
  assert err.max() > 0  # lossy on this x: the bound is what is being tested


@pytest.mark.parametrize("name", BATTERY)
def test_battery_payload_bytes_are_the_encoded_arrays(name):
  codec, x = _battery_codec(BATTERY[name]), _x()
  payload = codec.encode(x, jax.random.key(1))
  leaves = jax.tree.leaves(payload)
  assert codecs.payload_bytes(codec, x.size) == sum(leaf.nbytes for leaf in leaves)
  assert all(leaf.shape[0] == x.size // codec.block for leaf in leaves)
  padded = codecs.padded_size(x.size - 1, codec, 2)
  assert padded % (2 * codec.block) == 0 and x.size - 1 < padded <= x.size - 1 + 2 * codec.block


@pytest.mark.parametrize("name", BATTERY)
def test_battery_jit_and_vmap_equal_eager(name):
  codec, xs = _battery_codec(BATTERY[name]), jnp.stack([_x(seed=s) for s in range(3)])
  keys = jax.random.split(jax.random.key(2), 3)
  eager = [codec.decode(codec.encode(x, k)) for x, k in zip(xs, keys)]
  jitted = [jax.jit(lambda x, k: codec.decode(codec.encode(x, k)))(x, k) for x, k in zip(xs, keys)]
  vmapped = jax.vmap(codec.decode)(jax.vmap(codec.encode)(xs, keys))
  for e, j, v in zip(eager, jitted, vmapped):
    np.testing.assert_allclose(j, e, rtol=1e-6, atol=0)
    np.testing.assert_allclose(v, e, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", BATTERY)
def test_battery_error_feedback_residual_identity(name):
  """``residual' = (beta residual + delta) - decode(payload)``, payload = encode of the same
  (``codec.removed(e, payload)`` instead of the decode where the codec has one)."""
  codec = _battery_codec(BATTERY[name])
  delta, residual, key = _x(seed=1), _x(seed=2) / 3, jax.random.key(3)
  removed = getattr(codec, "removed", lambda e, p: codec.decode(p))
  for beta in (1.0, 0.5):
    payload, new = codecs.error_feedback_step(codec, beta, delta, residual, key)
    e = beta * residual + delta
    np.testing.assert_array_equal(new, e - removed(e, codec.encode(e, key)))
    jax.tree.map(np.testing.assert_array_equal, payload, codec.encode(e, key))


@pytest.mark.parametrize("name", BATTERY)
def test_battery_support_marks_what_was_sent(name):
  codec, x = _battery_codec(BATTERY[name]), _x()
  if codec.support is None:
    assert BATTERY[name].config.get("topk_aggregate", "mean") == "mean"
    return
  payload = codec.encode(x, None)
  support, decoded = np.asarray(codec.support(payload)), np.asarray(codec.decode(payload))
  np.testing.assert_array_equal(support, _kept(np.asarray(x)).astype(np.float32))
  assert np.all(decoded[support == 0] == 0)
