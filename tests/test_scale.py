"""Real-size tooling: the local_c4 dataset, the scale bench's arithmetic, and (slow) a
c4_150m-shaped narrow config run on 16 emulated devices: 2 islands x fsdp 4 x tensor 2."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from experiments.bench import scale
from fedjax_lm import data as data_lib


@pytest.fixture(scope="module")
def local_c4(tmp_path_factory):
  """Built by the documented command (which once failed: TFDS refused the builder that
  ``python -m`` defined a second time beside the package's import)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  done = subprocess.run([sys.executable, "-m", "fedjax_lm.data.local_c4", "--data_dir", path],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "local_c4/train: 739 documents" in done.stdout, done.stdout
  return path


def test_local_c4_is_a_c4_shaped_tfds_dataset(local_c4):
  train = data_lib.get_source("local_c4", "train", data_dir=local_c4)
  valid = data_lib.get_source("local_c4", "validation", data_dir=local_c4)
  assert set(train[0]) == {"text", "url", "timestamp"}  # c4/en's features
  assert len(train) > 600 and 20 < len(valid) < len(train) // 10
  urls = {r["url"] for r in train.__getitems__(list(range(len(train))))}
  assert not urls & {r["url"] for r in valid.__getitems__(list(range(len(valid))))}
  files = os.listdir(os.path.join(local_c4, "local_c4", "1.0.0"))
  assert any(".array_record" in f for f in files)
  # Every byte of the corpus is in exactly one document.
  total = sum(len(r["text"]) for s in (train, valid) for r in s.__getitems__(list(range(len(s)))))
  corpus = sum(len(t.encode()) for _, _, t in data_lib.shakespeare.read_plays())
  assert total == corpus


def test_local_c4_feeds_the_training_pipeline(local_c4, tmp_path):
  source = data_lib.get_source("local_c4", "train", data_dir=local_c4)
  model = data_lib.train_sentencepiece(
      (r["text"].decode() for r in source.__getitems__(list(range(200)))),
      str(tmp_path / "spm"), 512, model_type="bpe")
  it = data_lib.make_train_iterator(source, tokenizer=f"sentencepiece:{model}", seq_len=32,
                                    batch_size=4, seed=0, append_eos=True)
  batch = next(it)
  assert batch["inputs"].shape == (4, 32) and int(batch["inputs"].max()) < 512


def test_wan_ratio_arithmetic():
  out = scale.wan_ratio(os.path.join(ROOT, "configs", "c4_150m.py"), testbed_params=1_000_000,
                        testbed_step_s=0.5)
  step = out["tokens_per_island_step"] * out["flops_per_token"] / (8 * 0.4 * scale.H100_PEAK_BF16)
  assert math.isclose(out["h100_step_s"], step)
  assert out["grad_bytes"] == 4 * out["params"]
  assert math.isclose(out["ratio"], out["grad_bytes"] * 8 / 1e9 / step)
  # Same ratio on the testbed: 4 MB of gradient over the chosen link / 0.5 s of compute.
  assert math.isclose(4e6 * 8 / out["testbed_link_bits_per_s"] / 0.5, out["ratio"])


NARROW = [  # c4_150m's depth, layout and data path; narrow widths, short rows
    "model.embed_dim=64", "model.num_heads=4", "model.num_kv_heads=4", "model.head_dim=16",
    "model.mlp_dim=128", "model.vocab_size=2048", "mesh.data=1", "mesh.fsdp=4",
    "mesh.tensor=2", "data.batch_size=4", "data.seq_len=64", "outer.sync_every=2",
    "total_steps=2", "inner.warmup_steps=1", "data.name=local_c4"]


@pytest.mark.slow
def test_c4_150m_shaped_narrow_run_on_16_devices(local_c4, tmp_path):
  """2 steps and 1 sync on 2 islands x fsdp 4 x tensor 2 (16 emulated devices, one process):
  the inner step has in-island collectives and none across islands; the sync's cross-island
  bytes in the HLO are the analytic payload (params x 4, counted once per device that holds a
  copy of a ZeRO shard); island_bytes after the sync is params x 4."""
  source = data_lib.get_source("local_c4", "train", data_dir=local_c4)
  model = data_lib.train_sentencepiece(
      (r["text"].decode() for r in source.__getitems__(list(range(len(source))))),
      str(tmp_path / "spm"), 2048, model_type="bpe")
  out_json = tmp_path / "out.json"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "experiments.bench.scale", "run", "--devices", "16",
         "--config", "configs/c4_150m.py", "--json", str(out_json), "--set", *NARROW,
         f"data.data_dir={local_c4}", f"data.tokenizer=sentencepiece:{model}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(out_json.read_text())
  comp, run = out["compile"], out["run"]
  assert comp["config"]["mesh"] == {"island": 2, "data": 1, "fsdp": 4, "tensor": 2}
  assert comp["config"]["model"]["num_layers"] == 12
  # The island invariant at this layout.
  assert comp["inner_collectives"] > 0 and comp["inner_cross_island"] == []
  assert comp["programs"]["inner"]["cross_island"] == 0
  assert comp["programs"]["receive/0"]["cross_island"] > 0
  # Bytes: the analytic payload is params x float32, exactly; the HLO's cross-island bytes
  # are that plus the who-sent weights: no ZeRO shard is held by two tensor devices (the norm
  # scales were, before zero_spec added tensor), so nothing is sent twice.
  n = comp["params"]
  assert comp["bytes_per_sync"] == comp["params_x_4"] == 4 * n
  assert comp["hlo_outer_payload_bytes"] == comp["hlo_expected_payload_bytes"]
  assert comp["duplicate_bytes"] == 0
  # Two steps, one sync after step 2 (send, receive, merge), bytes of one sync.
  assert [r["step"] for r in run["steps"]] == [1, 2]
  assert run["steps"][0]["events"] == [] and run["steps"][1]["events"]
  assert run["island_bytes"] == comp["bytes_per_sync"]
  assert all(np.isfinite(r["loss"]) for r in run["steps"])
  assert abs(run["steps"][0]["loss"] - math.log(2048)) < 1.5
