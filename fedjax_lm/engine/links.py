"""Links: the only code that moves bytes between islands.

A link carries what each island *sends* for one fragment, ``(payload, weight)``: the encoded
pseudo-gradient (values + scales + indices, or float32 leaves when uncompressed) and one float32
weight per device of the island (who sent: 1 sent, 0 absent, -1 masked as non-finite). It has
two halves, matching the stages around it:

* ``start(sent, p, done)`` / ``finish(handle)``: host-side, between the encode and reduce
  programs;
* ``gather`` / ``mean``: inside the reduce program (:func:`fedjax_lm.engine.stages.reduce`),
  every island's payload made visible to every device.

:class:`XlaLink` (``outer.transport=xla``): the exchange is a collective over the ``island`` mesh
axis inside the reduce program (an all-gather of the encoded dtypes; an all-reduce of each
device's ZeRO shard when uncompressed); start and finish pass the device arrays through.

:class:`HostLink` (``outer.transport=host``): XLA runs a device's programs one after another
(measured on this CPU backend: a program dispatched after a slow one waits for it even with no
data dependency), so a collective holds up the inner steps queued behind it. The host link
copies the encoded payload to the host and all-gathers it between processes on a background
thread over direct TCP connections (addresses swapped once through the ``jax.distributed``
key-value store; bulk data through the coordinator's gRPC service failed on a shaped link),
while the device keeps running inner steps; the reduce program then sees every island's payload
already gathered and runs no collective. Every process publishes the shards it holds (one
island's slice per device; replicated copies once) and reads every other process's; exchanges
run in submission order on one thread, every process submits them in the same order, and each
message carries (step, fragment): a mismatch is an error.

The host link's wire (:mod:`fedjax_lm.wire`): every connection starts with a nonce handshake
proving the peer holds the job's secret (a peer that fails it is refused and logged, and the
exchange goes on with the real peers); every message is a signed typed header plus raw shard
bytes, checked against the shards this process expects (leaf, index, dtype, shape) before use.
No pickle. The listener binds the address the process advertises (``launch.interface``, else
``FEDJAX_LM_TRANSPORT_HOST``, else loopback when the coordinator is on loopback, else the host's
own address), never 0.0.0.0.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed  # the jax.distributed client's key-value store
from jax.sharding import PartitionSpec as P

from fedjax_lm import mesh as mesh_lib
from fedjax_lm import wire

TRANSPORTS = ("xla", "host")
_TIMEOUT_MS = 10 * 60 * 1000


class XlaLink:
  """The exchange as a collective over ``island`` inside the reduce program."""

  lead = "island"  # the received payload's island dim is sharded over the island axis
  overlaps = False  # the collective is queued on the device: RECEIVE right after SEND

  @staticmethod
  def gather(x: jax.Array) -> jax.Array:
    """Inside ``shard_map``: this device's slice of every island's payload (all-gather)."""
    return jax.lax.all_gather(x, "island", axis=0, tiled=True)

  @staticmethod
  def mean(stacked: Any, stacked_sharding: Any, mean_sharding: Any) -> Any:
    """Uncompressed: mean over the island dim, lowered to one all-reduce over ``island`` of
    each device's ZeRO shard (one float32 copy per island crosses)."""
    stacked = jax.lax.with_sharding_constraint(stacked, stacked_sharding)
    return jax.lax.with_sharding_constraint(jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked),
                                            mean_sharding)

  def start(self, sent: Any, fragment: int, step: int, gathered: Any) -> Any:
    del fragment, step, gathered
    return sent

  def finish(self, handle: Any) -> Any:
    return handle


class Gathered:
  """Payloads that arrive already gathered (every island's, replicated over ``island``): the
  reduce program runs no collective. The host link's, and the decoupled syncer's."""

  lead = None
  overlaps = True  # exchanged off the device meanwhile: RECEIVE just before the MERGE

  @staticmethod
  def gather(x: jax.Array) -> jax.Array:
    return x

  @staticmethod
  def mean(stacked: Any, stacked_sharding: Any, mean_sharding: Any) -> Any:
    del stacked_sharding, mean_sharding
    return jax.tree.map(lambda x: x.mean(0), stacked)


