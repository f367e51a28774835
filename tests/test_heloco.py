"""HeLoCo (arXiv 2606.00271, ``outer.optimizer=heloco``, ``fedjax_lm/outer/heloco.py``): the
correction against a numpy reference written from the paper's rule, per block and regime
(aligned, anti-aligned, weakly aligned, zero momentum); the identities with the wrapped
optimizers (DiLoCo's Nesterov, Delayed Nesterov); the mesh-axis ``outer.delay`` deployment
against a numpy reference of delayed DiLoCo with the correction, and equal to plain delayed
DiLoCo exactly until a block turns against the momentum; config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from fedjax_lm import config_lib
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import outer
from fedjax_lm.outer import delayed
from fedjax_lm.outer import heloco

DEFAULTS = dict(c_ok=0.2, k_s=1.0, beta_max=0.5, k_d=0.5, kappa=1.0, eps=1e-8)
STRONG = dict(c_ok=0.5, k_s=3.0, beta_max=1.0, k_d=4.0, kappa=0.5, eps=1e-8)  # caps reached


def _rule(d, m, *, c_ok, k_s, beta_max, k_d, kappa, eps):
  """The paper's per-block rule (float64): u = d/|d|, v = m/|m|, c = u.v, conf = |d| / (|d| +
  kappa |m| + eps); c >= c_ok keeps d; c < 0: d - beta c |d| v with beta = min(k_s (-c) conf,
  beta_max); else |d| w / max(|w|, eps), w = (1 - lam) u + lam v, lam = min(k_d (1 - c) conf,
  1). No direction to compare (d or m zero): d. Returns (corrected, regime)."""
  d, m = np.asarray(d, np.float64), np.asarray(m, np.float64)
  nd, nm = np.linalg.norm(d), np.linalg.norm(m)
  if nd == 0 or nm == 0:
    return d, "zero"
  u, v = d / nd, m / nm
  c = float(np.sum(u * v))
  conf = nd / (nd + kappa * nm + eps)
  if c >= c_ok:
    return d, "aligned"
  if c < 0:
    beta = min(k_s * -c * conf, beta_max)
    return d - beta * c * nd * v, "anti"
  lam = min(k_d * (1 - c) * conf, 1.0)
  w = (1 - lam) * u + lam * v
  return nd * w / max(np.linalg.norm(w), eps), "weak"


def _with_cosine(rng, m, cos, norm):
  """A vector of norm ``norm`` at cosine ``cos`` to ``m`` (any direction if m is zero)."""
  z = rng.standard_normal(m.shape)
  if not np.any(m):
    return norm * z / np.linalg.norm(z)
  v = m / np.linalg.norm(m)
  z = z - np.sum(z * v) * v
  z = z / np.linalg.norm(z)
  return norm * (cos * v + np.sqrt(1 - cos ** 2) * z)


# Per step, per block: the cosine of the stale pseudo-gradient to the current momentum (None:
# a zero pseudo-gradient, so that block's momentum is still zero at the next step).
_COSINES = [
    {"aligned": 0.9, "anti": 0.8, "weak": 0.7, "late": None},  # m = 0: everything passes
    {"aligned": 0.8, "anti": -0.9, "weak": 0.1, "late": 0.5},  # "late": m still zero
    {"aligned": 0.6, "anti": -0.3, "weak": 0.05, "late": -0.6},
    {"aligned": 0.95, "anti": -0.05, "weak": 0.3, "late": 0.15},
    {"aligned": 0.7, "anti": -0.99, "weak": 0.0, "late": -0.2},
]
_SHAPES = {"aligned": (5,), "anti": (2, 3), "weak": (7,), "late": (4, 2)}


@pytest.mark.parametrize("s", [DEFAULTS, STRONG], ids=["defaults", "strong"])
def test_outer_steps_match_the_papers_rule_block_by_block(s):
  """Five outer steps of ``heloco.heloco`` (jitted) on stale pseudo-gradients built at chosen
  cosines to the momentum, four blocks of different shapes, against numpy: the paper's rule on
  its averaged momentum m <- mu m + (1 - mu) G, then DiLoCo's Nesterov t <- mu t + G,
  x <- x - lr (G + mu t) on the corrected G. Every regime occurs."""
  lr, mu = 0.7, 0.9
  rng = np.random.default_rng(0)
  tx = heloco.heloco(lr, mu, **s)
  x = {k: jnp.asarray(rng.standard_normal(sh), jnp.float32) for k, sh in _SHAPES.items()}
  state, update = tx.init(x), jax.jit(tx.update)
  x_ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
  m_ref = {k: np.zeros(sh) for k, sh in _SHAPES.items()}  # the paper's (averaged) momentum
  t_ref = {k: np.zeros(sh) for k, sh in _SHAPES.items()}  # Nesterov's trace
  seen = set()
  for cosines in _COSINES:
    delta = {k: (np.zeros(_SHAPES[k]) if cos is None else
                 _with_cosine(rng, m_ref[k], cos, rng.uniform(0.5, 2.0)))
             for k, cos in cosines.items()}
    delta = {k: np.asarray(v, np.float32) for k, v in delta.items()}  # what the engine sends
    u, state = update({k: jnp.asarray(v) for k, v in delta.items()}, state, x)
    x = optax.apply_updates(x, u)
    for k in _SHAPES:
      g, regime = _rule(delta[k], m_ref[k], **s)
      seen.add(regime)
      m_ref[k] = mu * m_ref[k] + (1 - mu) * g
      t_ref[k] = mu * t_ref[k] + g
      x_ref[k] = x_ref[k] - lr * (g + mu * t_ref[k])
      np.testing.assert_allclose(x[k], x_ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
  assert seen == {"zero", "aligned", "anti", "weak"}


def test_each_regime_does_what_the_paper_says():
  """On one block against numpy's rule: an aligned block is returned bit for bit; an
  anti-aligned one with beta = 1 loses its whole component against m; a weakly aligned one
  keeps its norm and comes closer to m; zero momentum passes; a cap binds."""
  rng = np.random.default_rng(1)
  m = rng.standard_normal(64).astype(np.float32)
  block = lambda d, **s: np.asarray(heloco.correct_block(jnp.asarray(d), jnp.asarray(m),
                                                         **{**DEFAULTS, **s}))
  cos = lambda a, b: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
  aligned = _with_cosine(rng, m, 0.9, 1.0).astype(np.float32)
  np.testing.assert_array_equal(block(aligned), aligned)
  anti = _with_cosine(rng, m, -0.8, 3.0).astype(np.float32)
  full = block(anti, k_s=100.0, beta_max=1.0, kappa=0.0)  # beta capped at 1: c -> 0
  assert abs(cos(full, m)) < 1e-5
  np.testing.assert_allclose(full, _rule(anti, m, **{**DEFAULTS, "k_s": 100.0,
                                                      "beta_max": 1.0, "kappa": 0.0})[0],
                             rtol=1e-5, atol=1e-6)
  half = block(anti)  # beta = min(0.8 conf, 0.5)
  assert -0.8 < cos(half, m) < 0 and np.linalg.norm(half) < np.linalg.norm(anti)
  weak = _with_cosine(rng, m, 0.1, 2.0).astype(np.float32)
  turned = block(weak)
  np.testing.assert_allclose(np.linalg.norm(turned), 2.0, rtol=1e-5)
  assert cos(turned, m) > 0.1 + 0.1
  np.testing.assert_allclose(turned, _rule(weak, m, **DEFAULTS)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(block(weak, k_d=100.0), 2.0 * m / np.linalg.norm(m), rtol=1e-5,
                             atol=1e-6)  # lam capped at 1: the momentum's direction
  zero_m = np.asarray(heloco.correct_block(jnp.asarray(anti), jnp.zeros(64), **DEFAULTS))
  np.testing.assert_array_equal(zero_m, anti)
  np.testing.assert_array_equal(block(np.zeros(64, np.float32)), np.zeros(64))


def _deltas(rng, n, shapes):
  return [{k: jnp.asarray(rng.standard_normal(sh), jnp.float32) for k, sh in shapes.items()}
          for _ in range(n)]


@pytest.mark.parametrize("off", [{"c_ok": -1.0}, {"k_s": 0.0, "k_d": 0.0}],
                         ids=["c_ok=-1", "zero_strength"])
def test_nothing_to_correct_is_the_wrapped_optimizer_exactly(off):
  """c_ok = -1 (every block passes) or zero strength: bit for bit DiLoCo's Nesterov, and
  Delayed Nesterov for the asynchronous syncer, on random (often anti-aligned) deltas."""
  rng = np.random.default_rng(2)
  shapes = {"a": (3, 4), "b": (5,)}
  s = {**DEFAULTS, **off}
  for ours, plain in ((heloco.heloco(0.7, 0.9, **s), optax.sgd(0.7, 0.9, nesterov=True)),
                      (heloco.delayed_nesterov(0.7, 0.9, 3, **s),
                       delayed.delayed_nesterov(0.7, 0.9, 3))):
    x = {k: jnp.zeros(sh) for k, sh in shapes.items()}
    y, s1, s2 = x, ours.init(x), plain.init(x)
    for d in _deltas(rng, 7, shapes):
      u1, s1 = jax.jit(ours.update)(d, s1, x)
      u2, s2 = jax.jit(plain.update)(d, s2, y)
      x, y = optax.apply_updates(x, u1), optax.apply_updates(y, u2)
      jax.tree.map(np.testing.assert_array_equal, x, y)


def test_delayed_nesterov_corrects_each_arrival_against_its_momentum():
  """The async syncer's transform against numpy: Delayed Nesterov (Liu et al. 2024; momentum
  moved once per N = 3 arrivals) with each arrival corrected by the rule against the momentum
  it holds then, on the paper's scale (1 - beta) m; with N = 1 it is ``heloco.heloco``."""
  lr, mu, n = 0.7, 0.9, 3
  rng = np.random.default_rng(3)
  shapes = {"a": (6,), "b": (2, 2)}
  tx = heloco.delayed_nesterov(lr, mu, n, **STRONG)
  x = {k: jnp.zeros(sh) for k, sh in shapes.items()}
  state = tx.init(x)
  xr = {k: np.zeros(sh) for k, sh in shapes.items()}
  mom = {k: np.zeros(sh) for k, sh in shapes.items()}
  buf = {k: np.zeros(sh) for k, sh in shapes.items()}
  regimes = set()
  for i, d in enumerate(_deltas(rng, 10, shapes)):
    u, state = jax.jit(tx.update)(d, state, x)
    x = optax.apply_updates(x, u)
    for k in shapes:
      g, regime = _rule(d[k], (1 - mu) * mom[k], **STRONG)
      regimes.add(regime)
      buf[k] = buf[k] + g
      xr[k] = xr[k] - lr / n * g
      if (i + 1) % n == 0:
        mom[k] = mu * mom[k] + buf[k] / n
        xr[k] = xr[k] - lr * mu * mom[k]
        buf[k] = np.zeros(shapes[k])
      np.testing.assert_allclose(x[k], xr[k], rtol=2e-5, atol=2e-6)
  assert {"zero", "anti"} <= regimes
  one, ref = heloco.delayed_nesterov(lr, mu, 1, **STRONG), heloco.heloco(lr, mu, **STRONG)
  x = y = {k: jnp.zeros(sh) for k, sh in shapes.items()}
  s1, s2 = one.init(x), ref.init(x)
  for d in _deltas(rng, 5, shapes):
    u1, s1 = one.update(d, s1, x)
    u2, s2 = ref.update(d, s2, y)
    x, y = optax.apply_updates(x, u1), optax.apply_updates(y, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), x, y)


