"""Islands simulated in one process, for notebooks and sweeps: configs and in-process runs.

``islands.num = M`` with ``mesh.island = 1`` runs all M islands on one device as a batched
(``vmap``) computation with no collectives: the same numerics as M islands on M devices
(tested), the bytes accounted as if they crossed the island axis.

    config = simulate.config(algorithm="islands", islands={"num": 2},
                             outer={"optimizer": "diloco", "sync_every": 20})
    records = simulate.run(config, "runs/nb/diloco")   # metrics.jsonl records
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from fedjax_lm import config_lib
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import train

SMOKE = dict(total_steps=40, eval_every=20, log_every=10, eval_batches=2,
             data=dict(seq_len=64, batch_size=8),
             model=dict(num_layers=2, embed_dim=64, num_heads=2, num_kv_heads=2, head_dim=32,
                        mlp_dim=192, max_len=64))
FULL = dict(total_steps=200, eval_every=50, log_every=25,
            data=dict(seq_len=256, batch_size=8), model=dict(mlp_dim=384))


def _update(node, overrides: dict[str, Any], where: str = "") -> None:
  for key, value in overrides.items():
    if key not in node:
      raise KeyError(f"unknown config key {where}{key!r}")
    if isinstance(value, dict):
      _update(node[key], value, f"{where}{key}.")
    else:
      node[key] = value


def config(smoke: bool = False, **overrides):
  """The base config, sized for a laptop CPU (``smoke``: a seconds-long run), one process,
  every island on the one device; ``overrides`` are nested dicts of config fields."""
  c = config_lib.base_config()
  c.mesh.update({"island": 1, "data": 1})
  c.launch.mode = "none"
  c.checkpoint_every = 10**9  # only the final checkpoint
  _update(c, SMOKE if smoke else FULL)
  _update(c, overrides)
  c.lock()
  return c


def run(config, workdir: str, outer_tx=None, fresh: bool = True) -> list[dict]:
  """Trains ``config`` in this process on its first device (``fresh``: from scratch, deleting
  ``workdir``) and
  returns the ``metrics.jsonl`` records; ``outer_tx`` replaces the configured outer optimizer."""
  if fresh and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  train.train(config, workdir, devices=jax.devices()[:1], outer_tx=outer_tx)
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def evals(records: list[dict], key: str = "step") -> tuple[list, list]:
  """(x, eval_loss) of the eval records, x = ``step``, ``island_bytes``, ``tokens``, ..."""
  rows = [r for r in records if "eval_loss" in r]
  return [r[key] for r in rows], [r["eval_loss"] for r in rows]
