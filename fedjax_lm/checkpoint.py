"""Checkpoints: the whole training state plus each process's data-iterator state.

``DIR/checkpoints/<step>/state`` holds the sharded state pytree (orbax, async, multi-process),
``DIR/checkpoints/<step>/data`` every island's grain iterator state (one JSON, so it resumes
on any process count or in-island layout) and
``DIR/checkpoints/<step>/config`` the fields that fix the state's layout (JSON; no pickle
anywhere). A step directory only appears once complete, so a run killed mid-save resumes from
the previous one. On resume a checkpoint of another layout is refused naming the differing
fields; a corrupt or truncated one is moved aside to ``DIR/corrupt_checkpoints/<step>-<n>``
(never deleted) and the previous one is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class Preempted(Exception):
  """Training stopped on SIGTERM after writing a checkpoint at ``step``."""

  def __init__(self, step: int):
    super().__init__(f"preempted (SIGTERM): checkpoint written at step {step}; run the same "
                     "command again to resume there")
    self.step = step


class PreemptionWatch:
  """Has a SIGTERM arrived? Multi-process: JAX's preemption sync (every process learns of the
  notice and they agree on the same step to save at). One process: a SIGTERM handler."""

  def __init__(self):
    self._flag = False
    self._synced = jax.process_count() > 1
    self._previous = None
    if not self._synced and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True

  def reached(self, step: int) -> bool:
    """True at the step all processes save at; call at every step, on every process."""
    if self._synced:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before (e.g. a notebook kernel's)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Checkpointer:
  """Saves every ``every`` steps (keeping ``keep``) and restores the latest step: the
  training loop's (``DIR/checkpoints``) and the decoupled syncer's
  (``DIR/syncer_checkpoints``: its server state, and its rounds and membership as the
  ``clock`` item; no data iterator)."""

  def __init__(self, workdir: str, every: int, keep: int, name: str = "checkpoints"):
    self.directory = os.path.abspath(os.path.join(workdir, name))
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data", "config", "clock"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "clock": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1),
                                             max_to_keep=int(keep), create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, force: bool = False,
           layout: dict | None = None, clock: dict | None = None) -> bool:
    """Saves the state, the data position, the layout and the clock's JSON (what the engine's
    host-side clock says at ``step``: schedule, drop-out, what is in flight)."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_iterator.global_state() if data_iterator else {}),
        config=ocp.args.JsonSave(layout or {}),
        clock=ocp.args.JsonSave(clock or {"step": step})), force=force)

  def restore_latest(self, abstract_state: Any, data_iterator: Any, layout: dict,
                     clock_state: Any = None) -> tuple[int | None, Any]:
    """(step, state) of the newest good checkpoint, or (None, None) if there is none.
    ``clock_state(step)``: this run's clock JSON at a step, checked against the saved one."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      self._check_layout(step, layout)
      if clock_state is not None:
        self._check_clock(step, clock_state(step))
      try:
        return step, self.restore(step, abstract_state, data_iterator)
      except RuntimeError as e:
        logging.warning("%s Moving it aside and trying the previous checkpoint.",
                        str(e).split(" It may be")[0])
        self._move_aside(step)
    return None, None

  def _check_layout(self, step: int, layout: dict) -> None:
    self._check_saved(step, "config", layout, "is from a different config")

  def _check_clock(self, step: int, mine: dict) -> None:
    self._check_saved(step, "clock", mine, "is on a different clock")

  def json(self, step: int, item: str) -> dict:
    """JSON item ``item`` (``data``, ``config``, ``clock``) of checkpoint ``step``."""
    return self.manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))[item]

  def _check_saved(self, step: int, item: str, mine: dict, what: str) -> None:
    """One clear error naming every field where JSON item ``item`` of checkpoint ``step``
    differs from ``mine``."""
    try:
      saved = self.json(step, item)
    except Exception:  # pylint: disable=broad-except  (older or damaged: the state decides)
      return
    diff = [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in mine.items()
            if k in saved and saved[k] != v]
    if diff:
      raise ValueError(f"checkpoint step {step} in {self.directory} {what}: "
                       + ", ".join(diff) + ". Use another --workdir or the same settings.")

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
      os.makedirs(aside, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)),
                  os.path.join(aside, f"{step}-{len(os.listdir(aside))}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores ``step`` into arrays laid out like ``abstract_state`` (ShapeDtypeStructs with
    shardings) and sets ``data_iterator``'s position. One clear error if anything is off."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      if data_iterator is not None:
        data_iterator.set_global_state(restored["data"])
    except Exception as e:  # orbax/grain raise many types; name the culprit once.
      raise RuntimeError(
          f"Could not restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {e}. It may be corrupt or from a different config; delete it "
          "or use another --workdir.") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(state_shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)
