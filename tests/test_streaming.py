"""Streaming DiLoCo, overlap / mixing, eager updates and compressed exchange: identities,
a reference implementation in numpy, byte accounting against the HLO, exact resume."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import run_cli
from conftest import tiny_config
from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import config_lib
from fedjax_lm import fragments
from fedjax_lm import hlo
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import model as model_lib
from fedjax_lm import reference
from fedjax_lm import steps


def _mesh(devices, **sizes):
  return mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1, **sizes}, devices)


def _batches(m, steps, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    toks = rng.integers(0, 64, (m, 4, 17))
    yield {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
           "targets": jnp.asarray(toks[..., 1:], jnp.int32), "mask": jnp.ones((m, 4, 16))}


# ------------------------------------------------------------------ the numpy reference

def _reference(y, *, lr_in, lr, mu, num_frags, every, overlap, alpha, eager, total):
  """Streaming DiLoCo / eager updates on loss 0.5 |w - y_m|^2 per island (inner SGD), written
  from the definitions, independently of the library: rows p::P form fragment p; fragment p
  sends when step % H == p H // P (all at the last step), merges tau steps later; outer
  Nesterov per row (optax: t = d + mu t; u = -lr (d + mu t)). At the last step every
  fragment in flight is merged, then all are sent and merged again."""
  m, r = y.shape
  g, local, t = np.zeros(r), np.zeros((m, r)), np.zeros(r)
  avg_prev, own_prev, base = np.zeros(r), np.zeros((m, r)), np.zeros((m, r))
  due = {}  # fragment -> step its result merges

  def merge(p):
    rows = slice(p, None, num_frags)
    if eager:
      local[:, rows] += (1 - alpha) * (g[rows] - base[:, rows])
    else:
      local[:, rows] = alpha * local[:, rows] + (1 - alpha) * g[rows]
    del due[p]

  for step in range(1, total + 1):
    local = local - lr_in * (local - y)
    sends = [p for p in range(num_frags) if step % every == p * every // num_frags]
    if step == total:  # the end: land everything in flight, then flush every fragment
      for p in list(due):
        merge(p)
      sends = list(range(num_frags))
    for p in sends:
      rows = slice(p, None, num_frags)
      d = g[rows] - local[:, rows]
      if eager:
        d_hat = avg_prev[rows] + (d - own_prev[:, rows]) / m
        base[:, rows] = g[rows] - lr * (d_hat + mu * (d_hat + mu * t[rows]))
        own_prev[:, rows] = d
        local[:, rows] = base[:, rows]
      mean = d.mean(0)
      t[rows] = mean + mu * t[rows]
      g[rows] = g[rows] - lr * (mean + mu * t[rows])
      avg_prev[rows] = mean
      due[p] = min(step + overlap, total)
    for p in [p for p, s in due.items() if s == step]:
      merge(p)
  return g, local


@pytest.mark.parametrize("num_frags,overlap,alpha,eager", [
    (1, 0, 0.0, False), (2, 0, 0.0, False), (2, 1, 0.5, False), (3, 2, 0.5, False),
    (3, 2, 0.0, True), (2, 1, 0.5, True)])
def test_streaming_matches_numpy_reference(one_device, num_frags, overlap, alpha, eager):
  """Per-fragment outer momentum, staggered sends, the tau-step overlap, alpha mixing, eager
  steps and their correction, and the final flush, on a model with 7 rows (uneven
  fragments) and 3 islands over 11 steps (not a multiple of H = 4)."""
  total, every, m, r = 11, 4, 3, 7
  y = np.random.default_rng(1).standard_normal((m, r)).astype(np.float32)
  config = tiny_config(**{
      "algorithm": "islands", "islands.num": m, "outer.sync_every": every,
      "outer.optimizer": "diloco", "outer.learning_rate": 0.7, "outer.momentum": 0.9,
      "outer.fragments": num_frags, "outer.overlap": overlap, "outer.mixing": alpha,
      "outer.eager": eager, "total_steps": total})
  alg = engine.build_for_loss(
      config, _mesh(one_device), loss_fn=lambda p, b: 0.5 * jnp.sum((p["w"] - b["y"][0]) ** 2),
      init_fn=lambda key: {"w": jnp.zeros(r)},
      abstract_params={"w": jax.ShapeDtypeStruct((r,), jnp.float32)},
      param_specs={"w": P(None)}, inner_tx=optax.sgd(0.5))
  state = alg.init(jax.random.key(0))
  batch = {"y": jnp.asarray(y)[:, None, :]}
  for step in range(1, total + 1):
    state, _ = alg.inner_step(state, batch)
    state = alg.sync(state, step)
  g, local = _reference(y, lr_in=0.5, lr=0.7, mu=0.9, num_frags=num_frags, every=every,
                        overlap=overlap, alpha=alpha, eager=eager, total=total)
  np.testing.assert_allclose(state.server.params["w"], g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.islands.params["w"], local, rtol=1e-5, atol=1e-6)


def test_p1_no_overlap_no_compression_is_diloco(one_device):
  """P=1, tau=0, alpha=0, no codec: the pipeline reproduces the reference DiLoCo
  (:func:`fedjax_lm.reference.diloco`: the paper's steps, AdamW and Nesterov written out in
  jax.numpy; islands reset), on the transformer with the config's AdamW, losses and params."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 3,
                          "total_steps": 8})
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  alg = engine.build(config, _mesh(one_device), model_cfg)
  state = alg.init(jax.random.key(0))
  params0, batches = jax.tree.map(jnp.copy, state.server.params), list(_batches(2, 8))
  losses = []
  for step, batch in enumerate(batches):
    state, metrics = alg.inner_step(state, batch)
    state = alg.sync(state, step + 1)
    losses.append(metrics["island_loss"])
  ref_global, ref_losses = reference.diloco(
      functools.partial(steps.mean_loss, model_lib.build(model_cfg)[0]), params0,
      jax.tree.map(lambda *b: jnp.stack(b, axis=1), *batches), H=3,
      inner=reference.AdamW.from_config(config.inner, 8), outer_lr=0.7, outer_momentum=0.9)
  np.testing.assert_allclose(np.stack(losses), ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state.server.params, ref_global)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.stack([b, b]), rtol=1e-5,
                                                       atol=1e-6),
               state.islands.params, ref_global)


