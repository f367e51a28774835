"""Islands / DDP: identities between algorithms, a hand-computed example, HLO invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import hlo
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib


def _mesh(devices, **sizes):
  axis_sizes = {"island": 1, "data": 1, "fsdp": 1, "tensor": 1, **sizes}
  return mesh_lib.make_mesh(axis_sizes, devices)


def _batches(num_islands, rows, seq, steps, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    toks = rng.integers(0, 64, (num_islands, rows, seq + 1))
    yield {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
           "targets": jnp.asarray(toks[..., 1:], jnp.int32),
           "mask": jnp.ones((num_islands, rows, seq), jnp.float32)}


def _run(config, devices, steps=5):
  config.total_steps = steps  # the sync schedule (final flush) and the lr schedule
  mesh = _mesh(devices)
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = alg.init(jax.random.key(config.seed))
  losses = []
  for step, batch in enumerate(_batches(config.islands.num, 4, 16, steps)):
    state, metrics = alg.inner_step(state, batch)
    state = alg.sync(state, step + 1)
    losses.append(np.asarray(metrics["island_loss"]))
  return np.array(losses), alg.eval_params(state)


def _constant_sgd(c, lr=0.5):
  c.inner.optimizer, c.inner.learning_rate = "sgd", lr
  c.inner.warmup_steps, c.inner.min_lr_ratio, c.inner.grad_clip = 0, 1.0, 0.0
  return c


def test_islands_h1_fedavg_equals_ddp_with_sgd(one_device):
  """(a) Inner SGD, H=1, outer SGD lr 1: the mean of the islands' SGD steps is one SGD step
  on the mean gradient, i.e. DDP over the same M x B global batch."""
  common = dict(**{"islands.num": 2, "outer.sync_every": 1, "outer.optimizer": "sgd",
                   "outer.learning_rate": 1.0, "outer.momentum": 0.0})
  isl_losses, isl_params = _run(_constant_sgd(tiny_config(algorithm="islands", **common)),
                                one_device)
  ddp_losses, ddp_params = _run(_constant_sgd(tiny_config(algorithm="ddp", **common)), one_device)
  np.testing.assert_allclose(isl_losses, ddp_losses, rtol=2e-5, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               isl_params, ddp_params)
  assert isl_losses[-1].mean() < isl_losses[0].mean()  # it does train


@pytest.mark.parametrize("sync_every", [1, 3])
def test_one_island_fedavg_equals_plain_training(one_device, sync_every):
  """(b) One island, outer SGD lr 1 (momentum 0): global = global - (global - island) = island,
  so any H gives plain training (AdamW, clipping and schedule included)."""
  isl = tiny_config(**{"algorithm": "islands", "islands.num": 1, "outer.sync_every": sync_every,
                       "outer.optimizer": "fedavg"})
  isl_losses, isl_params = _run(isl, one_device, steps=7)
  plain_losses, plain_params = _run(tiny_config(algorithm="ddp"), one_device, steps=7)
  np.testing.assert_allclose(isl_losses, plain_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               isl_params, plain_params)


def test_two_islands_linear_model_by_hand(one_device):
  """(c) Loss 0.5 (w x - y)^2; island 0 sees (x=1, y=2), island 1 sees (x=1, y=-1).
  Inner SGD lr 0.5, H=2; outer Nesterov (optax: t = d + 0.9 t; u = -0.7 (d + 0.9 t)). w0 = 0.

  Round 1: island 0: w <- 0.5 w + 1:    0 -> 1 -> 1.5
           island 1: w <- 0.5 w - 0.5: 0 -> -0.5 -> -0.75
           mean 0.375, delta = 0 - 0.375 = -0.375, t = -0.375,
           u = -0.7 (-0.375 - 0.3375) = 0.49875  ->  w1 = 0.49875
  Round 2: island 0: 0.49875 -> 1.249375 -> 1.6246875
           island 1: 0.49875 -> -0.250625 -> -0.6253125
           mean 0.4996875, delta = -0.0009375, t = -0.0009375 + 0.9 (-0.375) = -0.3384375,
           u = -0.7 (-0.0009375 + 0.9 (-0.3384375)) = 0.213871875  ->  w2 = 0.712621875
  Island losses at step 0: 0.5 (0 - 2)^2 = 2 and 0.5 (0 + 1)^2 = 0.5.
  """
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2,
                          "outer.optimizer": "diloco"})
  loss_fn = lambda p, b: jnp.mean(0.5 * (b["x"][:, 0] * p["w"][0] - b["y"]) ** 2)
  alg = engine.build_for_loss(
      config, _mesh(one_device), loss_fn=loss_fn, init_fn=lambda key: {"w": jnp.zeros(1)},
      abstract_params={"w": jax.ShapeDtypeStruct((1,), jnp.float32)},
      param_specs={"w": P(None)}, inner_tx=optax.sgd(0.5))
  batch = {"x": jnp.ones((2, 1, 1)), "y": jnp.array([[2.0], [-1.0]])}
  state = alg.init(jax.random.key(0))
  expected_global = [None, 0.49875, None, 0.712621875]
  for step in range(4):
    state, metrics = alg.inner_step(state, batch)
    if step == 0:
      np.testing.assert_allclose(metrics["island_loss"], [2.0, 0.5])
    if step == 1:
      np.testing.assert_allclose(state.islands.params["w"][:, 0], [1.5, -0.75])
    if alg.clock.schedule.sends(step + 1):
      state = alg.sync(state, step + 1)
      np.testing.assert_allclose(state.server.params["w"][0], expected_global[step],
                                 rtol=1e-6)
      np.testing.assert_allclose(state.islands.params["w"][:, 0], [expected_global[step]] * 2,
                                 rtol=1e-6)
  assert alg.island_bytes(4) == 2 * 4  # two syncs of one float32 each


def _compiled_collectives(config, mesh):
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  alg = engine.build(config, mesh, model_cfg)
  state = ckpt_lib.abstract_like(jax.eval_shape(alg.init, jax.random.key(0)),
                                 alg.state_shardings)
  m, b, t = config.islands.num, config.data.batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((m, b, t), jnp.float32 if k == "mask" else jnp.int32)
           for k in ("inputs", "targets", "mask")}
  n = mesh.devices.size
  lowered = alg.lower(state, batch)
  inner = hlo.collectives(lowered.pop("inner").compile().as_text(), n)
  outer = [c for program in lowered.values()
           for c in hlo.collectives(program.compile().as_text(), n)]
  return alg, state, batch, inner, outer


@pytest.mark.parametrize("num_islands", [2, 4])
def test_hlo_inner_step_stays_inside_islands(num_islands):
  """2 islands x 2 data devices (M = 2 or 4 islands): inner steps talk only inside an
  island; the outer sync's cross-island payload equals the analytic island_bytes per sync."""
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "islands", "islands.num": num_islands})
  alg, _, _, inner, outer = _compiled_collectives(config, mesh)
  assert inner, "expected in-island gradient all-reduces"
  assert hlo.cross_island(inner, devices_per_island=2) == []
  assert hlo.cross_island(outer, devices_per_island=2)
  # Beside the payload, each device sends the weights of its islands (who sent, 4 B each).
  control = alg.control_bytes_per_send * num_islands // 2
  assert control == 8 * num_islands // 2
  assert hlo.island_payload_bytes(outer, 2) == alg.bytes_per_sync + control
  n_params = model_lib.count_params(jax.eval_shape(alg.init, jax.random.key(0)).server.params)
  assert alg.bytes_per_sync == 4 * n_params