class HostLink(Gathered):
  """All-gathers ``[M, ...]`` payloads (sharded over ``island``) between processes on a host
  thread; the reduce program receives them gathered (replicated over ``island``)."""

  def __init__(self, secret: bytes = b"", interface: str = ""):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="island-exchange")
    self._peers = _Peers(secret, interface) if jax.process_count() > 1 else None

  def start(self, sent: Any, fragment: int, step: int, gathered: Any
            ) -> concurrent.futures.Future:
    """Begins the exchange of ``sent``; the future holds it gathered on every island, laid
    out as ``gathered`` (shardings replicated over ``island``)."""
    return self._pool.submit(self._run, sent, fragment, step, gathered)

  def finish(self, handle: concurrent.futures.Future) -> Any:
    return handle.result()

  def _run(self, payload, fragment, step, gathered):
    leaves, treedef = jax.tree.flatten(payload)
    mine = {}
    for i, leaf in enumerate(leaves):
      for shard in leaf.addressable_shards:
        key = (i, tuple(s.indices(d)[:2] for s, d in zip(shard.index, leaf.shape)))
        if key not in mine:
          mine[key] = jax.device_get(shard.data)
    parts = dict(mine)
    if self._peers is not None:
      keys = list(mine)
      meta = {"step": int(step), "fragment": int(fragment),
              "shards": [[i, [list(b) for b in index]] for i, index in keys]}
      try:
        received = self._peers.all_gather(meta, [mine[k] for k in keys], leaves)
      except (OSError, ConnectionError) as e:
        raise RuntimeError(f"island exchange of fragment {fragment} at step {step} failed: "
                           f"{type(e).__name__}: {e}") from e
      for theirs in received:
        parts.update(theirs)
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


def from_config(config) -> XlaLink | HostLink:
  """The link ``config.outer.transport`` names; the host link between processes needs the job
  secret (:func:`wire.job_secret`)."""
  transport = config.outer.transport
  if transport not in TRANSPORTS:
    raise ValueError(f"outer.transport={transport!r}: expected one of {TRANSPORTS}")
  if transport == "xla":
    return XlaLink()
  secret = wire.job_secret(config.launch.secret_file) if jax.process_count() > 1 else b""
  return HostLink(secret, config.launch.interface)


def exchange(codec: Any, payload: dict, weights: jax.Array, mesh: Any, link: Any) -> jax.Array:
  """Every device sees its slice of every island's encoded payload (``link.gather``: the one
  cross-island collective, an all-gather of the encoded dtypes; nothing else crosses but the
  weights, :func:`gather_weights`), then decodes each and averages in float32 over the islands
  that sent (``weights > 0``). With a codec that carries a ``support``
  (``outer.topk_aggregate=selected``, SparseLoCo's sparse aggregation) each coordinate is
  averaged over the sending islands that kept it instead (0 where none did); the support is
  decoded from the gathered indices, so nothing more crosses. Written with ``shard_map`` so the
  collective is exactly this all-gather (under plain GSPMD, XLA may hoist the decode above the
  gather)."""
  spec = P(link.lead, mesh_lib.IN_ISLAND_AXES)
  support = getattr(codec, "support", None)

  def local(shard, w):
    shard = jax.tree.map(link.gather, shard)
    if getattr(codec, "aggregates", False):  # the codec averages its own payloads (DeMo's)
      return codec.aggregate(shard, w > 0)
    decoded = jnp.where((w > 0)[:, None], jax.vmap(codec.decode)(shard), 0.0)
    if support is not None:
      kept = jnp.sum(jnp.where((w > 0)[:, None], jax.vmap(support)(shard), 0.0), axis=0)
      return jnp.sum(decoded, axis=0) / jnp.maximum(kept, 1.0)
    return jnp.mean(decoded, axis=0) * (w.shape[0] / jnp.maximum(jnp.sum(w > 0), 1))

  specs = jax.tree.map(lambda _: spec, payload)
  return jax.shard_map(local, mesh=mesh, in_specs=(specs, P()),
                       out_specs=P(mesh_lib.IN_ISLAND_AXES), check_vma=False)(payload, weights)


