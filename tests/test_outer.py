"""Outer optimizers: construction from config, defaults, hand-written updates, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm import config_lib
from fedjax_lm import outer
from fedjax_lm.outer import delayed


def _outer_cfg(optimizer, **kw):
  c = config_lib.base_config().outer
  c.optimizer = optimizer
  for k, v in kw.items():
    c[k] = v
  return c


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(2, 2)) * scale, jnp.float32)}}


def _step(tx, state, delta, params):
  updates, state = tx.update(delta, state, params)
  return optax.apply_updates(params, updates), state, updates


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


@pytest.mark.parametrize("name", sorted(outer.OPTIMIZERS))
def test_every_optimizer_builds_and_updates_finitely(name):
  tx = outer.from_config(_outer_cfg(name))
  params = _tree(0)
  state = tx.init(params)
  for r in range(3):
    delta = _tree(10 + r, scale=0.1)
    new, state, updates = _step(tx, state, delta, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.shape == p.shape and u.dtype == p.dtype
      assert np.all(np.isfinite(np.asarray(u)))
      assert np.any(np.asarray(u) != 0)
    params = new


@pytest.mark.parametrize("name", sorted(outer.OPTIMIZERS))
def test_updates_are_descent_directions_on_first_step(name):
  """Every outer optimizer moves against the pseudo-gradient on its first step."""
  tx = outer.from_config(_outer_cfg(name))
  params, delta = _tree(0), _tree(1)
  _, _, updates = _step(tx, tx.init(params), delta, params)
  dot = sum(float(jnp.vdot(u, d)) for u, d in zip(jax.tree.leaves(updates),
                                                   jax.tree.leaves(delta)))
  assert dot < 0


@pytest.mark.parametrize("name, expected", [
    ("fedavg", {"learning_rate": 1.0}),
    ("diloco", {"learning_rate": 0.7, "momentum": 0.9}),
    ("slowmo", {"learning_rate": 1.0, "momentum": 0.5}),
    ("sgd", {"learning_rate": 1.0, "momentum": 0.0}),
    ("fedopt_adam", {"learning_rate": 1e-2}),
    ("fedopt_yogi", {"learning_rate": 1e-2}),
    ("fedopt_adagrad", {"learning_rate": 1e-1}),
])
def test_resolved_hparams_defaults(name, expected):
  assert outer.resolved_hparams(_outer_cfg(name)) == expected


def test_resolved_hparams_overrides():
  got = outer.resolved_hparams(_outer_cfg("diloco", learning_rate=0.3, momentum=0.5))
  assert got == {"learning_rate": 0.3, "momentum": 0.5}
  assert outer.resolved_hparams(_outer_cfg("diloco", learning_rate=0.3)) == {
      "learning_rate": 0.3, "momentum": 0.9}
  # A momentum of 0 is a value, not "unset".
  assert outer.resolved_hparams(_outer_cfg("slowmo", momentum=0.0)) == {
      "learning_rate": 1.0, "momentum": 0.0}


def test_hparams_tuned_for_another_optimizer_do_not_apply():
  """A DiLoCo config's tuned lr / momentum (outer.hparams_for='diloco') apply to diloco only;
  switched to FedAvg, FedAvg's own lr 1 runs (not an error, not FedAvg with momentum)."""
  tuned = dict(learning_rate=0.7, momentum=0.5, hparams_for="diloco")
  assert outer.resolved_hparams(_outer_cfg("diloco", **tuned)) == {
      "learning_rate": 0.7, "momentum": 0.5}
  assert outer.resolved_hparams(_outer_cfg("fedavg", **tuned)) == {"learning_rate": 1.0}
  assert outer.ignored_hparams(_outer_cfg("fedavg", **tuned)) == {
      "learning_rate": 0.7, "momentum": 0.5}
  assert outer.ignored_hparams(_outer_cfg("diloco", **tuned)) == {}
  with pytest.raises(ValueError, match="not used by outer.optimizer='fedavg'"):
    outer.resolved_hparams(_outer_cfg("fedavg", momentum=0.5))
  with pytest.raises(ValueError, match="outer.hparams_for='lamb'"):
    outer.resolved_hparams(_outer_cfg("diloco", hparams_for="lamb"))


