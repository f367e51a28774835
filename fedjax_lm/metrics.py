"""Metrics sinks (process 0 only): ``DIR/metrics.jsonl``, TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import tqdm


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
    n /= 1000
  return str(n)


class JsonlWriter:
  """Appends one JSON object per line to ``path``, flushed at each write (a crashed process
  loses nothing it wrote): the decoupled roles' logs, and :class:`MetricsWriter`'s file."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> "JsonlWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class MetricsWriter:
  """Writes one JSON object per logged step; on resume drops records past the resume step."""

  def __init__(self, workdir: str, *, enabled: bool, total_steps: int, start_step: int):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):  # keep history up to the checkpoint we resumed from
      kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._jsonl = JsonlWriter(self.path)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    except ImportError:
      print("[metrics] tensorboardX not installed: no TensorBoard events")
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                          unit="step", smoothing=0.1)

  def step(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(record)
    step = record["step"]
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
        elif isinstance(v, list):
          for i, x in enumerate(v):
            self._tb.add_scalar(f"{k}/{i}", x, step)
      self._tb.flush()
    if self._bar is not None:
      post = {"loss": f"{record['train_loss']:.3f}"} if "train_loss" in record else {}
      if "eval_loss" in record:
        post["eval"] = f"{record['eval_loss']:.3f}"
      if "tokens_per_sec" in record:
        post["tok/s"] = f"{record['tokens_per_sec']:.0f}"
      if "island_bytes" in record:
        post["island"] = format_bytes(record["island_bytes"])
      self._bar.set_postfix(post, refresh=True)

  def print(self, msg: str) -> None:
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(msg)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()