def gather_weights(weight: jax.Array, mesh: Any, link: Any) -> jax.Array:
  """Every island's weight (``[M]``, on every device): each device's copy, gathered."""
  spec = P(link.lead, mesh_lib.IN_ISLAND_AXES)
  return jax.shard_map(lambda w: link.gather(w[:, 0]), mesh=mesh, in_specs=(spec,),
                       out_specs=P(), check_vma=False)(weight)


# ------------------------------------------------------------------ the host link's wire
_LEN = struct.Struct("!Q")
_ID = struct.Struct("!q")
HANDSHAKE_S = 5.0  # a connection that has not answered the nonce by then is dropped
_POLL_S = 0.1  # how often the acceptor looks up from accept() to see whether it is done


def _client():
  return distributed.global_state.client


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
  """``n`` bytes from ``sock``; with ``deadline`` (``time.monotonic()``), TimeoutError once it
  passes however the bytes trickle in (a per-call socket timeout restarts with every byte)."""
  buf = bytearray(n)
  view, got = memoryview(buf), 0
  while got < n:
    if deadline is not None:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError("handshake deadline passed")
      sock.settimeout(left)
    k = sock.recv_into(view[got:], n - got)
    if not k:
      raise ConnectionError("peer closed the connection")
    got += k
  return bytes(buf)


def advertised_host(interface: str = "") -> str:
  """The address this process listens on and advertises: ``interface``, else
  ``FEDJAX_LM_TRANSPORT_HOST``, else loopback if the coordinator is on loopback, else the
  host's own address."""
  coordinator = os.environ.get("FEDJAX_LM_COORDINATOR", "")
  return (interface or os.environ.get("FEDJAX_LM_TRANSPORT_HOST") or
          ("127.0.0.1" if coordinator.startswith("127.") or not coordinator else
           socket.gethostbyname(socket.gethostname())))


class _Peers:
  """One authenticated TCP connection to and from every other process, made on first use."""

  def __init__(self, secret: bytes, interface: str = ""):
    self.secret = secret
    self.me, self.count = jax.process_index(), jax.process_count()
    host = advertised_host(interface)
    self.listener = socket.create_server((host, 0))
    _client().key_value_set(f"fedjax_lm/transport/{self.me}",
                            f"{host}:{self.listener.getsockname()[1]}")
    self.send: dict[int, socket.socket] = {}
    self.recv: dict[int, socket.socket] = {}
    self._held: dict[tuple, dict[int, set]] = {}  # per payload layout (shapes, shardings)

  def connect(self):
    if self.send:
      return
    accepted = {}  # every process accepts while it connects (each side waits for a nonce)
    acceptor = threading.Thread(target=lambda: accepted.update(
        accept_peers(self.listener, self.secret, self.me, self.count)), daemon=True)
    acceptor.start()
    for q in range(self.count):
      if q != self.me:
        host, port = _client().blocking_key_value_get(
            f"fedjax_lm/transport/{q}", _TIMEOUT_MS).rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=_TIMEOUT_MS / 1000)
        hello(sock, self.secret, self.me)
        self.send[q] = sock
    acceptor.join()
    if len(accepted) != self.count - 1:
      raise ConnectionError(f"only {len(accepted)} of {self.count - 1} peers connected")
    self.recv = accepted

  def all_gather(self, meta: dict, arrays: list, leaves: list) -> list[dict]:
    """Sends this process's shards to every peer and returns each peer's, as
    ``{(leaf, index): array}``, every shard checked against ``leaves`` (dtype, bounds) and each
    peer's list against the shards its devices hold (:func:`_held`): no more, no fewer."""
    self.connect()
    layout = tuple((tuple(x.shape), x.sharding) for x in leaves)
    held = self._held.get(layout)
    if held is None:
      held = self._held[layout] = _held(leaves)
    message = wire.pack(self.secret, "island_exchange", meta, arrays)
    framed = _LEN.pack(len(message)) + message
    senders = [threading.Thread(target=sock.sendall, args=(framed,), daemon=True)
               for sock in self.send.values()]
    for t in senders:
      t.start()
    limit = (sum(x.nbytes for x in leaves) + wire.MAX_HEADER_BYTES + wire.MAC_BYTES + 4 +
             16 * sum(x.ndim for x in leaves))
    out = []
    for q, sock in self.recv.items():
      (n,) = _LEN.unpack(_recv_exactly(sock, _LEN.size))
      if n > limit:
        raise wire.WireError(f"process {q} announced a {n}-byte message (at most {limit})")
      _, got, arrays = wire.unpack(self.secret, _recv_exactly(sock, n), "island_exchange")
      if (got.get("step"), got.get("fragment")) != (meta["step"], meta["fragment"]):
        raise RuntimeError(f"island exchange out of order: expected step {meta['step']} "
                           f"fragment {meta['fragment']} from process {q}, got step "
                           f"{_short(got.get('step'))} fragment {_short(got.get('fragment'))}")
      out.append(_check_shards(q, got.get("shards"), arrays, leaves, held.get(q, set())))
    for t in senders:
      t.join()
    return out


