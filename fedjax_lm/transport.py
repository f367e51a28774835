"""Host transport for the cross-island exchange: real overlap of communication and compute.

XLA runs a device's programs one after another (measured on this CPU backend: a program
dispatched after a slow one waits for it even with no data dependency), so an exchange that
is a collective inside a jitted program holds up the inner steps queued behind it, whatever
the data dependencies. ``outer.transport=host`` moves the exchange off the device queue: the
encoded payload is copied to the host and all-gathered between processes on a background
thread (through the ``jax.distributed`` key-value store, i.e. the coordinator's gRPC
service), while the device keeps running inner steps. At the merge the gathered payloads go
back to the device and one collective-free program decodes, averages and takes the outer step
(torchft and PrIME do their cross-replica exchange outside the compiled step in the same spirit).

Every process publishes the shards of the payload it holds (one island's slice per device;
replicated copies once), so an island sends exactly its encoded payload; each process reads
every other process's shards. Exchanges run in submission order on one thread, and every
process submits them in the same order. A key is deleted one round later, once every peer has
provably read it (it has published the next round of the same fragment).
"""

from __future__ import annotations

import concurrent.futures
import pickle
from typing import Any

import jax
import numpy as np

_TIMEOUT_MS = 10 * 60 * 1000


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


class HostExchange:
  """All-gathers ``[M, ...]`` payloads (sharded over ``island``) between processes."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="island-exchange")
    self._last_key: dict[int, str] = {}
    self.bytes_published = 0  # this process's serialized payloads, cumulative

  def start(self, payload: Any, fragment: int, step: int, gathered: Any
            ) -> concurrent.futures.Future:
    """Begins the exchange of ``payload``; the future holds it gathered on every island, laid
    out as ``gathered`` (shardings replicated over ``island``)."""
    return self._pool.submit(self._run, payload, fragment, step, gathered)

  def _run(self, payload, fragment, step, gathered):
    leaves, treedef = jax.tree.flatten(payload)
    mine = {}
    for i, leaf in enumerate(leaves):
      for shard in leaf.addressable_shards:
        key = (i, tuple((s.start, s.stop) for s in shard.index))
        if key not in mine:
          mine[key] = jax.device_get(shard.data)
    parts = dict(mine)
    if jax.process_count() > 1:
      client, me = _client(), jax.process_index()
      prefix = f"fedjax_lm/exchange/{fragment}/{step}"
      blob = pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL)
      client.key_value_set_bytes(f"{prefix}/{me}", blob)
      self.bytes_published += len(blob)
      for q in range(jax.process_count()):
        if q != me:
          try:
            theirs = client.blocking_key_value_get_bytes(f"{prefix}/{q}", _TIMEOUT_MS)
          except Exception as e:  # pylint: disable=broad-except
            raise RuntimeError(f"island exchange of fragment {fragment} at step {step}: no "
                               f"payload from process {q} ({type(e).__name__}: {e})") from e
          parts.update(pickle.loads(theirs))
      if fragment in self._last_key:
        client.key_value_delete(self._last_key[fragment])
      self._last_key[fragment] = f"{prefix}/{me}"
    full = []
    for i, leaf in enumerate(leaves):
      out = np.zeros(leaf.shape, leaf.dtype)
      for (j, index), data in parts.items():
        if j == i:
          out[tuple(slice(a, b) for a, b in index)] = data
      full.append(out)
    shardings = jax.tree.leaves(gathered)
    return treedef.unflatten([
        jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx])
        for x, s in zip(full, shardings)])

  def close(self):
    self._pool.shutdown(wait=True)