# ------------------------------------------------------------- the mesh-axis outer.delay run
def _mesh(devices):
  return mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, devices)


def _quadratic(one_device, m, shapes, total, **over):
  config = tiny_config(**{
      "algorithm": "islands", "islands.num": m, "outer.sync_every": 4,
      "outer.learning_rate": 0.7, "outer.momentum": 0.9, "outer.hparams_for": "",
      "outer.delay": "naive", "total_steps": total, **over})
  return engine.build_for_loss(
      config, _mesh(one_device),
      loss_fn=lambda p, b: sum(0.5 * jnp.sum((p[k] - b[k][0]) ** 2) for k in shapes),
      init_fn=lambda key: {k: jnp.zeros(sh) for k, sh in shapes.items()},
      abstract_params={k: jax.ShapeDtypeStruct(sh, jnp.float32) for k, sh in shapes.items()},
      param_specs={k: P(*(None,) * len(sh)) for k, sh in shapes.items()},
      inner_tx=optax.sgd(0.5))


def _delayed_reference(y, total, s, lr_in=0.5, lr=0.7, mu=0.9, every=4):
  """Kale et al.'s naive delayed DiLoCo (every worker restarts from the global copy, whose
  outer step applies the previous round's mean) on loss 0.5 |w - y_m|^2 per worker, with the
  mean corrected by the paper's rule before the Nesterov step (``s`` None: plain). Per step:
  the global params, and the regimes of that step's outer step (empty: none)."""
  keys = list(y)
  g = {k: np.zeros(y[k].shape[1:]) for k in keys}
  t = {k: np.zeros_like(g[k]) for k in keys}
  avg = {k: np.zeros_like(g[k]) for k in keys}  # the paper's averaged momentum
  held = {k: np.zeros_like(g[k]) for k in keys}
  local = {k: np.zeros(y[k].shape) for k in keys}
  out = []

  def outer_step():
    regimes = set()
    for k in keys:
      d, regime = (held[k], "plain") if s is None else _rule(held[k], avg[k], **s)
      regimes.add(regime)
      avg[k] = mu * avg[k] + (1 - mu) * d
      t[k] = mu * t[k] + d
      g[k] = g[k] - lr * (d + mu * t[k])
    return regimes

  for step in range(1, total + 1):
    regimes = set()
    for k in keys:
      local[k] = local[k] - lr_in * (local[k] - y[k])
    if step % every == 0 or step == total:
      fresh = {k: (g[k][None] - local[k]).mean(0) for k in keys}
      regimes |= outer_step()  # the previous round's mean
      for k in keys:
        held[k] = fresh[k]
        local[k] = np.broadcast_to(g[k], local[k].shape).copy()
      if step == total:
        regimes |= outer_step()
        for k in keys:
          local[k] = np.broadcast_to(g[k], local[k].shape).copy()
    out.append(({k: g[k].copy() for k in keys}, regimes))
  return out


