"""DeMo / DisTrO (Peng et al. 2024, arXiv 2411.19870) through the engine, against an independent
numpy reference of the paper's Algorithm 1 with Psyche's 1-bit signs; the codec against numpy
(transform, top-k, signs, exact bytes); identities (every coefficient kept at float32 is
lossless: the run is FedAvg's / DiLoCo's; beta = 0 keeps no memory); config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from fedjax_lm import codecs
from fedjax_lm import config_lib
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib


# ------------------------------------------------------------------ the numpy reference

def _np_dct(s):
  """Orthonormal DCT-II, written from its definition: C[k] = a_k sum_n x[n] cos(pi (2n+1) k
  / 2s), a_0 = sqrt(1/s), a_k = sqrt(2/s); its inverse (DCT-III) is the transpose."""
  d = np.empty((s, s))
  for k in range(s):
    for n in range(s):
      d[k, n] = np.sqrt((1.0 if k else 0.5) * 2.0 / s) * np.cos(np.pi * (2 * n + 1) * k / (2 * s))
  return d


def _np_forward(x, s, two_d):
  """Flat x -> one row of coefficients per block (s values, or an s x s tile of s runs of s)."""
  d = _np_dct(s)
  if two_d:
    return np.stack([(d @ t @ d.T).reshape(-1) for t in x.reshape(-1, s, s)])
  return x.reshape(-1, s) @ d.T


def _np_inverse(c, s, two_d):
  d = _np_dct(s)
  if two_d:
    return np.concatenate([(d.T @ t @ d).reshape(-1) for t in c.reshape(-1, s, s)])
  return (c @ d).reshape(-1)


def _np_fast_components(m, s, k, two_d):
  """ExtractFastComponents: per block, the k largest |DCT coefficient| of m, the rest zeroed
  (coefficient rows) and a mask of the kept ones (a coefficient that is exactly 0 is not sent)."""
  coef = _np_forward(m.astype(np.float64), s, two_d)
  kept = np.zeros(coef.shape, bool)
  np.put_along_axis(kept, np.argsort(-np.abs(coef), axis=1, kind="stable")[:, :k], True, axis=1)
  kept &= coef != 0
  return np.where(kept, coef, 0.0), kept


def _reference(y, *, lr_in, every, rounds, s, k, two_d, sign, beta, lr, aggregate):
  """DeMo on loss 0.5 |x - y_r|^2 per worker. Each worker takes ``every`` SGD steps from the
  shared x (DeMo: one; its gradient times the lr is ``x - local``), then, from Algorithm 1:

    Delta_r <- beta Delta_r + (x - local_r)          (decoupled momentum)
    q_r     <- ExtractFastComponents(Delta_r, s, k)  (DCT, top-k)
    Delta_r <- Delta_r - IDCT(q_r)                   (at full precision, also with signs)
    Q       <- IDCT(Synchronize(q_r, or sign(q_r) on the kept: Psyche's 1-bit, decoded +-1))
    x       <- x - lr sign(Q)                        (signum)

  Synchronize: ``duplicates`` averages each coefficient over the workers that kept it (the
  authors' scatter-mean; at M = 1 the identity), ``mean`` over all workers (the engine's).
  Returns (x, every Delta_r, every round's Q)."""
  m, n = y.shape
  x, delta = np.zeros(n), np.zeros((m, n))
  qs = []
  for _ in range(rounds):
    local = np.repeat(x[None], m, axis=0)
    for _ in range(every):
      local = local - lr_in * (local - y)
    total = np.zeros((n // (s * s if two_d else s), s * s if two_d else s))
    count = np.zeros_like(total)
    for r in range(m):
      delta[r] = beta * delta[r] + (x - local[r])
      q, kept = _np_fast_components(delta[r], s, k, two_d)
      delta[r] = delta[r] - _np_inverse(q, s, two_d)
      total += np.where(kept, np.sign(q), 0.0) if sign else q
      count += kept
    agg = total / np.maximum(count, 1) if aggregate == "duplicates" else total / m
    big_q = _np_inverse(agg, s, two_d)
    qs.append(big_q)
    x = x - lr * np.sign(big_q)
  return x, delta, qs


# ------------------------------------------------------------------ the engine on that problem

_SHAPES = {"a": (1024,), "w": (32, 64)}  # flattened in tree order: a, then w row-major


def _problem(m, seed=7):
  rng = np.random.default_rng(seed)
  scales = np.repeat(10.0 ** rng.uniform(-2, 0, 3072 // 64), 64)
  y = rng.standard_normal((m, 3072)) * scales
  if m > 1:  # the workers share part of their signal, so their kept sets partly overlap
    y[1] = 0.5 * y[0] + 0.5 * y[1]
  return y.astype(np.float32)


def _engine_run(y, overrides, *, every, rounds, lr_in=0.5):
  m = y.shape[0]
  config = tiny_config(**{"algorithm": "islands", "islands.num": m, "outer.sync_every": every,
                          "total_steps": every * rounds, **overrides})
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  alg = engine.build_for_loss(
      config, mesh,
      loss_fn=lambda p, b: 0.5 * (jnp.sum((p["a"] - b["y"][0, :1024]) ** 2) +
                                  jnp.sum((p["w"].reshape(-1) - b["y"][0, 1024:]) ** 2)),
      init_fn=lambda key: {name: jnp.zeros(s) for name, s in _SHAPES.items()},
      abstract_params={name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in _SHAPES.items()},
      param_specs={"a": P(None), "w": P(None, None)}, inner_tx=optax.sgd(lr_in))
  state = alg.init(jax.random.key(0))
  batch = {"y": jnp.asarray(y)[:, None, :]}
  for step in range(1, every * rounds + 1):
    state, _ = alg.inner_step(state, batch)
    state = alg.sync(state, step)
  return alg, state


def _flat(tree, lead=None):
  if lead is None:
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["w"]).reshape(-1)])
  return np.concatenate([np.asarray(tree["a"]).reshape(lead, -1),
                         np.asarray(tree["w"]).reshape(lead, -1)], axis=1)


def _demo(s, k, two_d, sign, beta, lr):
  return {"outer.compression": "demo", "outer.demo_chunk": s, "outer.demo_topk": k,
          "outer.demo_2d": two_d, "outer.demo_sign": sign, "outer.error_feedback": beta,
          "outer.optimizer": "sign_sgd", "outer.learning_rate": lr,
          "outer.hparams_for": "sign_sgd"}


@pytest.mark.parametrize("m,every,s,k,two_d,sign,beta,selected", [
    (1, 1, 8, 8, True, True, 0.999, False),    # Psyche's form (8 x 8 tiles), DeMo's every step
    (2, 1, 8, 8, True, True, 0.999, False),
    (2, 2, 16, 4, False, False, 0.9, False),   # 1-D chunks, float32 values, H = 2
    (2, 1, 16, 4, False, True, 0.0, False),    # beta = 0: no memory
    # outer.demo_aggregate=selected: the paper's per-coefficient average at M = 2 and 3
    (2, 1, 8, 8, True, True, 0.999, True),
    (3, 2, 16, 4, False, False, 0.9, True),
])
def test_demo_matches_numpy_reference(m, every, s, k, two_d, sign, beta, selected):
  """M workers, 3072 parameters in two leaves, 4 rounds: the global params, each worker's
  momentum (error-feedback residual) and the bytes sent. At M = 1, and with
  ``outer.demo_aggregate=selected``, the reference is the paper's Synchronize (each coefficient
  averaged over the workers that kept it); else the engine's mean over the islands that sent
  (``fedjax_lm/codecs/demo.py``: Aggregation); the bytes are the same either way. Signum moves each
  coordinate by exactly +-lr, so a sign flipped by float32 rounding would show as a 2 lr
  error: the reference asserts every round's nonzero |Q| is far above float32 rounding (seed 7
  is one where it is)."""
  rounds, lr = 4, 0.01
  y = _problem(m)
  x, delta, qs = _reference(y.astype(np.float64), lr_in=0.5, every=every, rounds=rounds, s=s,
                            k=k, two_d=two_d, sign=sign, beta=beta, lr=lr,
                            aggregate="duplicates" if m == 1 or selected else "mean")
  for q in qs:  # well posed: no sign decided by rounding (float32's is ~1e-7 of the block's max)
    per_block = np.abs(q).reshape(-1, s * s if two_d else s)
    ratio = per_block / np.maximum(per_block.max(axis=1, keepdims=True), 1e-30)
    assert ratio[per_block != 0].min() > 1e-5
  over = {**_demo(s, k, two_d, sign, beta, lr),
          "outer.demo_aggregate": "selected" if selected else "mean"}
  alg, state = _engine_run(y, over, every=every, rounds=rounds)
  if selected:  # the paper's average differs from the mean here: the test can tell them apart
    _, _, mean_qs = _reference(y.astype(np.float64), lr_in=0.5, every=every, rounds=rounds, s=s,
                               k=k, two_d=two_d, sign=sign, beta=beta, lr=lr, aggregate="mean")
    assert not all(np.allclose(np.sign(a), np.sign(b)) for a, b in zip(qs, mean_qs))
  np.testing.assert_allclose(_flat(state.server.params), x, rtol=0, atol=1e-6)
  if beta > 0:
    np.testing.assert_allclose(_flat(state.islands.codec.residual, lead=m), delta, rtol=1e-4,
                               atol=1e-5)
  else:  # no residual is kept: DeMo's memory at beta = 0 is only the round's own delta
    assert not jax.tree.leaves(state.islands.codec)
  blocks = 3072 // (s * s if two_d else s)
  per_block = k * 1 + (-(-k // 8) if sign else 4 * k)  # uint8 indices (blocks < 256 here)
  # (one island has no one to send to: the engine counts nothing)
  assert alg.island_bytes(every * rounds) == (rounds * blocks * per_block if m > 1 else 0)


@pytest.mark.parametrize("outer_opt,extra", [("fedavg", {}), ("diloco", {})])
def test_every_coefficient_at_float32_is_lossless_so_the_run_is_the_uncompressed_one(outer_opt,
                                                                                      extra):
  """DCT with k = block and float32 values loses only rounding (D is orthonormal): the run,
  error feedback and all, equals the uncompressed run with the same outer optimizer."""
  y = _problem(2)
  base = {"outer.optimizer": outer_opt, **extra}
  _, plain = _engine_run(y, base, every=3, rounds=3)
  lossless = {**base, "outer.compression": "demo", "outer.demo_chunk": 8, "outer.demo_topk": 64,
              "outer.demo_2d": True, "outer.demo_sign": False, "outer.error_feedback": 0.9}
  _, demo = _engine_run(y, lossless, every=3, rounds=3)
  np.testing.assert_allclose(_flat(demo.server.params), _flat(plain.server.params), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(_flat(demo.islands.codec.residual, lead=2)).max() < 1e-5


# ------------------------------------------------------------------ the codec against numpy

def _codec(**kw):
  cfg = ml_collections.ConfigDict(dict(compression="demo", stochastic_rounding=False,
                                       demo_chunk=8, demo_topk=8, demo_2d=True, demo_sign=True))
  cfg.update(kw)
  return codecs.from_config(cfg)


@pytest.mark.parametrize("s,k,two_d,sign", [(8, 8, True, True), (8, 3, True, False),
                                            (16, 4, False, True), (64, 8, False, False),
                                            (16, 13, True, True)])
def test_codec_round_trip_equals_numpy(s, k, two_d, sign):
  """decode = IDCT of the kept coefficients (or of +-1 on them); removed = IDCT of the kept
  coefficients at full precision; the kept set is numpy's top-k; bytes are exact."""
  codec = _codec(demo_chunk=s, demo_topk=k, demo_2d=two_d, demo_sign=sign)
  block = s * s if two_d else s
  rng = np.random.default_rng(s + k)
  x = (rng.standard_normal(4 * block) * np.repeat(10.0 ** rng.uniform(-3, 1, 4), block))
  x = x.astype(np.float32)
  payload = codec.encode(jnp.asarray(x), None)
  q, kept = _np_fast_components(x, s, k, two_d)
  sent = np.where(kept, np.sign(q), 0.0) if sign else q
  np.testing.assert_allclose(codec.decode(payload), _np_inverse(sent, s, two_d), rtol=1e-5,
                             atol=1e-5 * (1 if sign else np.abs(x).max()))
  np.testing.assert_allclose(codec.removed(jnp.asarray(x), payload), _np_inverse(q, s, two_d),
                             rtol=1e-5, atol=1e-6 * np.abs(x).max())
  idx = np.asarray(payload["indices"]).astype(int)
  assert [set(row) for row in idx] == [set(np.flatnonzero(row)) for row in kept]
  index_bytes = 1 if block < 256 else 2
  want = 4 * (k * index_bytes + (-(-k // 8) if sign else 4 * k))
  assert codecs.payload_bytes(codec, x.size) == want == sum(
      leaf.nbytes for leaf in jax.tree.leaves(payload))


def test_forward_transform_is_numpys_orthonormal_dct():
  """All 64 coefficients of an 8 x 8 tile at float32 are numpy's D X D^T, in row-major order."""
  codec = _codec(demo_topk=64, demo_sign=False)
  x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
  payload = codec.encode(jnp.asarray(x), None)
  got = np.zeros((2, 64))
  np.put_along_axis(got, np.asarray(payload["indices"]).astype(int),
                    np.asarray(payload["values"]), axis=1)
  np.testing.assert_allclose(got, _np_forward(x.astype(np.float64), 8, True), rtol=1e-5,
                             atol=1e-6)


def test_zero_blocks_send_nothing():
  """A block with fewer than k nonzero coefficients (all zero here: padding, a frozen weight)
  sends the rest with index ``block``, which decodes to nothing; with signs, Psyche would
  decode them +1 and the sign step would move the block."""
  codec = _codec()
  x = np.zeros(128, np.float32)
  x[64:67] = [1.0, -2.0, 0.5]
  out = np.asarray(codec.decode(codec.encode(jnp.asarray(x), None)))
  assert not out[:64].any() and out[64:].any()


def test_paper_config_builds_psyches_codec():
  from configs import shakespeare_demo  # pylint: disable=g-import-not-at-top
  c = shakespeare_demo.get_config()
  config_lib.validate(c)
  codec = codecs.from_config(c.outer)
  assert codec.name == "demo8/64x64@1b" and codec.block == 4096
  assert (c.outer.optimizer, c.outer.sync_every, c.outer.error_feedback) == ("sign_sgd", 1, 0.999)
  assert codecs.payload_bytes(codec, 4096) == 8 * 2 + 1  # Psyche: uint16 indices, 1-bit signs


@pytest.mark.parametrize("kw,match", [
    ({"demo_topk": 65}, r"outer.demo_topk=65 must be in \[1, 64\]"),
    ({"demo_chunk": 0}, "outer.demo_chunk=0"),
    ({"demo_chunk": 256}, "outer.demo_chunk=256"),  # 65536-value tiles: past uint16 indices
    ({"stochastic_rounding": True}, "outer.stochastic_rounding")])
def test_bad_codec_options_name_the_key(kw, match):
  with pytest.raises(ValueError, match=match):
    _codec(**kw)


@pytest.mark.parametrize("dotted,match", [
    ({"outer.demo_topk": 0}, "outer.demo_topk=0 must be >= 1"),
    ({"outer.demo_chunk": -1}, "outer.demo_chunk=-1 must be >= 1"),
    ({"outer.optimizer": "diloco"}, "outer.demo_sign=True .* needs outer.optimizer=sign_sgd"),
    ({"outer.demo_topk": 5000}, r"outer.demo_topk=5000 must be in \[1, 4096\]")])
def test_config_validate_names_the_key(dotted, match):
  c = config_lib.base_config()
  config_lib.override(c, {"algorithm": "islands", "islands.num": 2, "outer.compression": "demo",
                          "outer.optimizer": "sign_sgd", **dotted})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)
