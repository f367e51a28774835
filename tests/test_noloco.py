"""NoLoCo (``outer.gossip=noloco``, :mod:`fedjax_lm.engine.merges.noloco`): the engine against
a numpy reference of the paper's outer step, DiLoCo's identity at M = 2, the pairing, the
HLO (one ppermute of one payload per island, no all-gather / all-reduce over islands) and the
config errors."""

from __future__ import annotations

import collections

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
from fedjax_lm.engine.merges import noloco
from test_contract import _batches, _train

HEAVY_BALL = {"outer.optimizer": "sgd", "outer.learning_rate": 0.7, "outer.momentum": 0.5}


def _mesh(devices, island=1, data=1):
  return mesh_lib.make_mesh({"island": island, "data": data, "fsdp": 1, "tensor": 1}, devices)


def _reference(y, *, eta, every, total, alpha, beta, gamma, seed):
  """The paper's algorithm box in float64 numpy, on ``loss_m = 0.5 |w - y[t, m]|^2`` with
  inner SGD (lr ``eta``): each island runs H inner steps from its own outer copy phi_m, then
  ``Delta_m = phi_m - theta_m``; paired with j = m XOR d_t,
  ``delta_m = alpha delta_m - beta (Delta_m + Delta_j) / 2 - gamma (phi_m - (phi_m + phi_j) / 2)``,
  ``phi_m += delta_m``, and the island restarts from phi_m."""
  m, r = y.shape[1], y.shape[2]
  phi, mom = np.zeros((m, r)), np.zeros((m, r))
  theta = phi.copy()
  for t in range(1, total + 1):
    theta = theta - eta * (theta - y[t - 1])
    if t % every:
      continue
    d = int(noloco.draw(seed, t // every - 1, 0, m))  # the same pairing as the engine
    peer = np.arange(m) ^ d
    delta = phi - theta
    mom = (alpha * mom - beta * (delta + delta[peer]) / 2
           - gamma * (phi - (phi + phi[peer]) / 2))
    phi = phi + mom
    theta = phi.copy()
  return phi


@pytest.mark.parametrize("gamma", [0.3, None])
def test_engine_equals_the_papers_outer_step_in_numpy(gamma, one_device):
  """M = 4 islands with different targets (their copies drift apart, so the pull toward the
  pair's mean matters), five outer steps, heavy-ball outer SGD: every island's outer copy and
  params, and the evaluated mean copy, equal the float64 reference."""
  m, r, every, total, seed = 4, 6, 3, 15, 7
  y = np.random.default_rng(0).normal(size=(total, m, r)).astype(np.float32)
  config = tiny_config(**{"algorithm": "islands", "islands.num": m, "outer.sync_every": every,
                          "total_steps": total, "seed": seed, "outer.gossip": "noloco",
                          "outer.gossip_gamma": gamma, **HEAVY_BALL})
  config_lib.validate(config)
  alg = engine.build_for_loss(
      config, _mesh(one_device), loss_fn=lambda p, b: 0.5 * jnp.sum((p["w"] - b["y"][0]) ** 2),
      init_fn=lambda key: {"w": jnp.zeros(r)},
      abstract_params={"w": jax.ShapeDtypeStruct((r,), jnp.float32)},
      param_specs={"w": P(None)}, inner_tx=optax.sgd(0.5))
  state = alg.init(jax.random.key(0))
  for step in range(1, total + 1):
    state, _ = alg.inner_step(state, {"y": jnp.asarray(y[step - 1])[:, None, :]})
    state = alg.sync(state, step)
  want = _reference(y.astype(np.float64), eta=0.5, every=every, total=total, alpha=0.5,
                    beta=0.7, gamma=0.7 if gamma is None else gamma, seed=seed)
  assert len({int(noloco.draw(seed, t, 0, m)) for t in range(total // every)}) > 1
  np.testing.assert_allclose(state.server.merge.params["w"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.islands.params["w"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(alg.eval_params(state)["w"], want.mean(0), rtol=1e-5, atol=1e-6)
  assert np.ptp(want, axis=0).max() > 1e-2  # the islands' copies did differ
  assert alg.island_bytes(total) == (total // every) * 4 * r  # one f32 copy per sync


@pytest.mark.parametrize("gamma", [0.0, None])
def test_two_islands_are_diloco_with_the_same_momentum(gamma, one_device):
  """M = 2: both islands are paired every round, their copies never differ, so the pair's
  mean is DiLoCo's mean and the consensus term is zero: NoLoCo is DiLoCo with the same outer
  heavy-ball SGD (the paper's "Nesterov"), losses and evaluated params, on the transformer."""
  steps = 12

  def run(over):
    config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 4,
                            "total_steps": steps, **HEAVY_BALL, **over})
    alg = engine.build(config, _mesh(one_device), model_lib.ModelConfig.from_config(config.model))
    state, losses = _train(alg, alg.init(jax.random.key(0)), _batches(2, steps))
    return losses, alg.eval_params(state), alg.island_bytes(steps)

  losses, params, sent = run({"outer.gossip": "noloco", "outer.gossip_gamma": gamma})
  want_losses, want_params, want_sent = run({})
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params,
               want_params)
  assert sent == want_sent  # one f32 copy per island per sync, as DiLoCo's payload


@pytest.mark.parametrize("num", [2, 4, 8, 16])
def test_pairing_is_a_seeded_perfect_matching_meeting_every_peer_alike(num):
  """Each round's peers ``m ^ d`` are a perfect matching (an involution with no fixed point),
  a function of (seed, fragment, round) only, and every mask 1..M-1 is drawn about equally
  often, so every pair meets with probability 1 / (M - 1) per round."""
  rounds = 4000
  masks = np.asarray(jax.vmap(lambda t: noloco.draw(3, t, 0, num))(jnp.arange(rounds)))
  for d in np.unique(masks):
    peer = np.arange(num) ^ d
    assert (peer[peer] == np.arange(num)).all() and (peer != np.arange(num)).all()
  counts = collections.Counter(masks.tolist())
  assert set(counts) == set(range(1, num))
  expect = rounds / (num - 1)
  assert all(abs(c - expect) < 5 * np.sqrt(expect) for c in counts.values()), counts
  again = np.asarray(jax.vmap(lambda t: noloco.draw(3, t, 0, num))(jnp.arange(rounds)))
  np.testing.assert_array_equal(masks, again)
  other = np.asarray(jax.vmap(lambda t: noloco.draw(4, t, 0, num))(jnp.arange(rounds)))
  assert num == 2 or (masks != other).any()  # (M = 2 has one matching)
  assert int(noloco.draw(3, 0, 0, 1)) == 0  # one island: its own peer


@pytest.mark.parametrize("island,data,num", [(2, 2, 2), (2, 2, 4), (4, 1, 4)])
def test_hlo_receive_moves_one_peer_payload_by_collective_permute(island, data, num):
  """Compiled on ``island`` island shards x ``data`` devices, M islands: encode and merge cross
  nothing; every cross-island collective of ``receive`` is a collective-permute (no
  all-gather, all-reduce or all-to-all), one per shard mask b (``lax.switch``: one runs per
  round), each a perfect matching of the island shards a -> a ^ b that moves exactly each
  island's payload (``fragment_bytes``) and its who-sent weights, once."""
  mesh = _mesh(jax.devices()[:4], island, data)
  config = tiny_config(**{"algorithm": "islands", "islands.num": num, "outer.sync_every": 4,
                          "outer.gossip": "noloco", **HEAVY_BALL})
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = ckpt_lib.abstract_like(jax.eval_shape(alg.init, jax.random.key(0)),
                                 alg.state_shardings)
  lowered = alg.lower_sync(state, 0)
  crossing = lambda program: hlo.cross_island(
      hlo.collectives(program.compile().as_text(), 4), devices_per_island=data)
  assert crossing(lowered["encode"]) == [] and crossing(lowered["merge"]) == []
  colls = crossing(lowered["receive"])
  assert colls and {c.op for c in colls} == {"collective-permute"}
  by_pairs = collections.defaultdict(list)
  for c in colls:
    by_pairs[c.groups].append(c)
  assert len(by_pairs) == island - 1  # one matching per shard mask b = 1..A-1
  per = num // island  # islands per shard
  masks = set()
  for pairs, group in by_pairs.items():
    shard_pairs = {(s // data, t // data) for s, t in pairs}
    (b,) = {s ^ t for s, t in shard_pairs}  # a -> a ^ b for every shard a
    assert {s for s, _ in shard_pairs} == set(range(island)), pairs
    assert all(s % data == t % data for s, t in pairs)  # device i of a to device i of a ^ b
    masks.add(b)
    assert (hlo.island_payload_bytes(group, data) ==
            per * (alg.fragment_bytes[0] + alg.control_bytes_per_send)), (pairs, group)
  assert masks == set(range(1, island))


def test_bad_configs_are_refused_naming_the_key():
  def error(**over):
    config = tiny_config(**{"algorithm": "islands", "islands.num": 4, "outer.gossip": "noloco",
                            **over})
    with pytest.raises(ValueError) as e:
      config_lib.validate(config)
    return str(e.value)

  assert "outer.gossip='ring'" in error(**{"outer.gossip": "ring"})
  assert "islands.num=6" in error(**{"islands.num": 6})
  assert "launch.mode=decoupled" in error(**{"launch.mode": "decoupled"})
  assert "outer.compression" in error(**{"outer.compression": "int8"})
  assert "outer.fragments" in error(**{"outer.fragments": 2})
  assert "outer.transport" in error(**{"outer.transport": "host"})
  assert "outer.gossip_gamma" in error(**{"outer.gossip_gamma": -1.0})
  assert "algorithm=islands" in error(algorithm="ddp")
  config_lib.validate(tiny_config(**{"algorithm": "islands", "islands.num": 4,
                                     "outer.gossip": "noloco"}))