def test_delayed_deployment_matches_reference_and_plain_delayed_diloco_until_anti_aligned(
    one_device):
  """M = 3 islands, two blocks, H = 4, ``outer.delay=naive``, 26 steps: the engine's global
  copy after every step equals the numpy reference (delayed DiLoCo with the corrected mean);
  with c_ok = 0 (no weakly aligned regime) it equals plain delayed DiLoCo up to the first
  outer step that meets an anti-aligned block (the delayed steps overshoot the quadratic's
  minimum, so the late mean points back against the momentum) and differs from then on."""
  total, m = 26, 3
  shapes = {"w": (5,), "v": (2, 3)}
  rng = np.random.default_rng(4)
  y = {k: rng.standard_normal((m,) + sh).astype(np.float32) for k, sh in shapes.items()}
  batch = {k: jnp.asarray(v)[:, None] for k, v in y.items()}
  s = {**DEFAULTS, "c_ok": 0.0}
  keys = {f"outer.heloco_{k}": v for k, v in s.items()}
  runs = {}
  for name, over in (("heloco", {"outer.optimizer": "heloco", **keys}),
                     ("diloco", {"outer.optimizer": "diloco"})):
    alg = _quadratic(one_device, m, shapes, total, **over)
    state, trace = alg.init(jax.random.key(0)), []
    for step in range(1, total + 1):
      state, _ = alg.inner_step(state, batch)
      state = alg.sync(state, step)
      trace.append(jax.tree.map(np.asarray, state.server.params))
    runs[name] = trace
  ref = _delayed_reference(y, total, s)
  first_anti = next(i for i, (_, regimes) in enumerate(ref) if "anti" in regimes)
  assert 0 < first_anti < total - 4  # anti-aligned blocks occur, and not at once
  for i, (want, _) in enumerate(ref):
    for k in shapes:
      np.testing.assert_allclose(runs["heloco"][i][k], want[k], rtol=2e-5, atol=2e-6)
      if i < first_anti:
        np.testing.assert_array_equal(runs["heloco"][i][k], runs["diloco"][i][k])
  gap = max(np.abs(runs["heloco"][i][k] - runs["diloco"][i][k]).max()
            for i in range(first_anti, total) for k in shapes)
  assert gap > 1e-3
  plain = _delayed_reference(y, total, None)[-1][0]
  for k in shapes:  # the plain reference is the diloco run: the difference is the correction
    np.testing.assert_allclose(runs["diloco"][-1][k], plain[k], rtol=2e-5, atol=2e-6)


