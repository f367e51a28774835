"""Checkpoints: the whole training state plus each process's data-iterator state.

``DIR/checkpoints/<step>/state`` holds the sharded state pytree (orbax, async, multi-process),
``DIR/checkpoints/<step>/data/process_<i>-of-<n>.json`` the grain iterator states. A step
directory only appears once complete, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every ``every`` steps (keeping ``keep``) and restores the latest step."""

  def __init__(self, workdir: str, every: int, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1),
                                             max_to_keep=int(keep), create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores ``step`` into arrays laid out like ``abstract_state`` (ShapeDtypeStructs with
    shardings) and sets ``data_iterator``'s position. One clear error if anything is off."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
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