def hello(sock: socket.socket, secret: bytes, me: int) -> None:
  """Connector's half of the handshake: answer the listener's nonce as process ``me``."""
  nonce = _recv_exactly(sock, 32)
  sock.sendall(_ID.pack(me) + wire.answer(secret, nonce, f"process/{me}"))


def accept_peers(listener: socket.socket, secret: bytes, me: int, count: int,
                 timeout_s: float = _TIMEOUT_MS / 1000, handshake_s: float = HANDSHAKE_S
                 ) -> dict[int, socket.socket]:
  """Accepts one authenticated connection from each of the other ``count - 1`` processes;
  returns them by process id once all are in, or those it has when ``timeout_s`` passes.

  Handshakes run concurrently, each on its own thread with a ``handshake_s`` deadline, at most
  ``2 * count`` at a time (more wait in the listen backlog): a silent or slow connection holds
  one slot for ``handshake_s`` at most and never delays the peers behind it (accepted one at a
  time with the full timeout, two silent connections delayed the first exchange by 90 s). A
  connection that fails the handshake (no secret or a wrong one; this process's own, an
  out-of-range or an already connected process id; no answer in time) is refused, closed and
  logged in one line before a byte of its payload is read."""
  deadline = time.monotonic() + timeout_s
  lock = threading.Lock()
  peers: dict[int, socket.socket] = {}
  pending: set[socket.socket] = set()
  slots = threading.BoundedSemaphore(2 * max(count, 1))
  state = {"done": False}

  def admit(who: int, conn: socket.socket) -> None:
    with lock:
      if state["done"]:
        raise wire.WireError("arrived after the exchange stopped accepting")
      if who == me:
        raise wire.WireError(f"peer claims process {who}, which is this process")
      if not 0 <= who < count:
        raise wire.WireError(f"peer claims process {who}, out of range for {count} processes")
      if who in peers:
        raise wire.WireError(f"peer claims process {who}, which is already connected")
      peers[who] = conn
      pending.discard(conn)

  def handshake(conn: socket.socket, address: Any) -> None:
    try:
      end = time.monotonic() + handshake_s
      conn.settimeout(handshake_s)
      nonce = wire.challenge()
      conn.sendall(nonce)
      reply = _recv_exactly(conn, _ID.size + 32, end)
      (who,) = _ID.unpack(reply[:_ID.size])
      wire.check_answer(secret, nonce, f"process/{who}", reply[_ID.size:])
      conn.settimeout(timeout_s)  # the exchanges' own timeout from here on
      admit(who, conn)
    except (wire.WireError, ConnectionError, OSError) as e:
      with lock:
        pending.discard(conn)
        late = state["done"]
      reason = (str(e) if isinstance(e, wire.WireError) else
                "the exchange stopped accepting" if late else
                f"no handshake within {handshake_s:g} s" if isinstance(e, TimeoutError) else
                f"{type(e).__name__}: {e}")
      logging.warning("island exchange: refused a connection from %s: %s", address, reason)
      conn.close()
    finally:
      slots.release()

  listener.settimeout(_POLL_S)
  try:
    while True:
      with lock:
        if len(peers) >= count - 1:
          break
      left = deadline - time.monotonic()
      if left <= 0:
        break
      if not slots.acquire(timeout=min(left, _POLL_S)):
        continue
      try:
        conn, address = listener.accept()
      except TimeoutError:
        slots.release()
        continue
      with lock:
        pending.add(conn)
      threading.Thread(target=handshake, args=(conn, address), daemon=True,
                       name="island-handshake").start()
  finally:
    with lock:
      state["done"] = True
      for conn in pending:  # wakes their threads, which log and close them
        try:
          conn.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
      accepted = dict(peers)
  return accepted