def test_fragments_send_diloco_bytes_at_a_quarter_of_the_peak(one_device):
  """P=4 (4 layers: one layer per fragment, embeddings split by rows): every H steps the
  fragments send exactly DiLoCo's bytes; the largest single sync is 1/4 of DiLoCo's; the last
  step flushes the 3 fragments that did not just sync."""
  common = {"algorithm": "islands", "islands.num": 2, "outer.sync_every": 8,
            "total_steps": 20, "model.num_layers": 4, "model.vocab_size": 256}
  mesh = _mesh(one_device)
  model_cfg = model_lib.ModelConfig.from_config(tiny_config(**common).model)
  diloco = engine.build(tiny_config(**common), mesh, model_cfg)
  stream = engine.build(tiny_config(**common, **{"outer.fragments": 4}), mesh, model_cfg)
  assert stream.fragment_bytes == (diloco.bytes_per_sync // 4,) * 4
  for done in (8, 16):
    assert stream.island_bytes(done) == diloco.island_bytes(done)
  assert stream.island_bytes(7) == 3 * diloco.bytes_per_sync // 4  # sent at 2, 4, 6
  assert stream.island_peak_bytes(16) * 4 == diloco.island_peak_bytes(16)
  # Step 20: fragment 2 syncs on schedule, 0, 1 and 3 are flushed; DiLoCo flushes all at 20.
  assert stream.clock.schedule.sends(20) == [2, 0, 1, 3]
  assert diloco.island_bytes(20) == 3 * diloco.bytes_per_sync  # 8, 16, 20
  assert stream.island_bytes(20) == 13 * diloco.bytes_per_sync // 4  # 2, 4, ..., 18 + 4 at 20


def test_outer_momentum_moves_only_when_its_fragment_syncs(one_device):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 4,
                          "outer.fragments": 2, "total_steps": 8})
  alg = engine.build(config, _mesh(one_device), model_lib.ModelConfig.from_config(config.model))
  state = alg.init(jax.random.key(0))
  trace = lambda s, p: sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(
      s.server.outer[p]))
  for step, batch in enumerate(_batches(2, 2)):  # fragment 1 sends at step 2 (offset H/2)
    state, _ = alg.inner_step(state, batch)
    state = alg.sync(state, step + 1)
  assert trace(state, 1) > 0 and trace(state, 0) == 0


