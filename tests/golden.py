"""Golden numerics: eleven short runs whose per-step losses, final eval loss and byte counts
were recorded before the engine was restructured (``tests/golden/engine.json``), so that a
refactor that changes numerics fails ``tests/test_golden.py``.

Regenerate (only when a numerics change is intended, and say so in the commit), under the
tests' own XLA configuration:

    FEDJAX_LM_WRITE_GOLDEN=1 python -m pytest -q -n 2 tests/test_golden.py

Every run but ``host_transport`` trains in this process on one device (all islands simulated);
``host_transport`` runs the CLI with 2 processes, one island each, over the host link.

The last bits of a loss depend on the CPU XLA compiles for (measured: the AVX2 AMD EPYC and the
AVX-512 Intel Xeon of earlier sessions give ``engine.json`` bit for bit; a Zen 4 AMD EPYC with
AVX-512 and a Zen 3 one with AVX2 only differ from it in the 7th digit). So a CPU class whose results differ keeps its own
recording, ``engine.<class>.json``, made from the same code (the regenerate command above
writes the running machine's class), and is held to it bit for bit; a class with no recording
is held to ``engine.json`` at rtol 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys

from fedjax_lm import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "golden", "engine.json")
# CPU classes whose bits are engine.json's (measured, see above)
DEFAULT_CLASSES = ("x86-avx2", "intel-avx512")


def cpu_class(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU as far as the golden bits go (``fedjax_lm.machine.cpu_class``)."""
  return machine.cpu_class(cpuinfo)


def golden_file(cls: str | None = None) -> tuple[str, bool]:
  """(recording to compare with, bit for bit?) for this machine's CPU class."""
  cls = cls or cpu_class()
  if cls in DEFAULT_CLASSES:
    return GOLDEN, True
  own = os.path.join(HERE, "golden", f"engine.{cls}.json")
  return (own, True) if os.path.exists(own) else (GOLDEN, False)

_COMMON = {"total_steps": 16, "log_every": 1, "eval_every": 8, "checkpoint_every": 1000,
           "mesh.island": 1, "mesh.data": 1, "launch.processes": 1, "launch.mode": "none"}
_ISLANDS = {"algorithm": "islands", "islands.num": 2, "outer.sync_every": 4}

RUNS: dict[str, dict] = {
    "ddp": {"algorithm": "ddp", "islands.num": 2},
    "fedavg": {**_ISLANDS, "outer.optimizer": "fedavg"},
    "diloco": {**_ISLANDS, "outer.optimizer": "diloco"},
    "streaming_int4_ef": {**_ISLANDS, "outer.sync_every": 8, "outer.fragments": 4,
                          "outer.overlap": 2, "outer.mixing": 0.5, "outer.compression": "int4",
                          "outer.quant_block": 64, "outer.error_feedback": 0.9},
    "eager": {**_ISLANDS, "outer.fragments": 2, "outer.overlap": 1, "outer.mixing": 0.5,
              "outer.eager": True},
    "sparseloco_topk": {**_ISLANDS, "outer.optimizer": "fedavg", "outer.compression": "topk",
                        "outer.topk_fraction": 1 / 8, "outer.topk_chunk": 64,
                        "outer.topk_bits": 2, "outer.error_feedback": 0.95},
    "dropout_keep": {**_ISLANDS, "islands.num": 3, "islands.absent": "4:1,8:0,12:2",
                     "islands.absent_policy": "keep"},
    "dropout_reset": {**_ISLANDS, "islands.num": 3, "islands.dropout": 0.4,
                      "islands.absent_policy": "reset"},
    "nonfinite_guard": {**_ISLANDS, "faults.nonfinite": "3:1,10:0"},
    "host_transport": {**_ISLANDS, "outer.fragments": 2, "outer.overlap": 1,
                       "outer.mixing": 0.5, "outer.compression": "int8",
                       "outer.quant_block": 64, "outer.transport": "host", "mesh.island": 2,
                       "launch.processes": 2, "launch.mode": "local"},
    "muloco": {**_ISLANDS, "inner.optimizer": "muon", "inner.learning_rate": 1e-2},
    "delayed_naive": {**_ISLANDS, "outer.delay": "naive"},
    "delayed_eager": {**_ISLANDS, "outer.fragments": 2, "outer.delay": "eager"},
}


def overrides(name: str, data_dir: str) -> dict:
  return {**_COMMON, "data.data_dir": data_dir, **RUNS[name]}


def summary(records: list[dict]) -> dict:
  """What the golden file keeps of one run's ``metrics.jsonl``."""
  last = records[-1]
  return {"island_loss": [r["island_loss"] for r in records],
          "steps": [r["step"] for r in records],
          "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r],
          "island_bytes": last["island_bytes"], "island_peak_bytes": last["island_peak_bytes"],
          "island_control_bytes": last["island_control_bytes"],
          "nonfinite": [r["nonfinite"] for r in records]}


def run(name: str, workdir: str, data_dir: str) -> dict:
  """Trains run ``name`` into ``workdir`` and returns its :func:`summary`."""
  from fedjax_lm import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  cfg = overrides(name, data_dir)
  if cfg["launch.processes"] > 1:
    args = ["--config", "configs/tiny.py", "--workdir", workdir,
            *(f"--config.{k}={v}" for k, v in cfg.items())]
    done = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                          env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                          timeout=600)
    if done.returncode:
      raise RuntimeError(f"golden run {name} failed:\n{done.stderr[-3000:]}")
  else:
    import jax  # pylint: disable=g-import-not-at-top
    from configs import tiny  # pylint: disable=g-import-not-at-top
    from fedjax_lm import config_lib, train  # pylint: disable=g-import-not-at-top
    config = tiny.get_config()
    config.unlock()
    config_lib.override(config, cfg)
    train.train(config, workdir, devices=jax.devices()[:1])
  return summary(metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
