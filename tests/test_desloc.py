"""DES-LOC (Iacob et al. 2025, arXiv 2505.22549; ``fedjax_lm/engine/desloc.py``): the engine
against a numpy reference written from the paper's box, identities (moments never averaged is
DiLoCo; with SGD momentum, every state averaged every step is DDP), the moment averages' bytes
against the compiled HLO, the accounting, and the config's refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import config_lib
from fedjax_lm import engine
from fedjax_lm import hlo
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm.engine import desloc


def _mesh(devices, **sizes):
  return mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1, **sizes}, devices)


# ------------------------------------------------------------------ the numpy reference
def _reference(x, y, *, k_x, k_u, k_v, lr, b1, b2, eps, wd, rho, outer_lr, outer_mu):
  """DES-LOC from the paper's box, in float64: island m's params theta_m = (w, c), loss
  0.5 mean_b (x_b . w + c - y_b)^2 on its batch ``x[t, m]``, ``y[t, m]``. Before step t
  (t = 0..T-1), if t % K_u == 0 every island's u becomes the islands' mean, likewise v with
  K_v, and with K_x the params sync: the outer step (optax SGD: s = d + mu s,
  g -= lr (d + mu s) with Nesterov, g -= lr d without) on d = g - mean_m theta_m, every
  island restarting from g. Step t: the gradient clipped to global norm rho, then Adam with
  bias correction and decoupled weight decay (what ``optax.adamw`` computes). After the last
  step the params sync once more (the engine's final flush). K = 0: never."""
  steps, m, _, d = x.shape
  theta = np.zeros((m, d + 1))
  u, v = np.zeros_like(theta), np.zeros_like(theta)
  g, s = np.zeros(d + 1), np.zeros(d + 1)

  def sync_params():
    nonlocal g, s, theta
    delta = g - theta.mean(0)
    if outer_mu:
      s = delta + outer_mu * s
      g = g - outer_lr * (delta + outer_mu * s)
    else:
      g = g - outer_lr * delta
    theta = np.broadcast_to(g, theta.shape).copy()

  for t in range(steps):
    if t and k_u and t % k_u == 0:
      u[:] = u.mean(0)
    if t and k_v and t % k_v == 0:
      v[:] = v.mean(0)
    if t and t % k_x == 0:
      sync_params()
    for i in range(m):
      r = x[t, i] @ theta[i, :d] + theta[i, d] - y[t, i]
      grad = np.concatenate([x[t, i].T @ r, [r.sum()]]) / len(r)
      grad = grad * min(1.0, rho / np.linalg.norm(grad))
      u[i] = b1 * u[i] + (1 - b1) * grad
      v[i] = b2 * v[i] + (1 - b2) * grad ** 2
      u_hat, v_hat = u[i] / (1 - b1 ** (t + 1)), v[i] / (1 - b2 ** (t + 1))
      theta[i] = theta[i] - lr * (u_hat / (np.sqrt(v_hat) + eps) + wd * theta[i])
  sync_params()
  return g, theta, u, v


_ADAM = dict(lr=0.05, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, rho=1.5)


def _engine_run(x, y, k_x, k_u, k_v, outer):
  steps, m, _, d = x.shape
  config = tiny_config(**{
      "algorithm": "islands", "islands.num": m, "outer.sync_every": k_x, "total_steps": steps,
      "outer.desloc_mu_every": k_u, "outer.desloc_nu_every": k_v, **outer})
  config_lib.validate(config)
  loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p["w"] + p["c"] - b["y"]) ** 2)
  alg = engine.build_for_loss(
      config, _mesh(jax.devices()[:1]), loss_fn=loss,
      init_fn=lambda key: {"w": jnp.zeros(d), "c": jnp.zeros(())},
      abstract_params={"w": jax.ShapeDtypeStruct((d,), jnp.float32),
                       "c": jax.ShapeDtypeStruct((), jnp.float32)},
      param_specs={"w": P(None), "c": P()},
      inner_tx=optax.chain(optax.clip_by_global_norm(_ADAM["rho"]),
                           optax.adamw(_ADAM["lr"], b1=_ADAM["b1"], b2=_ADAM["b2"],
                                       eps=_ADAM["eps"], weight_decay=_ADAM["wd"])))
  state = alg.init(jax.random.key(0))
  for t in range(steps):
    state, _ = alg.inner_step(state, {"x": jnp.asarray(x[t], jnp.float32),
                                      "y": jnp.asarray(y[t], jnp.float32)})
    state = alg.sync(state, t + 1)
  return alg, state