def test_transformer_delayed_run_finishes_and_c_ok_minus_one_is_delayed_diloco(one_device):
  """The tiny transformer, M = 2, H = 3, ``outer.delay=naive``, 10 steps, AdamW inside:
  HeLoCo's run finishes with finite losses; with c_ok = -1 its losses and global params are
  plain delayed DiLoCo's bit for bit."""
  runs = {}
  for name, over in (("heloco", {"outer.optimizer": "heloco"}),
                     ("off", {"outer.optimizer": "heloco", "outer.heloco_c_ok": -1.0}),
                     ("diloco", {"outer.optimizer": "diloco"})):
    config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 3,
                            "total_steps": 10, "outer.delay": "naive",
                            "outer.learning_rate": 0.7, "outer.momentum": 0.9,
                            "outer.hparams_for": "", **over})
    alg = engine.build(config, _mesh(one_device),
                       model_lib.ModelConfig.from_config(config.model))
    state, losses = alg.init(jax.random.key(0)), []
    rng = np.random.default_rng(0)
    for step in range(1, 11):
      toks = rng.integers(0, 64, (2, 4, 17))
      batch = {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
               "targets": jnp.asarray(toks[..., 1:], jnp.int32), "mask": jnp.ones((2, 4, 16))}
      state, metrics = alg.inner_step(state, batch)
      losses.append(np.asarray(metrics["island_loss"]))
      state = alg.sync(state, step)
    runs[name] = (np.array(losses), jax.tree.map(np.asarray, alg.eval_params(state)))
  assert np.all(np.isfinite(runs["heloco"][0]))
  jax.tree.map(lambda a: np.testing.assert_equal(np.isfinite(a).all(), True), runs["heloco"][1])
  np.testing.assert_array_equal(runs["off"][0], runs["diloco"][0])
  jax.tree.map(np.testing.assert_array_equal, runs["off"][1], runs["diloco"][1])


