"""The contract every variant keeps: one registration line per variant in ``VARIANTS`` (its
config overrides, and what its one-island run must equal), and every test here runs over all
of them, in the mesh-axis deployment:

* **M = 1 identity**: with one island and outer SGD lr 1 (FedAvg), a variant whose merge
  loses nothing is plain training of that island (``"plain"``), or equals another variant's
  one-island run (``delayed_eager`` is DiLoCo: its eager estimate is the island's own fresh
  pseudo-gradient); lossy codecs and policies that restart from an older global have none;
* **bytes equal to the HLO**: with 2 islands x 2 devices, the only cross-island collectives
  are in ``receive/p``, and their payload is the engine's ``fragment_bytes[p]`` plus the
  who-sent weights (DES-LOC's ``moments/k`` programs: one copy of moment k); the inner step,
  encode, merge and a delayed policy's late step cross nothing;
* **exact resume**: the state alone (taken to the host and back, into a freshly built
  engine) continues bit for bit as the uninterrupted run; nothing lives outside it.

The decoupled deployment runs the same loop with its remote link; ``tests/test_decoupled.py``
checks it equals the mesh-axis run for DiLoCo, streaming int4 with error feedback, naive
delayed (16 steps, against tests/golden) and ours eager and ``outer.delay=eager`` (40 steps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import engine
from fedjax_lm import hlo
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib


class Variant(NamedTuple):
  overrides: dict
  m1_equals: str | None  # "plain", another variant's name, or None (no identity)


_STREAM = {"outer.fragments": 2, "outer.overlap": 1, "outer.mixing": 0.5}
_TOPK = {"outer.compression": "topk", "outer.topk_fraction": 1 / 8, "outer.topk_chunk": 64,
         "outer.topk_bits": 2, "outer.error_feedback": 0.95}

VARIANTS = {
    "diloco": Variant({}, "plain"),
    "streaming_no_overlap": Variant({"outer.fragments": 2}, "plain"),
    "streaming": Variant(_STREAM, None),  # alpha-mixes with where the island was tau ago
    "eager": Variant({**_STREAM, "outer.eager": True}, "plain"),
    "delayed_naive": Variant({"outer.delay": "naive"}, None),  # restarts one round late
    "delayed_eager": Variant({"outer.fragments": 2, "outer.delay": "eager"}, "diloco_p2"),
    "diloco_p2": Variant({"outer.fragments": 2}, "plain"),
    "int4_ef": Variant({"outer.compression": "int4", "outer.quant_block": 64,
                        "outer.error_feedback": 0.9, **_STREAM}, None),
    "sparseloco": Variant(_TOPK, None),
    "fp16": Variant({"outer.compression": "fp16"}, None),
    # DeMo (Psyche's form, 8 x 8 tiles): 1-bit signs under sign-SGD, no identity at M = 1
    "demo": Variant({"outer.compression": "demo", "outer.demo_chunk": 8, "outer.demo_topk": 8,
                     "outer.error_feedback": 0.999, "outer.optimizer": "sign_sgd",
                     "outer.learning_rate": 1e-3}, None),
    # ... with the paper's per-coefficient average (nothing more crosses)
    "demo_selected": Variant({"outer.compression": "demo", "outer.demo_chunk": 8,
                              "outer.demo_topk": 8, "outer.error_feedback": 0.999,
                              "outer.optimizer": "sign_sgd", "outer.learning_rate": 1e-3,
                              "outer.demo_aggregate": "selected"}, None),
    # DES-LOC: moments averaged every 2 (mu) / 3 (nu) steps; a no-op with one island
    "desloc": Variant({"outer.desloc_mu_every": 2, "outer.desloc_nu_every": 3}, "plain"),
    # NoLoCo: one peer per sync by ppermute; at M = 1 the island is its own peer (DiLoCo)
    "noloco": Variant({"outer.gossip": "noloco", "outer.optimizer": "slowmo"}, "plain"),
    "host_link": Variant({"outer.transport": "host", **_STREAM}, None),
    "absent_keep": Variant({"islands.absent": "4:1", "islands.absent_policy": "keep"}, None),
}


def _config(name: str, **extra):
  return tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 4,
                        **VARIANTS[name].overrides, **extra})


def _batches(m, steps, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    toks = rng.integers(0, 64, (m, 4, 17))
    yield {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
           "targets": jnp.asarray(toks[..., 1:], jnp.int32),
           "mask": jnp.ones((m, 4, 16), jnp.float32)}


def _build(config, devices):
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, devices)
  return engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))


def _train(alg, state, batches, first: int = 0):
  losses = []
  for step, batch in enumerate(batches, start=first):
    state, metrics = alg.inner_step(state, batch)
    state = alg.sync(state, step + 1)
    losses.append(np.asarray(metrics["island_loss"]))
  return state, np.array(losses)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.m1_equals])
def test_one_island_identity(name, one_device):
  steps = 8

  def run(variant):
    config = (tiny_config(algorithm="ddp", total_steps=steps) if variant == "plain" else
              _config(variant, **{"islands.num": 1, "outer.optimizer": "fedavg",
                                  "total_steps": steps}))
    alg = _build(config, one_device)
    state, losses = _train(alg, alg.init(jax.random.key(0)), _batches(1, steps))
    return losses, alg.eval_params(state)

  losses, params = run(name)
  want_losses, want_params = run(VARIANTS[name].m1_equals)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params,
               want_params)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "host_link"])
def test_cross_island_bytes_are_the_accounted_payload(name):
  """(The host link's exchange is off the device, on a thread: tests/test_golden's
  host_transport run and tests/test_train cover it.)"""
  mesh = mesh_lib.make_mesh({"island": 2, "data": 2, "fsdp": 1, "tensor": 1},
                            jax.devices()[:4])
  config = _config(name)
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = ckpt_lib.abstract_like(jax.eval_shape(alg.init, jax.random.key(0)),
                                 alg.state_shardings)
  crossing = lambda program: hlo.cross_island(
      hlo.collectives(program.compile().as_text(), 4), devices_per_island=2)
  for p in range(alg.spec.frags.num):
    lowered = alg.lower_sync(state, p)
    for stage in set(lowered) - {"receive"}:
      assert crossing(lowered[stage]) == [], (stage, p)
    assert (hlo.island_payload_bytes(crossing(lowered["receive"]), 2) ==
            alg.fragment_bytes[p] + alg.control_bytes_per_send > alg.control_bytes_per_send)
  for program, lowered in (alg.desloc.lower(state.islands).items() if alg.desloc else ()):
    assert hlo.island_payload_bytes(crossing(lowered), 2) == alg.desloc.bytes[
        int(program.split("/")[1])] > 0  # DES-LOC's moment averages


@pytest.mark.parametrize("name", VARIANTS)
def test_state_alone_resumes_exactly(name, one_device):
  """Steps 1-5, the state to the host and back into a new engine, steps 6-10: bit for bit
  the uninterrupted run's losses and params (the host link settles its exchanges first)."""
  steps, cut = 10, 5
  config = _config(name, total_steps=steps)
  alg = _build(config, one_device)
  whole, whole_losses = _train(alg, alg.init(jax.random.key(0)), _batches(2, steps))
  batches = list(_batches(2, steps))
  first, first_losses = _train(alg, alg.init(jax.random.key(0)), batches[:cut])
  host = jax.device_get(alg.settle(first))
  fresh = _build(config, one_device)
  state = jax.device_put(host, fresh.state_shardings)
  rest, rest_losses = _train(fresh, state, batches[cut:], first=cut)
  np.testing.assert_array_equal(np.concatenate([first_losses, rest_losses]), whole_losses)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh.eval_params(rest)),
               jax.device_get(alg.eval_params(whole)))