def _problem(steps, m, b=8, d=5, seed=0):
  """Each island its own regression target (non-iid), fresh rows every step."""
  rng = np.random.default_rng(seed)
  w_true = rng.standard_normal((m, d))
  x = rng.standard_normal((steps, m, b, d))
  y = np.einsum("tmbd,md->tmb", x, w_true) + 0.1 * rng.standard_normal((steps, m, b)) + 0.5
  return x, y


_DILOCO = {"outer.optimizer": "diloco", "outer.learning_rate": 0.7, "outer.momentum": 0.9}
_FEDAVG = {"outer.optimizer": "fedavg"}


@pytest.mark.parametrize("k_x,k_u,k_v,outer", [
    (2, 6, 12, _FEDAVG),  # the paper's ratios, K_x averaging as in the box
    (2, 6, 12, _DILOCO),  # the same with DiLoCo's Nesterov outer step on the params
    (3, 0, 0, _DILOCO),  # never: DiLoCo, each island keeps its moments (desloc not built)
    (3, 3, 3, _FEDAVG),  # one period for all: Local Adam
    (4, 1, 5, _FEDAVG),  # moments more often than params; K_v not a multiple of K_x
], ids=["paper_ratios", "paper_ratios_nesterov", "never_is_diloco", "local_adam", "uneven"])
def test_engine_equals_the_papers_box(k_x, k_u, k_v, outer):
  """3 islands, 27 steps (not a multiple of K_x: the final flush): global params, every
  island's params and both Adam moments equal the float64 reference."""
  steps, m = 27, 3
  x, y = _problem(steps, m)
  alg, state = _engine_run(x, y, k_x, k_u, k_v, outer)
  assert (alg.desloc is None) == (k_u == k_v == 0)
  g, theta, u, v = _reference(x, y, k_x=k_x, k_u=k_u, k_v=k_v, outer_lr=outer.get(
      "outer.learning_rate", 1.0), outer_mu=outer.get("outer.momentum", 0.0), **_ADAM)
  adam = state.islands.opt_state[1][0]
  flat = lambda tree: np.concatenate([np.asarray(tree["w"]).reshape(*np.shape(tree["c"]), -1),
                                      np.asarray(tree["c"])[..., None]], axis=-1)
  np.testing.assert_allclose(flat(state.server.params), g, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(flat(state.islands.params), theta, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(flat(adam.mu), u, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(flat(adam.nu), v, rtol=2e-5, atol=2e-7)
  assert np.ptp(u, axis=0).max() > 1e-3  # non-iid islands: the averages change something


def test_periods_past_the_end_are_diloco_bit_for_bit():
  """Moments whose period is never reached: the DiLoCo run, losses and state bit for bit, and
  the same bytes (nothing extra sent)."""
  steps = 6
  runs = {}
  for name, over in (("diloco", {}), ("desloc", {"outer.desloc_mu_every": 7,
                                                 "outer.desloc_nu_every": 100})):
    config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2,
                            "total_steps": steps, **over})
    alg = engine.build(config, _mesh(jax.devices()[:1]),
                       model_lib.ModelConfig.from_config(config.model))
    state, losses = _train(alg, steps)
    runs[name] = (alg, state, losses)
  (base, base_state, base_losses), (alg, state, losses) = runs["diloco"], runs["desloc"]
  assert base.desloc is None and alg.desloc is not None
  np.testing.assert_array_equal(losses, base_losses)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
               jax.device_get(base_state))
  assert alg.island_bytes(steps) == base.island_bytes(steps) > 0


