"""Island health (fedjax_lm/health.py): the non-finite guard and island drop-out, each with an
injected fault, checked against values written out by hand."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from fedjax_lm import health
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import simulate


def _batch(num, seed, rows=2, seq=16):
  toks = np.random.default_rng(seed).integers(0, 64, (num, rows, seq + 1))
  return {"inputs": jnp.asarray(toks[..., :-1], jnp.int32),
          "targets": jnp.asarray(toks[..., 1:], jnp.int32),
          "mask": jnp.ones((num, rows, seq), jnp.float32)}


def _build(devices, **overrides):
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 3,
                          "outer.optimizer": "fedavg", "total_steps": 12, **overrides})
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, devices)
  return engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))


def _island(tree, m):
  return jax.tree.map(lambda x: np.asarray(x[m]), tree)


def _assert_tree_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def test_nonfinite_island_is_skipped_masked_and_restarted(one_device):
  """A NaN batch on island 1 at step 2: that step is skipped (params unchanged), island 1 is
  left out of the sync at step 3, so FedAvg's new global is island 0's params exactly (the
  mean renormalised over the one healthy island), and island 1 restarts from it."""
  alg = _build(one_device)
  state = alg.init(jax.random.key(0))
  state, m1 = alg.inner_step(state, _batch(2, 1))
  before = _island(state.islands.params, 1)
  state, m2 = alg.inner_step(state, health.poison(_batch(2, 2), np.array([False, True])))
  assert list(np.asarray(m1["island_ok"])) == [True, True]
  assert list(np.asarray(m2["island_ok"])) == [True, False]
  _assert_tree_close(_island(state.islands.params, 1), before, rtol=0, atol=0)
  state, _ = alg.inner_step(state, _batch(2, 3))
  island0 = _island(state.islands.params, 0)
  state = alg.sync(state, 3)
  _assert_tree_close(state.server.params, island0, rtol=1e-6, atol=1e-7)
  for m in range(2):
    _assert_tree_close(_island(state.islands.params, m), island0, rtol=1e-6, atol=1e-7)
  assert int(alg.failures_in_a_row(state)) == 0 and not np.asarray(state.islands.health.tainted).any()
  assert _all_finite(state)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_nonfinite_pseudo_gradient_is_masked(one_device, compression):
  """Island 1's params turn to NaN (e.g. a corrupted update): its pseudo-gradient is masked
  and the sync uses island 0 alone (int8: within its quantization error; error feedback on)."""
  alg = _build(one_device, **{"outer.compression": compression, "outer.quant_block": 64,
                              "outer.error_feedback": 0.0 if compression == "none" else 1.0})
  state = alg.init(jax.random.key(0))
  for step in range(3):
    state, _ = alg.inner_step(state, _batch(2, step))
  state = state._replace(islands=state.islands._replace(
      params=jax.tree.map(lambda x: x.at[1].set(jnp.nan), state.islands.params)))
  island0 = _island(state.islands.params, 0)
  state = alg.sync(state, 3)
  tol = dict(rtol=1e-6, atol=1e-7) if compression == "none" else dict(rtol=0, atol=2e-3)
  _assert_tree_close(state.server.params, island0, **tol)
  _assert_tree_close(_island(state.islands.params, 1), state.server.params, rtol=0, atol=0)
  assert _all_finite(state)


def test_ddp_skips_a_nonfinite_step(one_device):
  config = tiny_config(**{"algorithm": "ddp", "islands.num": 2, "total_steps": 12})
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, one_device)
  alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
  state = alg.init(jax.random.key(0))
  state, _ = alg.inner_step(state, _batch(2, 1))
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = alg.inner_step(state, health.poison(_batch(2, 2), np.array([True, False])))
  assert list(np.asarray(metrics["island_ok"])) == [False, False]  # the mean is non-finite
  _assert_tree_close(state.params, before, rtol=0, atol=0)
  assert int(alg.failures_in_a_row(state)) == 1
  state, metrics = alg.inner_step(state, _batch(2, 3))
  assert int(alg.failures_in_a_row(state)) == 0 and _all_finite(state)


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_absent_island_is_left_out_and_rejoins(one_device, policy):
  """Island 1 misses the send after step 3: FedAvg's global is island 0's params; island 1
  then restarts from it (reset) or keeps its own params (keep); its bytes are not counted."""
  alg = _build(one_device, **{"islands.absent": "3:1", "islands.absent_policy": policy})
  state = alg.init(jax.random.key(0))
  for step in range(3):
    state, _ = alg.inner_step(state, _batch(2, step))
  island0, island1 = _island(state.islands.params, 0), _island(state.islands.params, 1)
  state = alg.sync(state, 3)
  _assert_tree_close(state.server.params, island0, rtol=1e-6, atol=1e-7)
  _assert_tree_close(_island(state.islands.params, 1),
                     island0 if policy == "reset" else island1, rtol=1e-6, atol=1e-7)
  assert alg.island_bytes(3) == alg.bytes_per_sync / 2  # only island 0 sent
  assert alg.island_bytes(6) == alg.bytes_per_sync * 1.5
  assert int(alg.failures_in_a_row(state)) == 0


def test_dropout_schedule_is_seeded_and_has_the_rate():
  a = health.Participation(4, 0.25, "", seed=7)
  b = health.Participation(4, 0.25, "", seed=7)
  draws = np.array([a.present(s, 0) for s in range(1, 2001)])
  assert (draws == np.array([b.present(s, 0) for s in range(1, 2001)])).all()
  assert abs(1 - draws.mean() - 0.25) < 0.02
  assert not (draws == np.array([health.Participation(4, 0.25, "", 8).present(s, 0)
                                 for s in range(1, 2001)])).all()
  with pytest.raises(ValueError, match="islands.absent"):
    health.Participation(2, 0.0, "3:2", seed=0)
  with pytest.raises(ValueError, match="islands.absent"):
    health.Participation(2, 0.0, "3-1", seed=0)


def _smoke(workdir, **overrides):
  return simulate.config(smoke=True, **{
      "algorithm": "islands", "islands": {"num": 2, **overrides.pop("islands", {})},
      "outer": {"optimizer": "diloco", "sync_every": 5}, "total_steps": 20, "eval_every": 10,
      "log_every": 5, "checkpoint_every": 10, **overrides})


def test_injected_nan_batches_are_survived_end_to_end(tmp_path, data_dir, capsys):
  """``faults.nonfinite``: bad batches on island 1 at step 4 and island 0 at step 12;
  training finishes, warns naming each step and island, logs ``nonfinite``, and every
  checkpoint holds only finite values."""
  config = _smoke(tmp_path, data={"data_dir": data_dir, "seq_len": 64, "batch_size": 8},
                  faults={"nonfinite": "4:1,12:0"})
  records = simulate.run(config, str(tmp_path / "run"))
  out = capsys.readouterr().out + capsys.readouterr().err
  assert "non-finite loss or gradient on island 1 at step 4" in out
  assert "non-finite loss or gradient on island 0 at step 12" in out
  assert [r["nonfinite"] for r in records] == [1, 0, 1, 0]
  assert np.isfinite(records[-1]["eval_loss"])
  from fedjax_lm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  for step in (10, 20):
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(tmp_path, "run", "checkpoints", str(step), "state"))
    assert _all_finite(restored), step
  del ckpt_lib


@pytest.mark.slow
def test_all_islands_nonfinite_stops_with_last_good_checkpoint(tmp_path, data_dir):
  """Every island's batch is NaN from step 11 on: after islands.max_nonfinite=2 syncs with
  nothing finite the CLI exits non-zero with one line; the checkpoint at step 10 is intact."""
  bad = ",".join(f"{s}:{m}" for s in range(11, 31) for m in range(2))
  result = run_cli(["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                    f"--config.data.data_dir={data_dir}", "--config.launch.processes=1",
                    "--config.algorithm=islands", "--config.islands.num=2",
                    "--config.outer.sync_every=5", "--config.total_steps=30",
                    "--config.checkpoint_every=10", "--config.islands.max_nonfinite=2",
                    f"--config.faults.nonfinite={bad}"])
  assert result.returncode != 0
  assert result.stderr.count("error: ") == 1, result.stderr[-2000:]
  assert "error: nothing finite to apply for 2 syncs in a row (step 20" in result.stderr
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(r["eval_loss"]) for r in records if "eval_loss" in r)


def test_a_stop_on_nonfinite_finishes_the_save_in_flight_and_shuts_the_checkpointer(
    tmp_path, data_dir, one_device, monkeypatch):
  """In process: the run that stops with NonFiniteError at step 20 has waited for the
  checkpoint it started at step 10 and closed the checkpoint manager before the error leaves
  ``train`` (otherwise orbax's commit thread can outlive the interpreter: a traceback at exit
  and a step-10 directory that is never finalized)."""
  from fedjax_lm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lm import train as train_lib  # pylint: disable=g-import-not-at-top
  calls = []
  for name in ("wait", "close"):
    real = getattr(ckpt_lib.Checkpointer, name)
    monkeypatch.setattr(ckpt_lib.Checkpointer, name,
                        lambda self, _real=real, _name=name: (calls.append(_name), _real(self)))
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 5,
                          "total_steps": 30, "checkpoint_every": 10, "log_every": 5,
                          "eval_every": 10, "islands.max_nonfinite": 2,
                          "data.data_dir": data_dir, "faults.nonfinite": ",".join(
                              f"{s}:{m}" for s in range(11, 31) for m in range(2))})
  with pytest.raises(health.NonFiniteError, match=r"2 syncs in a row \(step 20"):
    train_lib.train(config, str(tmp_path), devices=one_device)
  assert calls == ["wait", "close"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
  assert ckpt_lib.Checkpointer(str(tmp_path), 10, 3).latest_step() == 10
