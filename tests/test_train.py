"""End-to-end training through the real CLI and launcher (several local processes)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from conftest import run_cli
from conftest import tiny_config
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import train as train_lib


def _train(workdir, data_dir, *overrides, env=None):
  args = ["--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", *overrides]
  return run_cli(args, env=env)


def _records(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _ok(result):
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_multiprocess_training_decreases_loss(tmp_path, data_dir):
  """2 processes x 1 CPU device, data parallel: loss goes down, contract fields are logged,
  TensorBoard events and checkpoints are written."""
  _ok(_train(tmp_path, data_dir, "--config.total_steps=16", "--config.eval_every=8",
             "--config.inner.learning_rate=1e-2"))
  records = _records(tmp_path)
  assert [r["step"] for r in records] == list(range(1, 17))
  assert {"step", "tokens", "train_loss", "island_bytes", "tokens_per_sec"} <= set(records[0])
  assert records[-1]["tokens"] == 16 * 4 * 32
  assert np.mean([r["train_loss"] for r in records[-3:]]) < records[0]["train_loss"] - 1.0
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [8, 16] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["15", "16"]


@pytest.mark.slow
def test_sigkill_one_process_then_resume_is_exact(tmp_path, data_dir):
  """SIGKILL process 1 after step 7: the launcher stops everyone and fails; the same command
  resumes from the step-6 checkpoint (params, optimizer and data position) and logs exactly
  the losses of an uninterrupted run."""
  straight = tmp_path / "straight"
  _ok(_train(straight, data_dir))
  resumed = tmp_path / "resumed"
  killed = _train(resumed, data_dir, "--config.faults.kill=process/1@7")
  assert killed.returncode != 0
  assert "process 1 exited with -9" in killed.stderr
  result = _ok(_train(resumed, data_dir))
  assert "resumed at step 6" in result.stdout + result.stderr
  a, b = _records(straight), _records(resumed)
  assert [r["step"] for r in b] == list(range(1, 9))  # records past step 6 were replaced
  for ra, rb in zip(a, b):
    for key in ("train_loss", "eval_loss"):
      if key in ra:
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-6, err_msg=f"step {ra['step']}")


@pytest.mark.slow
def test_simulated_islands_match_one_island_per_process(tmp_path, data_dir):
  """M=2 islands simulated on one process (island axis 1) and M=2 islands on 2 processes
  (island axis 2) run the same code and give the same losses."""
  common = ["--config.algorithm=islands", "--config.islands.num=2",
            "--config.outer.sync_every=3", "--config.total_steps=6", "--config.eval_every=6"]
  _ok(_train(tmp_path / "one", data_dir, *common, "--config.launch.processes=1",
             "--config.mesh.island=1"))
  _ok(_train(tmp_path / "two", data_dir, *common, "--config.launch.processes=2",
             "--config.mesh.island=2"))
  a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
  np.testing.assert_allclose([r["island_loss"] for r in a], [r["island_loss"] for r in b],
                             rtol=2e-5)
  np.testing.assert_allclose(a[-1]["eval_loss"], b[-1]["eval_loss"], rtol=2e-5)
  assert a[-1]["island_bytes"] == b[-1]["island_bytes"] > 0


def test_unknown_config_key_is_one_clear_error(tmp_path, data_dir):
  result = _train(tmp_path, data_dir, "--config.inner.lr=0.1")
  assert result.returncode != 0
  assert "lr" in result.stderr and "Traceback" not in result.stderr


ISLANDS = ["--config.algorithm=islands", "--config.islands.num=2"]


@pytest.mark.parametrize("overrides,culprit", [
    (["--config.total_steps=abc"], "--config.total_steps=abc"),
    (["--config.islands.num=0"], "islands.num=0"),
    ([*ISLANDS, "--config.outer.sync_every=0"], "outer.sync_every=0"),
    ([*ISLANDS, "--config.outer.sync_every=2", "--config.outer.fragments=3"],
     "outer.fragments=3"),
    (["--config.inner.optimizer=lion"], "inner.optimizer='lion'"),
    ([*ISLANDS, "--config.outer.compression=int3"], "outer.compression='int3'"),
    (["--config.data.name=no_such_dataset"], "no_such_dataset"),
    (["--config.data.seq_len=4096"], "data.seq_len=4096"),
    (["--config.data.partition=by_act"], "data.partition='by_act'"),
    ([*ISLANDS, "--config.islands.dropout=1.5"], "islands.dropout=1.5"),
    ([*ISLANDS, "--config.islands.absent=10-1"], "islands.absent='10-1'"),
    ([*ISLANDS, "--config.islands.absent=10:7"], "names island 7"),
    ([*ISLANDS, "--config.islands.absent_policy=wait"], "islands.absent_policy='wait'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, data_dir, overrides, culprit):
  (tmp_path / "notes.txt").write_text("mine")
  result = _train(tmp_path, data_dir, "--config.launch.processes=1", *overrides)
  assert result.returncode != 0
  assert culprit in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert (tmp_path / "notes.txt").read_text() == "mine"
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_workdir_that_is_a_file_is_one_clear_error(tmp_path, data_dir):
  (tmp_path / "file").write_text("mine")
  result = _train(tmp_path / "file", data_dir, "--config.launch.processes=1")
  assert result.returncode != 0 and "Not a directory" in result.stderr
  assert "Traceback" not in result.stderr and (tmp_path / "file").read_text() == "mine"


def test_impossible_mesh_is_one_clear_error(tmp_path, data_dir):
  result = _train(tmp_path, data_dir, "--config.mesh.data=3")
  assert result.returncode != 0
  assert "Impossible mesh" in result.stdout + result.stderr


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, data_dir):
  single = ["--config.launch.processes=1", "--config.total_steps=3"]
  _ok(_train(tmp_path, data_dir, *single))
  _corrupt(tmp_path / "checkpoints" / "3")
  result = _train(tmp_path, data_dir, "--config.launch.processes=1", "--config.total_steps=6")
  assert result.returncode != 0
  assert "Could not restore checkpoint step 3" in result.stderr
  assert "no checkpoint in" in result.stderr and "Traceback" not in result.stderr


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir):
  """The final checkpoint (step 8) corrupt: a warning names it, it is moved aside (not
  deleted), the re-run resumes from step 6 and its losses match the uninterrupted run."""
  single = ["--config.launch.processes=1", "--config.checkpoint_every=3",
            "--config.total_steps=8"]
  _ok(_train(tmp_path / "ref", data_dir, *single))
  _ok(_train(tmp_path / "run", data_dir, *single))
  _corrupt(tmp_path / "run" / "checkpoints" / "8")
  result = _ok(_train(tmp_path / "run", data_dir, *single))
  assert "Could not restore checkpoint step 8" in result.stderr
  assert "resumed at step 6" in result.stdout + result.stderr
  assert os.listdir(tmp_path / "run" / "corrupt_checkpoints") == ["8-0"]
  want = {r["step"]: r["train_loss"] for r in _records(tmp_path / "ref")}
  got = {r["step"]: r["train_loss"] for r in _records(tmp_path / "run")}
  assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_at_the_current_step_and_resume_is_exact(tmp_path, data_dir, processes):
  """SIGTERM mid-run (to the launcher, or to the single process): a checkpoint is written at
  the step reached (not a checkpoint_every multiple), the run exits non-zero, and the re-run
  resumes there with the same losses as an uninterrupted run. The signal goes once 10 steps
  are logged; the 110 steps left are the margin for it to arrive (a few steps, measured)."""
  total, sent_after = 120, 10
  args = ["--config", "configs/tiny.py", f"--config.data.data_dir={data_dir}",
          f"--config.launch.processes={processes}", f"--config.total_steps={total}",
          "--config.checkpoint_every=1000", "--config.eval_every=1000"]
  _ok(run_cli([*args, "--workdir", str(tmp_path / "ref")]))
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args, "--workdir",
                           str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and
                                        len(_records(tmp_path / "run")) > sent_after):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=180)
  assert proc.returncode != 0
  saved = [int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and sent_after < saved[0] < total, (saved, err[-2000:])
  assert f"checkpoint written at step {saved[0]}" in err
  result = _ok(run_cli([*args, "--workdir", str(tmp_path / "run")]))
  assert f"resumed at step {saved[0]}" in result.stdout + result.stderr
  want = {r["step"]: r["train_loss"] for r in _records(tmp_path / "ref")}
  got = {r["step"]: r["train_loss"] for r in _records(tmp_path / "run")}
  assert got == want


@pytest.mark.slow
def test_data_does_not_depend_on_the_layout_and_resume_is_elastic(tmp_path, data_dir):
  """1 process vs 2 processes (data=2): the same tokens, so the same losses up to the float
  rounding of the gradient all-reduce. A checkpoint of the 2-process run resumes on 1 process
  at the same data position."""
  base = ["--config.total_steps=8", "--config.checkpoint_every=4", "--config.eval_every=100"]
  _ok(_train(tmp_path / "one", data_dir, *base, "--config.launch.processes=1"))
  killed = _train(tmp_path / "two", data_dir, *base, "--config.launch.processes=2",
                  "--config.faults.kill=process/1@4")  # SIGKILLed after its step-4 checkpoint
  assert killed.returncode != 0
  result = _ok(_train(tmp_path / "two", data_dir, *base, "--config.launch.processes=1"))
  assert "resumed at step 4" in result.stdout + result.stderr
  one = {r["step"]: r["train_loss"] for r in _records(tmp_path / "one")}
  two = {r["step"]: r["train_loss"] for r in _records(tmp_path / "two")}
  assert sorted(one) == sorted(two) == list(range(1, 9))
  np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=2e-5)


def test_checkpoint_from_another_config_is_refused_naming_the_field(tmp_path, data_dir):
  single = ["--config.launch.processes=1", "--config.total_steps=3"]
  _ok(_train(tmp_path, data_dir, *single))
  result = _train(tmp_path, data_dir, *single, "--config.model.num_layers=3",
                  "--config.total_steps=6")
  assert result.returncode != 0
  assert "model.num_layers=2 (this run: 3)" in result.stderr
  assert "Traceback" not in result.stderr
  assert os.path.isdir(tmp_path / "checkpoints" / "3")  # nothing moved or deleted


@pytest.mark.parametrize("streaming", [{}, {
    "outer.sync_every": 4, "outer.fragments": 2, "outer.overlap": 1, "outer.mixing": 0.5,
    "outer.compression": "int4", "outer.quant_block": 64, "outer.error_feedback": 1.0,
    "outer.eager": True, "outer.transport": "host"}])
def test_loop_compiles_once_and_never_reads_back_implicitly(tmp_path, data_dir, one_device,
                                                            caplog, streaming):
  """The loop runs under a device->host transfer guard (implicit reads raise), and the inner
  step and each fragment's sync programs compile exactly once over many steps, syncs, evals
  and checkpoints (also streaming, with the host transport)."""
  config = tiny_config(**{"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2,
                          "total_steps": 9, "log_every": 2, "eval_every": 3,
                          "checkpoint_every": 4, "data.data_dir": data_dir, **streaming})
  fragments = streaming.get("outer.fragments", 1)
  import jax  # pylint: disable=g-import-not-at-top
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    record = train_lib.train(config, str(tmp_path), devices=one_device)
  compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  for name, times in (("inner_step", 1), ("encode", fragments), ("receive", fragments),
                      ("merge", fragments)):
    assert sum(f"Compiling jit({name})" in m for m in compiles) == times, [
        m[:80] for m in compiles]
  assert record["step"] == 9 and np.isfinite(record["eval_loss"])
