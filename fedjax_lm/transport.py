"""Host transport for the cross-island exchange: real overlap of communication and compute.

XLA runs a device's programs one after another (measured on this CPU backend: a program
dispatched after a slow one waits for it even with no data dependency), so an exchange that
is a collective inside a jitted program holds up the inner steps queued behind it, whatever
the data dependencies. ``outer.transport=host`` moves the exchange off the device queue: the
encoded payload is copied to the host and all-gathered between processes on a background
thread, over direct TCP connections between the processes (their addresses are swapped once
through the ``jax.distributed`` key-value store; bulk data through the coordinator's gRPC
service failed on a shaped link), while the device keeps running inner steps. At the merge
the gathered payloads go back to the device and one collective-free program decodes, averages
and takes the outer step (torchft and PrIME also exchange outside the compiled step).

Every process publishes the shards of the payload it holds (one island's slice per device;
replicated copies once), so an island sends exactly its encoded payload; each process reads
every other process's shards. Exchanges run in submission order on one thread, and every
process submits them in the same order; each message carries (step, fragment) and a mismatch
is an error. ``FEDJAX_LM_TRANSPORT_HOST`` overrides the address a process advertises.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import socket
import struct
import threading
from typing import Any

import jax
import numpy as np

_TIMEOUT_MS = 10 * 60 * 1000


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


_HEADER = struct.Struct("!qqQ")  # step, fragment, payload length


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
  buf = bytearray(n)
  view, got = memoryview(buf), 0
  while got < n:
    k = sock.recv_into(view[got:], n - got)
    if not k:
      raise ConnectionError("peer closed the connection")
    got += k
  return bytes(buf)


class _Peers:
  """One TCP connection to and from every other process, made on first use."""

  def __init__(self):
    self.me, self.count = jax.process_index(), jax.process_count()
    self.listener = socket.create_server(("0.0.0.0", 0))
    coordinator = os.environ.get("FEDJAX_LM_COORDINATOR", "")
    host = os.environ.get("FEDJAX_LM_TRANSPORT_HOST") or (
        "127.0.0.1" if coordinator.startswith("127.") else
        socket.gethostbyname(socket.gethostname()))
    _client().key_value_set(f"fedjax_lm/transport/{self.me}",
                            f"{host}:{self.listener.getsockname()[1]}")
    self.send: dict[int, socket.socket] = {}
    self.recv: dict[int, socket.socket] = {}

  def connect(self):
    if self.send:
      return
    for q in range(self.count):
      if q != self.me:
        host, port = _client().blocking_key_value_get(
            f"fedjax_lm/transport/{q}", _TIMEOUT_MS).rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=_TIMEOUT_MS / 1000)
        sock.sendall(struct.pack("!q", self.me))
        self.send[q] = sock
    self.listener.settimeout(_TIMEOUT_MS / 1000)
    while len(self.recv) < self.count - 1:
      conn, _ = self.listener.accept()
      conn.settimeout(_TIMEOUT_MS / 1000)
      self.recv[struct.unpack("!q", _recv_exactly(conn, 8))[0]] = conn

  def all_gather(self, blob: bytes, step: int, fragment: int) -> dict[int, bytes]:
    self.connect()
    message = _HEADER.pack(step, fragment, len(blob)) + blob
    senders = [threading.Thread(target=sock.sendall, args=(message,), daemon=True)
               for sock in self.send.values()]
    for t in senders:
      t.start()
    out = {}
    for q, sock in self.recv.items():
      got_step, got_fragment, n = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
      if (got_step, got_fragment) != (step, fragment):
        raise RuntimeError(f"island exchange out of order: expected step {step} fragment "
                           f"{fragment} from process {q}, got step {got_step} fragment "
                           f"{got_fragment}")
      out[q] = _recv_exactly(sock, n)
    for t in senders:
      t.join()
    return out


class HostExchange:
  """All-gathers ``[M, ...]`` payloads (sharded over ``island``) between processes."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="island-exchange")
    self._peers = _Peers() if jax.process_count() > 1 else None

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
    if self._peers is not None:
      blob = pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL)
      try:
        received = self._peers.all_gather(blob, step, fragment)
      except (OSError, ConnectionError) as e:
        raise RuntimeError(f"island exchange of fragment {fragment} at step {step} failed: "
                           f"{type(e).__name__}: {e}") from e
      for theirs in received.values():
        parts.update(pickle.loads(theirs))
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