def test_schedule_in_flight_is_a_function_of_the_step():
  s = fragments.Schedule(every=8, fragments=4, overlap=3, total=20)
  assert [s.sends(d) for d in (2, 4, 6, 8)] == [[1], [2], [3], [0]]
  assert [s.merges(d) for d in (5, 7, 9, 11)] == [[1], [2], [3], [0]]
  assert s.sends(20) == [2, 0, 1, 3] and s.merges(20) == [1, 2, 0, 1, 3]
  assert s.events(20)[0] == ("merge", 1)  # sent at 18, still in flight: lands before the flush
  assert [s.send_count(p, 20) for p in range(4)] == [3, 4, 3, 3]  # 8 16 20; 2 10 18 20; ...
  assert s.merges(17) == [3] and s.merges(19) == [0]  # fragment 1, sent at 18, merges at 20
  with pytest.raises(ValueError, match="outer.overlap=8"):
    fragments.Schedule(every=8, fragments=1, overlap=8, total=20)


@pytest.mark.parametrize("compression,dtype", [("int8", "s8"), ("int4", "u8"), ("bf16", "u16"),
                                               ("topk", "u16")])
def test_hlo_exchange_sends_the_encoded_payload(compression, dtype):
  """2 islands x 2 devices, P=2: the only cross-island collectives are all-gathers of the
  encoded dtypes (plus f32 scales), and their bytes equal ``fragment_bytes`` (float32 values
  would be 2-8x more); encode stays inside islands."""
  mesh = _mesh(jax.devices()[:4], island=2, data=2)
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.fragments": 2,
                          "outer.overlap": 1, "outer.compression": compression,
                          "outer.quant_block": 64, "outer.topk_chunk": 256,
                          "outer.error_feedback": 0.0 if compression == "bf16" else 1.0})
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = ckpt_lib.abstract_like(jax.eval_shape(alg.init, jax.random.key(0)),
                                 alg.state_shardings)
  for p in range(2):
    lowered = alg.lower_sync(state, p)
    enc = hlo.collectives(lowered["encode"].compile().as_text(), 4)
    assert hlo.cross_island(enc, 2) == []
    text = lowered["receive"].compile().as_text()
    crossing = hlo.cross_island(hlo.collectives(text, 4), 2)
    assert crossing and {c.op for c in crossing} == {"all-gather"}
    assert (hlo.island_payload_bytes(crossing, 2) ==
            alg.fragment_bytes[p] + alg.control_bytes_per_send)
    assert f"{dtype}[" in " ".join(l for l in text.splitlines() if "all-gather" in l)