def test_hlo_check_catches_a_cross_island_mean():
  """The invariant test is not vacuous: averaging params over islands inside the inner step
  shows up as a cross-island collective."""
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2})
  alg, state, batch, _, _ = _compiled_collectives(config, mesh)

  def leaky_inner(state, batch):
    state, metrics = alg.inner_step(state, batch)
    mixed = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0), x.shape), state.islands.params)
    return state._replace(islands=state.islands._replace(params=mixed)), metrics

  leaky = jax.jit(leaky_inner, in_shardings=(alg.state_shardings, None),
                  out_shardings=(alg.state_shardings, None))
  colls = hlo.collectives(leaky.lower(state, batch).compile().as_text(), 4)
  assert hlo.cross_island(colls, devices_per_island=2)


def test_hlo_ddp_gradient_payload_matches_accounting():
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "ddp", "islands.num": 2})
  alg, _, _, inner, _ = _compiled_collectives(config, mesh)
  assert hlo.island_payload_bytes(inner, 2) == alg.bytes_per_inner_step > 0


def test_island_bytes_diloco_vs_ddp_ratio(one_device):
  """Over 500 steps DiLoCo (H=50) sends 10 pseudo-gradients, DDP 500 gradients of the same
  size and dtype: the ratio is exactly 1/50."""
  mesh = _mesh(one_device)
  model_cfg = model_lib.ModelConfig.from_config(tiny_config().model)
  diloco = engine.build(tiny_config(**{"algorithm": "islands", "islands.num": 2,
                                        "outer.sync_every": 50, "total_steps": 500}),
                         mesh, model_cfg)
  ddp = engine.build(tiny_config(**{"algorithm": "ddp", "islands.num": 2,
                                     "total_steps": 500}), mesh, model_cfg)
  assert diloco.island_bytes(500) * 50 == ddp.island_bytes(500)
  assert diloco.island_bytes(499) == 9 * diloco.bytes_per_sync
  one = engine.build(tiny_config(**{"algorithm": "islands", "islands.num": 1}), mesh, model_cfg)
  assert one.island_bytes(500) == 0  # a single island sends nothing


def test_outer_state_is_sharded_inside_the_island():
  """Global params / outer momentum are ZeRO-sharded over the island's data devices."""
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2})
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = jax.eval_shape(alg.init, jax.random.key(0))
  for name, part in (("global", lambda s: s.server.params), ("inner", lambda s: s.islands.params)):
    total = sum(x.size for x in jax.tree.leaves(part(state)))
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) for x, s in zip(
        jax.tree.leaves(part(state)), jax.tree.leaves(part(alg.state_shardings))))
    # inner: [M=2] over island=2 -> 1 island's copy per device; global: halved over data=2.
    assert per_device == total // 2, name
  embed = alg.state_shardings.server.params["embed"]
  assert "data" in str(embed.spec) and "island" not in str(embed.spec)


def test_islands_num_must_fit_the_island_axis():
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "islands", "islands.num": 3})
  with pytest.raises(ValueError, match="islands.num=3"):
    engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))


@pytest.mark.parametrize("reset", [False, True])
def test_inner_optimizer_state_kept_or_reset_at_sync(one_device, reset):
  """By default AdamW moments survive the sync; ``outer.reset_inner_opt_state`` re-initialises
  them (count back to 0, moments zero)."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2,
                          "outer.reset_inner_opt_state": reset})
  alg = engine.build(config, _mesh(one_device), model_lib.ModelConfig.from_config(config.model))
  state = alg.init(jax.random.key(0))
  for step, batch in enumerate(_batches(2, 4, 16, 2)):
    state, _ = alg.inner_step(state, batch)
    state = alg.sync(state, step + 1)
  adam = state.islands.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  mu_norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(adam.mu))
  if reset:
    assert np.all(np.asarray(adam.count) == 0) and mu_norm == 0.0
  else:
    assert np.all(np.asarray(adam.count) == 2) and mu_norm > 0.0