def test_diloco_is_nesterov_sgd():
  tx = outer.from_config(_outer_cfg("diloco"))
  ref = optax.sgd(0.7, momentum=0.9, nesterov=True)
  params_a = params_b = _tree(0)
  sa, sb = tx.init(params_a), ref.init(params_b)
  for r in range(3):
    delta = _tree(20 + r)
    params_a, sa, ua = _step(tx, sa, delta, params_a)
    params_b, sb, ub = _step(ref, sb, delta, params_b)
    _close(ua, ub, rtol=1e-6, atol=1e-7)
  _close(params_a, params_b, rtol=1e-6, atol=1e-7)


def test_diloco_by_hand_scalar():
  """optax Nesterov: t <- d + m t; u = -lr (d + m t). With d = 1, 1, 1, lr .7, m .9:
  t1 = 1, u1 = -.7 (1 + .9)        = -1.33
  t2 = 1.9, u2 = -.7 (1 + .9*1.9)  = -1.897
  t3 = 2.71, u3 = -.7 (1 + .9*2.71) = -2.4073"""
  tx = outer.from_config(_outer_cfg("diloco"))
  x = jnp.zeros(())
  state = tx.init(x)
  got = []
  for _ in range(3):
    x, state, u = _step(tx, state, jnp.ones(()), x)
    got.append(float(u))
  np.testing.assert_allclose(got, [-1.33, -1.897, -2.4073], rtol=1e-6)
  assert float(x) == pytest.approx(-(1.33 + 1.897 + 2.4073), rel=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.8])
def test_slowmo_matches_paper_update(alpha):
  """SlowMo (Wang et al. 2020) with a constant base lr gamma:
  u <- beta u + delta / gamma;  x <- x - alpha gamma u."""
  gamma, beta = 0.1, 0.5
  cfg = _outer_cfg("slowmo") if alpha is None else _outer_cfg("slowmo", learning_rate=alpha)
  alpha_value = 1.0 if alpha is None else alpha
  tx = outer.from_config(cfg)
  x = _tree(0)
  state = tx.init(x)
  x_ref = x
  u = jax.tree.map(jnp.zeros_like, x)
  for r in range(3):
    delta = _tree(30 + r, scale=0.05)  # what the islands would report this round
    x, state, _ = _step(tx, state, delta, x)
    u = jax.tree.map(lambda u_, d: beta * u_ + d / gamma, u, delta)
    x_ref = jax.tree.map(lambda x_, u_: x_ - alpha_value * gamma * u_, x_ref, u)
    _close(x, x_ref, rtol=1e-5, atol=1e-6)