def _batches(m, steps, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    toks = rng.integers(0, 64, (m, 4, 17))
    yield {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
           "targets": jnp.asarray(toks[..., 1:], jnp.int32),
           "mask": jnp.ones((m, 4, 16), jnp.float32)}


def _train(alg, steps, m=2):
  state, losses = alg.init(jax.random.key(0)), []
  for t, batch in enumerate(_batches(m, steps)):
    state, metrics = alg.inner_step(state, batch)
    state = alg.sync(state, t + 1)
    losses.append(np.asarray(metrics["island_loss"]))
  return state, np.array(losses)


def test_sgd_momentum_with_params_averaged_every_step_is_ddp():
  """SGD + momentum, params averaged every step (K_x = 1, FedAvg): the islands' mean step is
  the step on the mean gradient with the islands' mean momentum, which is DDP's (linear), so
  the params are DDP's whatever K_u; with K_u = 1 every island's momentum is DDP's too, which
  local momenta (K_u = 0) are not. (With Adam no K gives DDP: the mean of u / sqrt(v) is not
  the step on the mean gradient.) 5 of 6 steps: the moments were just averaged."""
  steps, total = 5, 6
  sgd = {"inner.optimizer": "sgd", "inner.momentum": 0.9, "inner.learning_rate": 0.05,
         "inner.grad_clip": 0.0, "islands.num": 2, "total_steps": total}
  out = {}
  for name, over in (("ddp", {"algorithm": "ddp"}),
                     *((k, {"algorithm": "islands", "outer.optimizer": "fedavg",
                            "outer.sync_every": 1, "outer.desloc_mu_every": k})
                       for k in (0, 1, 3))):
    config = tiny_config(**sgd, **over)
    config_lib.validate(config)
    alg = engine.build(config, _mesh(jax.devices()[:1]),
                       model_lib.ModelConfig.from_config(config.model))
    state, losses = _train(alg, steps)
    opt_state = state.opt_state if name == "ddp" else state.islands.opt_state
    (trace,) = desloc.moment_trees(jax.device_get(opt_state), 0)
    out[name] = losses, jax.device_get(alg.eval_params(state)), trace
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  ddp_losses, ddp_params, ddp_trace = out["ddp"]
  for k in (0, 1, 3):
    np.testing.assert_allclose(out[k][0], ddp_losses, rtol=1e-5)
    jax.tree.map(close, out[k][1], ddp_params)
  for m in range(2):
    jax.tree.map(lambda a, b: close(a[m], b), out[1][2], ddp_trace)
  gap = max(float(np.abs(a[0] - b).max()) for a, b in zip(jax.tree.leaves(out[0][2]),
                                                          jax.tree.leaves(ddp_trace)))
  assert gap > 1e-3 * max(float(np.abs(b).max()) for b in jax.tree.leaves(ddp_trace))


# ------------------------------------------------------------------ bytes
def test_moment_averages_send_the_accounted_bytes_in_the_hlo():
  """2 islands x 2 devices: each ``moments/k`` program's only cross-island collectives carry
  one float32 copy of moment k per island (``desloc.bytes[k]``, the size of the params), and
  the inner step still crosses nothing."""
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2,
                          "outer.desloc_mu_every": 6, "outer.desloc_nu_every": 12})
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = ckpt_lib.abstract_like(jax.eval_shape(alg.init, jax.random.key(0)),
                                 alg.state_shardings)
  m, b, t = 2, config.data.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((m, b, t), jnp.float32 if k == "mask" else jnp.int32)
           for k in ("inputs", "targets", "mask")}
  lowered = alg.lower(state, batch)
  assert set(alg.registry) == set(lowered) >= {"moments/0", "moments/1"}
  colls = {name: hlo.collectives(lowered[name].compile().as_text(), 4)
           for name in ("inner", "moments/0", "moments/1")}
  assert hlo.cross_island(colls["inner"], devices_per_island=2) == []
  n_params = model_lib.count_params(state.server.params)
  for k in (0, 1):
    crossing = hlo.cross_island(colls[f"moments/{k}"], devices_per_island=2)
    assert {c.op for c in crossing} == {"all-reduce"}
    assert hlo.island_payload_bytes(crossing, 2) == alg.desloc.bytes[k] == 4 * n_params


