"""SparseLoCo (Sarfi et al. 2025, arXiv 2508.15706): an independent numpy reference of the
method against the engine, the statistical quantizer's round trip, sparse aggregation, exact
bytes and config errors."""

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


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(
      compression="topk", quant_block=64, stochastic_rounding=False, topk_fraction=1 / 32,
      topk_chunk=256, topk_bits=2, topk_quantizer="sigma", topk_sigmas=6.0,
      topk_aggregate="selected"))
  cfg.update(kw)
  return cfg


# ------------------------------------------------------------------ the numpy reference

def _np_quantize(v, bins, sigmas):
  """One chunk's kept values -> their decoded values: 2^b bins of width sigmas sd / 2^b around
  the mean, code = round(centred / width) + 2^(b-1) clipped, decoded to the bin's mean."""
  mu = v.mean(dtype=np.float32)
  c = (v - mu).astype(np.float32)
  sd = np.sqrt(np.sum(c * c, dtype=np.float32) / max(len(v) - 1, 1))
  width = np.float32(sigmas * sd / bins)
  if not width > 0:
    width = np.float32(1.0)
  q = np.clip(np.round(c / width + bins // 2), 0, bins - 1).astype(int)
  out = np.empty_like(v)
  for b in np.unique(q):
    out[q == b] = np.float32(c[q == b].mean(dtype=np.float32)) + mu
  return out


def _np_compress(e, chunk, k, bins, sigmas):
  """Per chunk: the k largest |e|, quantized. Returns (sent values as a dense vector, kept
  mask)."""
  sent, kept = np.zeros_like(e), np.zeros(e.shape, bool)
  for start in range(0, len(e), chunk):
    seg = e[start:start + chunk]
    idx = np.argsort(-np.abs(seg), kind="stable")[:k]
    sent[start + idx] = _np_quantize(seg[idx], bins, sigmas)
    kept[start + idx] = True
  return sent, kept


def _reference(y, *, lr_in, every, rounds, chunk, k, beta, alpha, bins=4, sigmas=6.0,
               selected=True):
  """SparseLoCo on loss 0.5 |x - y_r|^2 per replica (inner SGD), from the paper's update:
  delta_r = global - local_r; e_r <- beta e_r + delta_r; s_r = Q(TopK(e_r)); e_r <- e_r - s_r;
  agg = per coordinate the mean of s_r over the replicas that kept it (sparse aggregation;
  ``selected=False``: over all replicas); global <- global - alpha agg; replicas restart from
  global."""
  m, n = y.shape
  g, e = np.zeros(n, np.float32), np.zeros((m, n), np.float32)
  local = np.zeros((m, n), np.float32)
  for _ in range(rounds):
    for _ in range(every):
      local = local - np.float32(lr_in) * (local - y)
    delta = g[None] - local
    total, count = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for r in range(m):
      e[r] = np.float32(beta) * e[r] + delta[r]
      sent, kept = _np_compress(e[r], chunk, k, bins, sigmas)
      e[r] = e[r] - sent
      total += sent
      count += kept
    agg = total / np.maximum(count, 1) if selected else total / m
    g = g - np.float32(alpha) * agg
    local = np.repeat(g[None], m, axis=0)
  return g, e


@pytest.mark.parametrize("alpha,beta,selected", [(1.0, 0.95, True), (0.8, 0.6, True),
                                                 (1.0, 0.95, False)])
def test_sparseloco_matches_numpy_reference(one_device, alpha, beta, selected):
  """2 replicas, 3072 parameters in two leaves (12 chunks of 256, k = 8), H = 3, 3 outer rounds;
  global params and each replica's error-feedback residual. Tolerance 1e-5 relative / 1e-6
  absolute: both sides compute in float32, in different orders (sums, the mean and sd), so
  they agree to a few ulps; a different top-k choice or bin would be off by O(1) of a value."""
  m, every, rounds, chunk, k = 2, 3, 3, 256, 8
  rng = np.random.default_rng(3)
  scales = np.repeat(10.0 ** rng.uniform(-2, 0, 3072 // 64), 64)
  y = (rng.standard_normal((m, 3072)) * scales).astype(np.float32)
  # the replicas share part of their signal, so their top-k sets partly overlap
  y[1] = (0.5 * y[0] + 0.5 * y[1]).astype(np.float32)
  config = tiny_config(**{
      "algorithm": "islands", "islands.num": m, "outer.sync_every": every,
      "outer.optimizer": "fedavg", "outer.learning_rate": alpha, "outer.hparams_for": "fedavg",
      "outer.compression": "topk", "outer.topk_chunk": chunk, "outer.topk_fraction": k / chunk,
      "outer.topk_bits": 2, "outer.topk_quantizer": "sigma", "outer.topk_sigmas": 6.0,
      "outer.topk_aggregate": "selected" if selected else "mean",
      "outer.error_feedback": beta, "total_steps": every * rounds})
  shapes = {"a": (1024,), "w": (32, 64)}  # flattened in tree order: a, then w row-major
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, one_device)
  alg = engine.build_for_loss(
      config, mesh,
      loss_fn=lambda p, b: 0.5 * (jnp.sum((p["a"] - b["y"][0, :1024]) ** 2) +
                                  jnp.sum((p["w"].reshape(-1) - b["y"][0, 1024:]) ** 2)),
      init_fn=lambda key: {name: jnp.zeros(s) for name, s in shapes.items()},
      abstract_params={name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in shapes.items()},
      param_specs={"a": P(None), "w": P(None, None)}, inner_tx=optax.sgd(0.5))
  state = alg.init(jax.random.key(0))
  batch = {"y": jnp.asarray(y)[:, None, :]}
  for step in range(1, every * rounds + 1):
    state, _ = alg.inner_step(state, batch)
    state = alg.sync(state, step)
  g, e = _reference(y, lr_in=0.5, every=every, rounds=rounds, chunk=chunk, k=k, beta=beta,
                    alpha=alpha, selected=selected)
  got = np.concatenate([np.asarray(state.server.params["a"]),
                        np.asarray(state.server.params["w"]).reshape(-1)])
  np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-6)
  res = state.islands.codec.residual  # shaped like the params, [M, ...] leaves
  got_e = np.concatenate([np.asarray(res["a"]).reshape(m, -1),
                          np.asarray(res["w"]).reshape(m, -1)], axis=1)
  np.testing.assert_allclose(got_e, e, rtol=1e-5, atol=1e-6)
  for leaf in ("a", "w"):  # the replicas restarted from the new global params
    np.testing.assert_allclose(state.islands.params[leaf],
                               np.repeat(state.server.params[leaf][None], m, 0), rtol=0, atol=0)
  # 3 sends of 12 chunks: 8 packed 2-bit codes (2 B), 8 uint16 indices, 4 float32 bin means
  assert alg.island_bytes(every * rounds) == 3 * 12 * (2 + 16 + 16)


def test_sparse_aggregation_differs_from_the_mean_where_only_one_replica_kept():
  """A coordinate kept by one replica gets its value whole (selected), or half (mean)."""
  c_sel = codecs.from_config(_cfg(topk_bits=32))
  c_mean = codecs.from_config(_cfg(topk_bits=32, topk_aggregate="mean"))
  x = np.zeros((2, 256), np.float32)
  x[0, :8], x[1, 4:12] = 10.0, 20.0  # overlap on 4..7
  payload = jax.vmap(lambda v: c_sel.encode(v, None))(jnp.asarray(x))
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  from fedjax_lm.engine import links  # pylint: disable=g-import-not-at-top
  w = jnp.ones((2,), jnp.float32)
  sel = np.asarray(links.exchange(c_sel, payload, w, mesh, links.Gathered()))
  mean = np.asarray(links.exchange(c_mean, payload, w, mesh, links.Gathered()))
  np.testing.assert_array_equal(sel[:4], 10.0)
  np.testing.assert_array_equal(sel[4:8], 15.0)
  np.testing.assert_array_equal(sel[8:12], 20.0)
  np.testing.assert_array_equal(mean[:4], 5.0)
  np.testing.assert_array_equal(mean[8:12], 10.0)
  assert not sel[12:].any() and not mean[12:].any()
  # an absent replica (weight 0) is left out of both the values and the counts
  w0 = jnp.asarray([1.0, 0.0])
  sel0 = np.asarray(links.exchange(c_sel, payload, w0, mesh, links.Gathered()))
  np.testing.assert_array_equal(sel0[:8], 10.0)
  assert not sel0[8:].any()


# ------------------------------------------------------------------ the quantizer

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sigma_quantizer_round_trip(bits):
  """Kept coordinates decode to the mean of the kept values that share their bin (numpy,
  written independently); dropped ones to 0; the support is exactly the top-k set."""
  codec = codecs.from_config(_cfg(topk_bits=bits, topk_fraction=1 / 8))
  rng = np.random.default_rng(bits)
  x = (rng.standard_normal(1024) * np.repeat(10.0 ** rng.integers(-3, 2, 4), 256)
       ).astype(np.float32)
  payload = codec.encode(jnp.asarray(x), None)
  got, support = np.asarray(codec.decode(payload)), np.asarray(codec.support(payload))
  want, kept = _np_compress(x, 256, 32, 1 << bits, 6.0)
  np.testing.assert_array_equal(support, kept.astype(np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert not got[~kept].any()
  # more bits, a finer grid: the error on kept values shrinks
  if bits == 8:
    np.testing.assert_allclose(got[kept], x[kept], rtol=0.05)


def test_sigma_quantizer_is_exact_on_a_chunk_of_equal_values_and_on_two_levels():
  codec = codecs.from_config(_cfg(topk_fraction=1 / 8))
  x = np.zeros(512, np.float32)
  x[:32] = 3.25  # chunk 0: 32 equal kept values (sd 0)
  x[256:272], x[272:288] = -1.5, 2.0  # chunk 1: two levels, each its own bin
  got = np.asarray(codec.decode(codec.encode(jnp.asarray(x), None)))
  np.testing.assert_array_equal(got, x)


def test_sigma_payload_bytes_are_the_encoded_bytes():
  for bits in (2, 4, 8):
    codec = codecs.from_config(_cfg(topk_bits=bits))
    n = 256 * 6
    payload = codec.encode(jnp.zeros(n, jnp.float32), None)
    sent = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(payload))
    assert codecs.payload_bytes(codec, n) == sent == 6 * (8 * bits // 8 + 2 * 8 + 4 * (1 << bits))


def test_minmax_topk_is_unchanged_by_the_new_options():
  """The default quantizer / aggregation build the same codec as before (no support)."""
  codec = codecs.from_config(_cfg(topk_quantizer="minmax", topk_aggregate="mean"))
  assert codec.support is None and codec.name == "topk8/256@2b"
  base = ml_collections.ConfigDict(dict(compression="topk", quant_block=64,
                                        stochastic_rounding=False, topk_fraction=1 / 32,
                                        topk_chunk=256, topk_bits=2))
  x = jnp.asarray(np.random.default_rng(0).standard_normal(512), jnp.float32)
  np.testing.assert_array_equal(codec.decode(codec.encode(x, None)),
                                codecs.from_config(base).decode(codecs.from_config(base)
                                                                .encode(x, None)))


@pytest.mark.parametrize("kw,match", [
    ({"topk_quantizer": "gauss"}, "outer.topk_quantizer='gauss'"),
    ({"topk_aggregate": "sum"}, "outer.topk_aggregate='sum'"),
    ({"topk_sigmas": 0.0}, "outer.topk_sigmas=0.0"),
    ({"stochastic_rounding": True}, "outer.stochastic_rounding"),
    ({"topk_bits": 3}, "outer.topk_bits=3")])
def test_bad_values_name_the_key(kw, match):
  with pytest.raises(ValueError, match=match):
    codecs.from_config(_cfg(**kw))


@pytest.mark.parametrize("key,value", [("outer.topk_quantizer", "gauss"),
                                       ("outer.topk_aggregate", "sum"),
                                       ("outer.topk_sigmas", -1.0)])
def test_config_validate_names_the_key(key, value):
  c = config_lib.base_config()
  config_lib.override(c, {key: value})
  with pytest.raises(ValueError, match=key):
    config_lib.validate(c)


def test_paper_and_tuned_configs_build_the_paper_codec():
  from configs import shakespeare_sparseloco  # pylint: disable=g-import-not-at-top
  c = shakespeare_sparseloco.get_config()
  config_lib.validate(c)
  codec = codecs.from_config(c.outer)
  assert codec.name == "topk128/4096@2b/6sigma/selected" and codec.support is not None
  assert (c.outer.optimizer, c.outer.learning_rate, c.outer.error_feedback,
          c.outer.sync_every) == ("fedavg", 1.0, 0.95, 15)