def _short(x: Any, limit: int = 120) -> str:
  """``repr(x)`` cut to ``limit`` characters: a refusal quotes a peer's value, not 64 KiB."""
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


def _box(index: tuple, shape: tuple) -> tuple:
  """A shard's index (slices) as ``((start, stop), ...)``: the key both sides use."""
  return tuple(s.indices(d)[:2] for s, d in zip(index, shape))


def _held(leaves: list) -> dict[int, set]:
  """``{process: {(leaf, index), ...}}``: the distinct shards each process's devices hold, from
  the leaves' shardings; exactly what each process sends (replicated copies once)."""
  held: dict[int, set] = {}
  for i, leaf in enumerate(leaves):
    for device, index in leaf.sharding.devices_indices_map(tuple(leaf.shape)).items():
      held.setdefault(device.process_index, set()).add((i, _box(index, leaf.shape)))
  return held


def _is_int(x: Any) -> bool:
  return type(x) is int  # pylint: disable=unidiomatic-typecheck  (not a bool, float or str)


def _check_shards(q: int, shards: Any, arrays: list, leaves: list, held: set) -> dict:
  """``{(leaf, index): array}`` of process ``q``'s message: each shard in bounds, of its leaf's
  dtype and the shape its index says, listed once, and together exactly the shards ``held``
  (what ``q``'s devices hold): a missing one would be left zero, an extra one would overlap
  another's. One clear error otherwise."""
  if not isinstance(shards, list) or len(shards) != len(arrays):
    raise wire.WireError(f"process {q}: shard list does not match its {len(arrays)} arrays")
  out = {}
  for entry, array in zip(shards, arrays):
    ok = (isinstance(entry, list) and len(entry) == 2 and _is_int(entry[0]) and
          0 <= entry[0] < len(leaves) and isinstance(entry[1], list) and
          all(isinstance(b, list) and len(b) == 2 and _is_int(b[0]) and _is_int(b[1])
              for b in entry[1]))
    if ok:
      i, index = entry[0], tuple(tuple(b) for b in entry[1])
      leaf = leaves[i]
      ok = (len(index) == leaf.ndim and array.dtype == leaf.dtype and
            all(0 <= a <= b <= d for (a, b), d in zip(index, leaf.shape)) and
            array.shape == tuple(b - a for a, b in index))
    if not ok:
      raise wire.WireError(f"process {q}: shard {_short(entry)} does not fit the payload")
    if (i, index) in out:
      raise wire.WireError(f"process {q}: leaf {i}: shard {list(index)} is listed twice")
    if (i, index) not in held:
      raise wire.WireError(f"process {q}: leaf {i}: shard {list(index)} is not one its devices "
                           "hold (it would overlap another's)")
    out[(i, index)] = array
  missing = sorted(held - set(out))
  if missing:
    i, index = missing[0]
    raise wire.WireError(f"process {q}: leaf {i}: partial shard list, shard {list(index)} "
                         f"missing ({len(missing)} in all)")
  return out