def test_island_bytes_count_every_moment_average():
  """H = 2, K_u = 3, K_v = 4 over 9 steps: params at 2, 4, 6, 8, 9 (flush), mu at 3, 6, nu
  at 4, 8 (none at the last step: no step reads it); the peak is one copy."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2,
                          "outer.desloc_mu_every": 3, "outer.desloc_nu_every": 4,
                          "total_steps": 9})
  alg = engine.build(config, _mesh(jax.devices()[:1]),
                     model_lib.ModelConfig.from_config(config.model))
  kinds = {t: [(e.kind, e.fragment) for e in alg.clock.events(t) if e.kind == "moment"]
           for t in range(1, 10)}
  assert kinds == {1: [], 2: [], 3: [("moment", 0)], 4: [("moment", 1)], 5: [],
                   6: [("moment", 0)], 7: [], 8: [("moment", 1)], 9: []}
  one = alg.bytes_per_sync
  assert alg.desloc.bytes == (one, one)
  assert [alg.island_bytes(t) for t in (2, 3, 4, 8, 9)] == [
      one, 2 * one, 4 * one, 8 * one, 9 * one]
  assert alg.island_peak_bytes(3) == alg.island_peak_bytes(9) == one
  assert alg.clock_state(9)["moments_every"] == [3, 4]
  assert "moments_every" not in engine.build(
      tiny_config(**{"algorithm": "islands", "islands.num": 2}), _mesh(jax.devices()[:1]),
      model_lib.ModelConfig.from_config(config.model)).clock_state(9)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides,message", [
    ({"outer.desloc_mu_every": -1}, "outer.desloc_mu_every=-1 must be >= 0"),
    ({"outer.desloc_nu_every": -3}, "outer.desloc_nu_every=-3 must be >= 0"),
    ({"algorithm": "ddp", "outer.desloc_mu_every": 3}, "outer.desloc_mu_every needs algorithm"),
    ({"launch.mode": "decoupled", "outer.desloc_nu_every": 6},
     "outer.desloc_nu_every is not supported with launch.mode=decoupled"),
    ({"islands.dropout": 0.1, "outer.desloc_mu_every": 3}, "needs islands.dropout=0"),
    ({"islands.absent": "4:1", "outer.desloc_mu_every": 3}, "needs islands.dropout=0"),
    ({"outer.reset_inner_opt_state": True, "outer.desloc_mu_every": 3},
     "leave outer.reset_inner_opt_state False"),
    ({"inner.optimizer": "sgd", "inner.momentum": 0.9, "outer.desloc_nu_every": 6},
     "outer.desloc_nu_every needs inner.optimizer=adamw"),
    ({"inner.optimizer": "sgd", "outer.desloc_mu_every": 3},
     "outer.desloc_mu_every needs inner.optimizer=adamw, or sgd with inner.momentum > 0"),
    ({"inner.optimizer": "muon", "outer.desloc_mu_every": 3},
     "outer.desloc_mu_every needs inner.optimizer=adamw"),
])
def test_bad_config_is_one_clear_error(overrides, message):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, **overrides})
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(config)


def test_an_inner_optimizer_without_the_moment_is_refused_at_build():
  """``build_for_loss`` with a user's ``inner_tx`` (no config validation on that path)."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2,
                          "outer.desloc_nu_every": 6})
  with pytest.raises(ValueError, match=r"outer.desloc_nu_every=6: the inner optimizer has no nu"):
    engine.build_for_loss(
        config, _mesh(jax.devices()[:1]), loss_fn=lambda p, b: jnp.sum(p["w"]),
        init_fn=lambda key: {"w": jnp.zeros(3)},
        abstract_params={"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
        param_specs={"w": P(None)}, inner_tx=optax.sgd(0.1, momentum=0.9))