@pytest.mark.parametrize("override,match", [
    ({"outer.compression": "int5"}, "outer.compression='int5'"),
    ({"outer.overlap": 50}, "outer.overlap=50"),
    ({"outer.eager": True}, "outer.eager needs outer.overlap"),
    ({"outer.error_feedback": 0.9}, "outer.error_feedback > 0 needs"),
    ({"outer.mixing": 1.5}, "outer.mixing=1.5"),
    ({"outer.fragments": 64}, "outer.fragments=64"),
])
def test_bad_streaming_options_are_one_clear_error(override, match):
  config = tiny_config(**{"algorithm": "islands", "outer.sync_every": 50, **override})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_muon_inner_optimizer_trains(one_device):
  """MuLoCo: Muon inside (orthogonalised updates on the stacked layer matrices, AdamW-like
  updates elsewhere), DiLoCo outside."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 4,
                          "inner.optimizer": "muon", "inner.learning_rate": 1e-2,
                          "total_steps": 12})
  alg = engine.build(config, _mesh(one_device), model_lib.ModelConfig.from_config(config.model))
  state = alg.init(jax.random.key(0))
  batch = next(_batches(2, 1))
  losses = []
  for step in range(12):
    state, metrics = alg.inner_step(state, batch)
    state = alg.sync(state, step + 1)
    losses.append(float(np.mean(metrics["island_loss"])))
  assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_kill_inside_an_overlap_window_resumes_exactly(tmp_path, data_dir):
  """One process, streaming (P=2, tau=2, H=4, int4 with stochastic rounding and error
  feedback, alpha=0.5, eager): SIGKILL after step 7, with fragment 1 in flight since step 6;
  the re-run resumes from the step-6 checkpoint and logs the losses of an uninterrupted run."""
  args = ["--config", "configs/tiny.py", f"--config.data.data_dir={data_dir}",
          "--config.launch.processes=1", "--config.algorithm=islands", "--config.islands.num=2",
          "--config.outer.sync_every=4", "--config.outer.fragments=2", "--config.outer.overlap=2",
          "--config.outer.mixing=0.5", "--config.outer.compression=int4",
          "--config.outer.quant_block=64", "--config.outer.stochastic_rounding=True",
          "--config.outer.error_feedback=1.0", "--config.outer.eager=True",
          "--config.checkpoint_every=3"]
  straight = run_cli([*args, "--workdir", str(tmp_path / "straight")])
  assert straight.returncode == 0, straight.stderr[-3000:]
  resumed = str(tmp_path / "resumed")
  killed = run_cli([*args, "--workdir", resumed, "--config.faults.kill=process/0@7"])
  assert killed.returncode != 0
  again = run_cli([*args, "--workdir", resumed])
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed at step 6" in again.stdout + again.stderr
  a = metrics_lib.read_jsonl(os.path.join(tmp_path / "straight", "metrics.jsonl"))
  b = metrics_lib.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
  assert [r["step"] for r in b] == list(range(1, 9))
  for ra, rb in zip(a, b):
    for key in ("island_loss", "eval_loss", "island_bytes", "island_peak_bytes"):
      if key in ra:
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"{key} {ra['step']}")


@pytest.mark.slow
def test_host_transport_matches_xla_collectives(tmp_path, data_dir):
  """2 processes, one island each: the exchange done on a host thread (real overlap) gives the
  same island losses and eval losses as the all-gather inside XLA, fragments in flight at
  checkpoints and evals included."""
  args = ["--config", "configs/tiny.py", f"--config.data.data_dir={data_dir}",
          "--config.algorithm=islands", "--config.islands.num=2", "--config.mesh.island=2",
          "--config.outer.sync_every=4", "--config.outer.fragments=2",
          "--config.outer.overlap=2", "--config.outer.compression=int8",
          "--config.outer.quant_block=64", "--config.total_steps=10",
          "--config.checkpoint_every=5"]
  runs = {}
  for name in ("xla", "host"):
    result = run_cli([*args, f"--config.outer.transport={name}", "--workdir",
                      str(tmp_path / name)])
    assert result.returncode == 0, result.stderr[-3000:]
    runs[name] = metrics_lib.read_jsonl(os.path.join(tmp_path / name, "metrics.jsonl"))
  for ra, rb in zip(runs["xla"], runs["host"]):
    for key in ("island_loss", "eval_loss", "island_bytes"):
      if key in ra:
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"{key} {ra['step']}")
  assert len(runs["host"]) == 10