def test_fedavg_lr1_maps_global_to_island_mean():
  tx = outer.from_config(_outer_cfg("fedavg"))
  global_params = _tree(0)
  islands = [_tree(40 + i) for i in range(3)]
  mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *islands)
  delta = jax.tree.map(lambda g, m: g - m, global_params, mean)
  new, _, updates = _step(tx, tx.init(global_params), delta, global_params)
  _close(updates, jax.tree.map(jnp.negative, delta), rtol=0, atol=0)
  _close(new, mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("delta, scale", [
    ({"a": jnp.array([3.0]), "b": jnp.array([0.0, 4.0])}, 1.0 / 5.0),  # norm 5 -> clipped to 1
    ({"a": jnp.array([0.3]), "b": jnp.array([0.0, 0.4])}, 1.0),  # norm 0.5 -> untouched
])
def test_clip_norm_clips_pseudo_gradient_global_norm(delta, scale):
  tx = outer.from_config(_outer_cfg("fedavg", clip_norm=1.0))
  params = {"a": jnp.zeros(1), "b": jnp.zeros(2)}
  _, _, updates = _step(tx, tx.init(params), delta, params)
  _close(updates, jax.tree.map(lambda d: -d * scale, delta), rtol=1e-6, atol=1e-7)
  norm = optax.tree.norm(updates)
  assert float(norm) == pytest.approx(min(1.0, float(optax.tree.norm(delta))), rel=1e-6)


def test_no_clip_by_default():
  tx = outer.from_config(_outer_cfg("fedavg"))
  delta = {"a": jnp.array([30.0, 40.0])}
  _, _, updates = _step(tx, tx.init(delta), delta, delta)
  _close(updates, {"a": jnp.array([-30.0, -40.0])}, rtol=0, atol=0)


def test_sgd_nesterov_flag_is_used():
  plain = outer.from_config(_outer_cfg("sgd", momentum=0.9))
  nest = outer.from_config(_outer_cfg("sgd", momentum=0.9, nesterov=True))
  x = jnp.zeros(())
  _, _, u_plain = _step(plain, plain.init(x), jnp.ones(()), x)
  _, _, u_nest = _step(nest, nest.init(x), jnp.ones(()), x)
  assert float(u_plain) == pytest.approx(-1.0)
  assert float(u_nest) == pytest.approx(-1.9)


def test_unknown_optimizer_raises():
  with pytest.raises(ValueError, match="adamx"):
    outer.resolved_hparams(_outer_cfg("adamx"))
  with pytest.raises(ValueError, match="adamx"):
    outer.from_config(_outer_cfg("adamx"))


@pytest.mark.parametrize("name", ["fedopt_adam", "fedopt_yogi", "fedopt_adagrad", "fedavg"])
def test_momentum_for_optimizer_without_momentum_raises(name):
  with pytest.raises(ValueError, match=rf"outer\.momentum.*{name}"):
    outer.from_config(_outer_cfg(name, momentum=0.9))


# ------------------------------------------------------------------------- config_lib.validate

def test_validate_accepts_base_config():
  config_lib.validate(config_lib.base_config())
  c = config_lib.base_config()
  c.algorithm = "islands"
  config_lib.validate(c)


@pytest.mark.parametrize("key, value", [
    ("algorithm", "fedprox"),
    ("inner.optimizer", "lion"),
    ("data.partition", "by_author"),
    ("launch.mode", "slurm"),
    ("total_steps", 0),
])
def test_validate_rejects_bad_values_naming_the_key(key, value):
  c = config_lib.base_config()
  node = c
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=rf"{key}={value!r}|{key}={value}"):
    config_lib.validate(c)


def test_validate_checks_outer_only_for_islands():
  c = config_lib.base_config()
  c.outer.optimizer = "adamx"
  config_lib.validate(c)  # ddp ignores the outer optimizer
  c.algorithm = "islands"
  with pytest.raises(ValueError, match="outer.optimizer='adamx'"):
    config_lib.validate(c)
  c.outer.optimizer = "fedopt_adam"
  c.outer.momentum = 0.9
  with pytest.raises(ValueError, match="outer.momentum"):
    config_lib.validate(c)


def test_negative_clip_norms_are_rejected():
  c = config_lib.base_config()
  c.outer.clip_norm = -1.0
  with pytest.raises(ValueError, match="outer.clip_norm"):
    config_lib.validate(c)
  c.outer.clip_norm, c.inner.grad_clip = 0.0, -1.0
  with pytest.raises(ValueError, match="inner.grad_clip"):
    config_lib.validate(c)


# ------------------------------------------------------------------------- delayed Nesterov
def test_delayed_nesterov_over_one_round_is_one_nesterov_step_on_the_mean():
  """N = M arrivals from the same params (a synchronous round delivered one by one) add up to
  optax's Nesterov step on their mean, round after round (momentum carried); between the N-th
  arrivals no momentum is applied."""
  rng = np.random.default_rng(0)
  dn = delayed.delayed_nesterov(0.7, 0.9, every=3)
  ref = optax.sgd(0.7, momentum=0.9, nesterov=True)
  x = {"w": jnp.zeros(5)}
  x_ref, s, s_ref = x, dn.init(x), ref.init(x)
  for _ in range(4):
    deltas = [{"w": jnp.asarray(rng.normal(size=5), jnp.float32)} for _ in range(3)]
    for i, d in enumerate(deltas):
      u, s = dn.update(d, s, x)
      if i < 2:  # no momentum yet: a plain step of lr / N
        np.testing.assert_allclose(u["w"], -0.7 / 3 * d["w"], rtol=1e-6)
      x = optax.apply_updates(x, u)
    mean = jax.tree.map(lambda *a: sum(a) / 3, *deltas)
    u_ref, s_ref = ref.update(mean, s_ref, x_ref)
    x_ref = optax.apply_updates(x_ref, u_ref)
    np.testing.assert_allclose(x["w"], x_ref["w"], rtol=1e-5, atol=1e-6)
