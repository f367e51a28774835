"""Global batches from per-process grain iterators.

A train batch is ``[M, B, T]`` sharded ``P("island", ("data", "fsdp"), None)``. Island ``m``
reads partition ``m`` of the data (``iid``, ``by_play``, ``by_genre``) through one grain
iterator of ``B`` rows; each process runs the iterators of the islands its devices hold and
keeps its devices' rows. So the token sequence is a function of (seed, partition, M, B) only:
DP / FSDP / TP layouts and 1 or N processes train on the same tokens, and a checkpoint's data
position (every island's iterator state, gathered to one JSON) resumes on another layout.
The price: a process holding a few rows of an island still reads all B of them (cheap for
text; at large B per island with a heavy tokenizer this is redundant host work).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import data as data_lib
from fedjax_lm import mesh as mesh_lib


def _local_slices(sharding: NamedSharding, shape: tuple[int, ...]):
  """[(device, index tuple)] for this process's devices, in a fixed order."""
  items = sharding.addressable_devices_indices_map(shape).items()
  return sorted(items, key=lambda kv: kv[0].id)


def _bounds(s: slice, size: int) -> tuple[int, int]:
  start, stop, _ = s.indices(size)
  return start, stop


def _assemble(sharding, shape, per_device: dict) -> dict[str, jax.Array]:
  keys = next(iter(per_device.values())).keys()
  return {k: jax.make_array_from_single_device_arrays(
      shape, sharding, [jax.device_put(arrays[k], d) for d, arrays in per_device.items()])
          for k in keys}


class TrainBatches:
  """Iterator of global train batches ``{"inputs", "targets", "mask"}`` of shape [M, B, T]."""

  def __init__(self, data_cfg, mesh, *, num_islands: int, tokenizer, seed: int,
               part: tuple[int, int] | None = None):
    """``part = (k, K)``: a single island (``num_islands=1``) that reads partition k of K (a
    decoupled island job); by default island m reads partition m of ``num_islands``."""
    self.shape = (num_islands, int(data_cfg.batch_size), int(data_cfg.seq_len))
    self.sharding = NamedSharding(mesh, mesh_lib.batch_spec())
    rows_per_shard = self.shape[1] // (mesh.shape["data"] * mesh.shape["fsdp"])
    if rows_per_shard * mesh.shape["data"] * mesh.shape["fsdp"] != self.shape[1]:
      raise ValueError(f"data.batch_size={self.shape[1]} (rows per island) is not divisible by "
                       f"the island's data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} "
                       "devices")
    source = data_lib.get_source(data_cfg.name, "train", data_dir=data_cfg.data_dir or None)
    self._plan = []  # per local device: (device, [island iterator keys], row slice)
    self._iterators: dict[str, Any] = {}
    for device, (islands, rows, _) in _local_slices(self.sharding, self.shape):
      m0, m1 = _bounds(islands, num_islands)
      keys = [f"island{m}" for m in range(m0, m1)]
      if part is not None:
        keys = [f"island{part[0]}"]
      for m, key in zip(range(m0, m1), keys):
        index, count = part or (m, num_islands)
        if key not in self._iterators:
          self._iterators[key] = data_lib.make_train_iterator(
              source, tokenizer=tokenizer, seq_len=self.shape[2], batch_size=self.shape[1],
              seed=seed, partition=data_cfg.partition, part_index=index, part_count=count,
              append_eos=bool(data_cfg.append_eos), text_key=data_cfg.text_key)
      self._plan.append((device, keys, slice(*_bounds(rows, self.shape[1]))))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    fetched = {key: next(it) for key, it in self._iterators.items()}
    per_device = {
        device: {k: np.stack([fetched[key][k][rows] for key in keys])
                 for k in ("inputs", "targets", "mask")}
        for device, keys, rows in self._plan}
    return _assemble(self.sharding, self.shape, per_device)

  def global_state(self) -> dict[str, str]:
    """Every island's iterator state (JSON strings), the same on every process: the local
    ones, gathered across processes (a collective: call on every process)."""
    local = {k: data_lib.save_iterator_state(it).decode() for k, it in self._iterators.items()}
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    gathered = multihost_utils.process_allgather(np.pad(raw, (0, size - raw.size),
                                                        constant_values=ord(" ")))
    merged = {}
    for row in np.asarray(gathered).reshape(jax.process_count(), size):
      merged.update(json.loads(row.tobytes().decode()))
    return merged

  def set_global_state(self, states: dict[str, str]) -> None:
    missing = sorted(set(self._iterators) - set(states))
    if missing:
      raise ValueError(f"the checkpoint's data position has no state for {missing} (it holds "
                       f"{sorted(states)}): was islands.num changed?")
    for k, it in self._iterators.items():
      data_lib.restore_iterator_state(it, states[k].encode())


def eval_batches(data_cfg, mesh, *, tokenizer, rows: int, max_batches: int) -> list[dict]:
  """Validation batches ``[rows, T]`` sharded over every device, built once and kept on device.

  Every process builds the same global batches and keeps its devices' rows, so the eval set
  (and eval_loss) does not depend on the number of processes or the mesh."""
  sharding = NamedSharding(mesh, P(mesh_lib.MESH_AXES[:3], None))
  shape = (rows, int(data_cfg.seq_len))
  n_shards = mesh.shape["island"] * mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % n_shards:
    raise ValueError(f"eval_batch_size={rows} not divisible by island x data x fsdp = {n_shards}")
  source = data_lib.get_source(data_cfg.name, "validation", data_dir=data_cfg.data_dir or None)
  batches = data_lib.make_eval_batches(source, tokenizer=tokenizer, seq_len=shape[1],
                                       batch_size=rows, max_batches=max_batches,
                                       text_key=data_cfg.text_key)
  local = _local_slices(sharding, shape)
  return [_assemble(sharding, shape, {d: {k: v[idx] for k, v in batch.items()}
                                      for d, idx in local})
          for batch in batches]
