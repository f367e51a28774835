"""Global batches from per-process grain iterators.

A train batch is ``[M, B, T]`` sharded ``P("island", ("data", "fsdp"), None)``. Each process
looks at the slices its own devices hold and runs one grain iterator per (island ``m``, row
shard ``k``) it needs: island ``m`` reads partition ``m`` of the data (``iid``, ``by_play``,
``by_genre``), and inside it row shard ``k`` of ``K`` reads a disjoint shard. The per-process
iterator states are checkpointed by grain's orbax handler (``get_state`` / ``set_state``).
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

  def __init__(self, data_cfg, mesh, *, num_islands: int, tokenizer, seed: int):
    self.shape = (num_islands, int(data_cfg.batch_size), int(data_cfg.seq_len))
    self.sharding = NamedSharding(mesh, mesh_lib.batch_spec())
    rows_per_shard = self.shape[1] // (mesh.shape["data"] * mesh.shape["fsdp"])
    if rows_per_shard * mesh.shape["data"] * mesh.shape["fsdp"] != self.shape[1]:
      raise ValueError(f"data.batch_size={self.shape[1]} (rows per island) is not divisible by "
                       f"the island's data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} "
                       "devices")
    source = data_lib.get_source(data_cfg.name, "train", data_dir=data_cfg.data_dir or None)
    self._plan = []  # per local device: (device, [iterator keys for its islands])
    self._iterators: dict[str, Any] = {}
    for device, (islands, rows, _) in _local_slices(self.sharding, self.shape):
      m0, m1 = _bounds(islands, num_islands)
      r0, r1 = _bounds(rows, self.shape[1])
      shard, count = r0 // (r1 - r0), self.shape[1] // (r1 - r0)
      keys = []
      for m in range(m0, m1):
        key = f"island{m}_shard{shard}of{count}"
        if key not in self._iterators:
          self._iterators[key] = data_lib.make_train_iterator(
              source, tokenizer=tokenizer, seq_len=self.shape[2], batch_size=r1 - r0, seed=seed,
              shard_index=shard, shard_count=count, partition=data_cfg.partition,
              part_index=m, part_count=num_islands, append_eos=bool(data_cfg.append_eos),
              text_key=data_cfg.text_key)
        keys.append(key)
      self._plan.append((device, keys))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    fetched = {key: next(it) for key, it in self._iterators.items()}
    per_device = {
        device: {k: np.stack([fetched[key][k] for key in keys]) for k in ("inputs", "targets",
                                                                          "mask")}
        for device, keys in self._plan}
    return _assemble(self.sharding, self.shape, per_device)

  # grain's orbax CheckpointHandler saves one file per process with these.
  def get_state(self) -> bytes:
    return json.dumps({k: data_lib.save_iterator_state(it).decode()
                       for k, it in self._iterators.items()}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state.decode())
    if set(saved) != set(self._iterators):
      raise ValueError(f"Checkpointed data iterators {sorted(saved)} do not match this run's "
                       f"{sorted(self._iterators)}: was the mesh or islands.num changed?")
    for k, it in self._iterators.items():
      data_lib.restore_iterator_state(it, saved[k].encode())

  def start_prefetch(self) -> None:
    pass


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