# ---------------------------------------------------------------------------------- config
def test_config_selects_heloco_with_its_settings():
  c = config_lib.base_config()
  c.unlock()
  c.outer.optimizer, c.outer.heloco_c_ok = "heloco", -1.0
  assert outer.resolved_hparams(c.outer) == {"learning_rate": 0.7, "momentum": 0.9}
  assert heloco.settings(c.outer) == {**DEFAULTS, "c_ok": -1.0}
  tx = outer.from_config(c.outer)  # c_ok = -1: DiLoCo's Nesterov
  x, d = {"w": jnp.zeros(3)}, {"w": jnp.asarray([1.0, -2.0, 0.5])}
  s, r = tx.init(x), outer.diloco().init(x)
  for sign in (1.0, -1.0):
    u, s = tx.update(jax.tree.map(lambda a: sign * a, d), s, x)
    v, r = outer.diloco().update(jax.tree.map(lambda a: sign * a, d), r, x)
    np.testing.assert_array_equal(u["w"], v["w"])


@pytest.mark.parametrize("key,value,msg", [
    ("heloco_c_ok", 1.5, "outer.heloco_c_ok=1.5 must be in [-1, 1]"),
    ("heloco_k_s", -1.0, "outer.heloco_k_s=-1.0 must be >= 0"),
    ("heloco_beta_max", 1.5, "outer.heloco_beta_max=1.5 must be in [0, 1]"),
    ("heloco_k_d", -0.5, "outer.heloco_k_d=-0.5 must be >= 0"),
    ("heloco_kappa", -1.0, "outer.heloco_kappa=-1.0 must be >= 0"),
    ("heloco_eps", 0.0, "outer.heloco_eps=0.0 must be > 0")])
def test_bad_setting_is_one_line_naming_the_key(key, value, msg):
  c = tiny_config(**{"algorithm": "islands", "outer.optimizer": "heloco", f"outer.{key}": value})
  with pytest.raises(ValueError) as err:
    config_lib.validate(c)
  assert str(err.value) == msg
