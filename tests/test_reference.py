"""The engine equals the reference DiLoCo (``fedjax_lm.reference``, the paper's Algorithm 1 in
jax.numpy) on a tiny MLP with the config's inner AdamW (warm-up, cosine decay, clipping,
masked weight decay): outer Nesterov (DiLoCo), outer SGD lr 1 (FedAvg: the islands' mean),
and M=1, H=1 (plain AdamW, checked against optax too)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import reference
from fedjax_lm import steps

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _init(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (3, 8)), "b1": jnp.zeros(8),
          "out_norm": jnp.ones(8),  # "norm": no weight decay
          "w2": 0.5 * jax.random.normal(k2, (8, 1))}


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) * params["out_norm"]
  return jnp.mean(((h @ params["w2"])[:, 0] - batch["y"]) ** 2)


def _batches(num, total, seed=0):
  """Each island its own regression data: leaves ``[M, steps, B, ...]``."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num, total, 4, 3)).astype(np.float32)
  y = np.sin(x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=(num, 1, 1))).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _engine(one_device, num, every, total, outer):
  config = tiny_config(**{
      "algorithm": "islands", "islands.num": num, "outer.sync_every": every,
      "total_steps": total, "inner.learning_rate": 0.05, "inner.warmup_steps": 2,
      "inner.grad_clip": 0.5, "inner.weight_decay": 0.1, **outer})
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, one_device)
  eng = engine.build_for_loss(
      config, mesh, loss_fn=_loss, init_fn=_init,
      abstract_params=jax.eval_shape(_init, jax.random.key(0)),
      param_specs={"w1": P(None, None), "b1": P(None), "out_norm": P(None),
                   "w2": P(None, None)})
  return eng, config


def _run_engine(eng, batches, total, every):
  """Trains ``total`` steps; returns the initial params, the final global params, the losses
  ``[steps, M]`` and the islands' mean just before each sync."""
  state = eng.init(jax.random.key(0))
  params0 = jax.tree.map(np.array, eng.eval_params(state))
  losses, means = [], []
  for k in range(total):
    state, metrics = eng.inner_step(state, jax.tree.map(lambda b: b[:, k], batches))
    losses.append(np.array(metrics["island_loss"]))
    if (k + 1) % every == 0 or k + 1 == total:
      means.append(jax.tree.map(lambda x: np.array(x).mean(0), state.islands.params))
    state = eng.sync(state, k + 1)
  return params0, jax.tree.map(np.array, eng.eval_params(state)), np.stack(losses), means, state


def _reference(config, params0, batches, every):
  oc = config.outer
  return reference.diloco(
      _loss, jax.tree.map(jnp.asarray, params0), batches, H=every,
      inner=reference.AdamW.from_config(config.inner, int(config.total_steps)),
      outer_lr=float(oc.learning_rate), outer_momentum=float(oc.momentum or 0.0))


def _assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), a, b)


@pytest.mark.parametrize("num,every,total", [(2, 3, 8), (3, 4, 9)])
def test_diloco_equals_the_reference(one_device, num, every, total):
  """Outer Nesterov (lr 0.7, momentum 0.9) over several rounds and a short last one: the
  global params and every island's loss at every step."""
  outer = {"outer.optimizer": "diloco", "outer.learning_rate": 0.7, "outer.momentum": 0.9}
  eng, config = _engine(one_device, num, every, total, outer)
  batches = _batches(num, total)
  params0, params, losses, _, state = _run_engine(eng, batches, total, every)
  ref_params, ref_losses = _reference(config, params0, batches, every)
  _assert_close(params, ref_params)
  np.testing.assert_allclose(losses, ref_losses, **TOL)
  _assert_close(state.islands.params, jax.tree.map(lambda g: np.stack([g] * num), ref_params))
  assert not np.allclose(params["w1"], params0["w1"])  # it trained


def test_fedavg_equals_the_reference_and_the_islands_mean(one_device):
  """Outer SGD lr 1: each outer step lands on the mean of the islands' params."""
  outer = {"outer.optimizer": "fedavg", "outer.learning_rate": 1.0}
  eng, config = _engine(one_device, 2, 3, 8, outer)
  batches = _batches(2, 8, seed=1)
  params0, params, losses, means, _ = _run_engine(eng, batches, 8, 3)
  ref_params, ref_losses = _reference(config, params0, batches, 3)
  _assert_close(params, ref_params)
  _assert_close(params, means[-1])
  np.testing.assert_allclose(losses, ref_losses, **TOL)


def test_one_island_every_step_is_plain_adamw(one_device):
  """M=1, H=1, outer SGD lr 1: the engine, the reference and optax's AdamW
  (``steps.inner_optimizer``) on the one island's batches agree."""
  outer = {"outer.optimizer": "sgd", "outer.learning_rate": 1.0, "outer.momentum": 0.0}
  eng, config = _engine(one_device, 1, 1, 6, outer)
  batches = _batches(1, 6, seed=2)
  params0, params, losses, _, _ = _run_engine(eng, batches, 6, 1)
  ref_params, ref_losses = _reference(config, params0, batches, 1)
  tx = steps.inner_optimizer(config.inner, 6)
  p, opt_state = jax.tree.map(jnp.asarray, params0), None
  opt_state = tx.init(p)
  for k in range(6):
    grads = jax.grad(_loss)(p, jax.tree.map(lambda b: b[0, k], batches))
    updates, opt_state = tx.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
  _assert_close(params, ref_params)
  _assert_close(params, p)
  np.testing.assert_allclose(losses, ref_losses, **TOL)
