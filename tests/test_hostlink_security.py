"""The host link and the coordinator under the red team's attacks (issue 44, security):
handshakes that run concurrently with a deadline, refused identities logged, shard lists
checked for completeness and overlap, malformed signed messages refused in one line, and the
``jax.distributed`` coordinator bound to one address. Real sockets on 127.0.0.1; no
``jax.distributed``, no pickle."""

import hashlib
import hmac
import json
import select
import socket
import struct
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lm import launch
from fedjax_lm import wire
from fedjax_lm.engine import links

SECRET = b"k" * 32
GENEROUS_S = 30.0  # a deadline no healthy run comes near, only there so a bug cannot hang


# ------------------------------------------------------------------ helpers
class _Acceptor:
  """``accept_peers`` on a loopback listener, on a thread: ``result`` once it returns."""

  def __init__(self, me: int = 0, count: int = 2, timeout_s: float = GENEROUS_S,
               handshake_s: float = GENEROUS_S):
    self.listener = socket.create_server(("127.0.0.1", 0))
    self.address = self.listener.getsockname()
    self.result = None
    self.thread = threading.Thread(target=self._run, args=(me, count, timeout_s, handshake_s),
                                   daemon=True)
    self.thread.start()

  def _run(self, me, count, timeout_s, handshake_s):
    self.result = links.accept_peers(self.listener, SECRET, me, count, timeout_s=timeout_s,
                                     handshake_s=handshake_s)

  def join(self) -> dict:
    self.thread.join(timeout=GENEROUS_S + 5)
    assert not self.thread.is_alive(), "accept_peers did not return"
    return self.result

  def connect(self) -> socket.socket:
    return socket.create_connection(self.address, timeout=GENEROUS_S)

  def close(self, result=None):
    for sock in [self.listener, *(result or {}).values()]:
      sock.close()


def _closed_by_server(sock: socket.socket) -> bool:
  """Reads until the server closes (True) or the generous deadline passes (False)."""
  sock.settimeout(GENEROUS_S)
  try:
    while sock.recv(64):
      pass
  except ConnectionResetError:
    pass
  except TimeoutError:
    return False
  return True


def _refusals(caplog, clients: list[socket.socket]) -> list[str]:
  """The refusal lines logged about ``clients`` (another test's late lines left out)."""
  names = [f"refused a connection from {c.getsockname()}:" for c in clients]
  return [r.getMessage() for r in caplog.records if any(n in r.getMessage() for n in names)]


def _signed(header: bytes, payload: bytes = b"") -> bytes:
  """A message signed with the job's secret around a header written by hand: what a peer that
  holds the secret (buggy or compromised) could send."""
  body = struct.pack("!I", len(header)) + header + payload
  return hmac.new(SECRET, body, hashlib.sha256).digest() + body


def _one_line_wire_error(message: bytes, match: str) -> str:
  with pytest.raises(wire.WireError, match=match) as e:
    wire.unpack(SECRET, message, "x")
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


# ------------------------------------------------------------------ (a) concurrent handshakes
def test_silent_connections_do_not_delay_an_honest_peer(caplog):
  """Two connections that open first and never answer used to hold the acceptor for its full
  timeout each (90 s before the first exchange). Now the honest peer behind them is accepted
  as soon as it answers, long before the silent ones' handshake deadline; they are closed."""
  acceptor = _Acceptor(count=2, handshake_s=GENEROUS_S)
  silent = [acceptor.connect(), acceptor.connect()]
  for s in silent:
    assert len(s.recv(32)) > 0  # each was accepted and sent its nonce: they hold slots
  start = time.monotonic()
  honest = acceptor.connect()
  links.hello(honest, SECRET, 1)
  result = acceptor.join()
  assert time.monotonic() - start < GENEROUS_S / 2  # not held behind the silent ones
  assert list(result) == [1]
  assert all(_closed_by_server(s) for s in silent)
  for s in [*silent, honest]:
    s.close()
  acceptor.close(result)


def test_silent_connections_are_dropped_at_the_handshake_deadline(caplog):
  """With a 1 s deadline the silent connections are closed and logged while the acceptor still
  waits for its second peer; both honest peers are then accepted."""
  acceptor = _Acceptor(count=3, handshake_s=1.0)
  silent = [acceptor.connect(), acceptor.connect()]
  first = acceptor.connect()
  links.hello(first, SECRET, 1)
  assert all(_closed_by_server(s) for s in silent)  # by the deadline, not by the return
  assert acceptor.thread.is_alive()
  second = acceptor.connect()
  links.hello(second, SECRET, 2)
  result = acceptor.join()
  assert sorted(result) == [1, 2]
  refusals = _refusals(caplog, [*silent, first, second])
  assert len(refusals) == 2 and all("no handshake within 1 s" in r for r in refusals), refusals
  for s in [*silent, first, second]:
    s.close()
  acceptor.close(result)


def test_more_silent_connections_than_slots_only_delay_by_the_deadline():
  """More silent connections than in-flight handshakes allowed (2 x count): the honest peer
  waits in the backlog for a slot, at most about one handshake deadline, then is accepted."""
  acceptor = _Acceptor(count=2, handshake_s=0.5)
  silent = [acceptor.connect() for _ in range(6)]
  honest = acceptor.connect()
  links.hello(honest, SECRET, 1)
  result = acceptor.join()
  assert list(result) == [1]
  for s in [*silent, honest]:
    s.close()
  acceptor.close(result)


def test_acceptor_returns_what_it_has_when_the_overall_timeout_passes():
  acceptor = _Acceptor(count=3, timeout_s=1.0)
  honest = acceptor.connect()
  links.hello(honest, SECRET, 2)
  result = acceptor.join()
  assert list(result) == [2]
  honest.close()
  acceptor.close(result)


# ------------------------------------------------------------------ (b) refused identities
@pytest.mark.parametrize("secret,claim,reason", [
    (b"guess" * 8, 1, "failed the handshake (wrong secret)"),
    (SECRET, 0, "which is this process"),
    (SECRET, 3, "out of range for 3 processes"),
    (SECRET, -1, "out of range for 3 processes"),
])
def test_bad_identity_is_refused_and_logged(caplog, secret, claim, reason):
  """A fake process that connects first, without the secret or with it but claiming this
  process's own id or one out of range, is refused (its connection closed) and logged in one
  line; the real peers are accepted after it."""
  acceptor = _Acceptor(me=0, count=3)
  fake = acceptor.connect()
  links.hello(fake, secret, claim)
  assert _closed_by_server(fake)
  peers = [acceptor.connect(), acceptor.connect()]
  links.hello(peers[0], SECRET, 1)
  links.hello(peers[1], SECRET, 2)
  result = acceptor.join()
  assert sorted(result) == [1, 2]
  refusals = _refusals(caplog, [fake, *peers])
  assert len(refusals) == 1 and reason in refusals[0] and "\n" not in refusals[0], refusals
  for s in [fake, *peers]:
    s.close()
  acceptor.close(result)


def test_duplicate_process_id_is_refused_and_logged(caplog):
  acceptor = _Acceptor(me=0, count=3)
  ones = [acceptor.connect(), acceptor.connect()]
  for s in ones:
    links.hello(s, SECRET, 1)
  readable, _, _ = select.select(ones, [], [], GENEROUS_S)  # the refused one: EOF
  assert len(readable) == 1 and _closed_by_server(readable[0])
  kept = ones[1 - ones.index(readable[0])]
  kept.setblocking(False)
  with pytest.raises(BlockingIOError):  # the other is open, with nothing to read
    kept.recv(1)
  kept.setblocking(True)
  two = acceptor.connect()
  links.hello(two, SECRET, 2)
  result = acceptor.join()
  assert sorted(result) == [1, 2]
  refusals = _refusals(caplog, [*ones, two])
  assert len(refusals) == 1 and "process 1, which is already connected" in refusals[0]
  for s in [*ones, two]:
    s.close()
  acceptor.close(result)


# ------------------------------------------------------------------ (c) shard lists
class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


class _Sharding:
  """Leaf 0 of shape (4, 6) split in rows over processes 0 and 1, each holding one row-half
  on two devices (columns 0:3 and 3:6)."""

  def devices_indices_map(self, shape):
    del shape
    return {_Device(p): (slice(2 * p, 2 * p + 2), slice(c, c + 3))
            for p in (0, 1) for c in (0, 3)}


class _Leaf:
  def __init__(self):
    self.shape, self.dtype, self.ndim, self.nbytes = (4, 6), np.dtype(np.float32), 2, 96
    self.sharding = _Sharding()


LEAVES = [_Leaf()]
HELD_1 = {(0, ((2, 4), (0, 3))), (0, ((2, 4), (3, 6)))}


def _part(rows, cols):
  return np.zeros((rows[1] - rows[0], cols[1] - cols[0]), np.float32)


def test_held_is_what_each_process_sends():
  assert links._held(LEAVES) == {0: {(0, ((0, 2), (0, 3))), (0, ((0, 2), (3, 6)))},
                                 1: HELD_1}
  # A real sharding over this process's 4 CPU devices: the same keys HostLink._run sends.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
  x = jax.device_put(np.zeros((4, 6), np.float32), NamedSharding(mesh, P("a")))
  sent = {(0, links._box(s.index, x.shape)) for s in x.addressable_shards}
  assert links._held([x]) == {jax.process_index(): sent} and len(sent) == 2  # replicas once


def test_complete_shard_list_is_accepted():
  shards = [[0, [[2, 4], [0, 3]]], [0, [[2, 4], [3, 6]]]]
  got = links._check_shards(1, shards, [_part((2, 4), (0, 3)), _part((2, 4), (3, 6))],
                            LEAVES, HELD_1)
  assert set(got) == HELD_1


@pytest.mark.parametrize("shards,arrays,match", [
    ([[0, [[2, 4], [0, 3]]]], [_part((2, 4), (0, 3))],
     r"process 1: leaf 0: partial shard list, shard \[\(2, 4\), \(3, 6\)\] missing"),
    ([[0, [[2, 4], [0, 3]]], [0, [[1, 3], [3, 6]]]], [_part((2, 4), (0, 3)), _part((1, 3), (3, 6))],
     r"process 1: leaf 0: shard \[\(1, 3\), \(3, 6\)\] is not one its devices hold"),
    ([[0, [[2, 4], [0, 3]]], [0, [[2, 4], [0, 3]]]], [_part((2, 4), (0, 3))] * 2,
     "listed twice"),
    ([[0, [[2, 4], [0, 6]]]], [_part((2, 4), (0, 6))], "is not one its devices hold"),
])
def test_partial_or_overlapping_shard_list_is_refused(shards, arrays, match):
  """A partial list used to be accepted and the gap zero-filled; a shard that overlaps another
  process's (or its own) overwrote it. Each is refused in one line naming process and leaf."""
  with pytest.raises(wire.WireError, match=match) as e:
    links._check_shards(1, shards, arrays, LEAVES, HELD_1)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("entry", [
    [1.5, [[2, 4], [0, 3]]],     # non-integer leaf id
    ["0", [[2, 4], [0, 3]]],     # a string id
    [True, [[2, 4], [0, 3]]],    # a bool is not an id
    [-1, [[2, 4], [0, 3]]],      # used to wrap around to the last leaf
    [0, [[2.0, 4], [0, 3]]],     # float bounds used to be truncated by int()
    [0, [["2", 4], [0, 3]]],
    [0, [[2, 4]]],               # too few dims
    [0, [[4, 2], [0, 3]]],       # start after stop
    [0, [[2, 4], [0, 3], [0, 1]]],
    {"leaf": 0},
    [0],
])
def test_malformed_shard_entry_is_refused(entry):
  with pytest.raises(wire.WireError, match="does not fit the payload") as e:
    links._check_shards(1, [entry], [_part((2, 4), (0, 3))], LEAVES, HELD_1)
  assert "\n" not in str(e.value)


def test_malformed_shard_list_over_a_real_socket_is_one_wire_error():
  """End to end through ``_Peers.all_gather``: a peer holding the secret sends a signed message
  whose shard list names leaf 1.5; the exchange raises one WireError, no traceback from
  indexing, and nothing is merged."""
  peers = links._Peers.__new__(links._Peers)
  mine, theirs = socket.socketpair()
  peers.secret, peers.me, peers.count, peers._held = SECRET, 0, 2, {}
  peers.send, peers.recv = {1: mine}, {1: mine}
  message = wire.pack(SECRET, "island_exchange",
                      {"step": 3, "fragment": 0, "shards": [[1.5, [[2, 4], [0, 3]]]]},
                      [_part((2, 4), (0, 3))])
  theirs.sendall(struct.pack("!Q", len(message)) + message)
  meta = {"step": 3, "fragment": 0, "shards": [[0, [[0, 2], [0, 3]]]]}
  with pytest.raises(wire.WireError, match=r"process 1: shard \[1\.5, .*does not fit"):
    peers.all_gather(meta, [_part((0, 2), (0, 3))], LEAVES)
  theirs.settimeout(GENEROUS_S)  # what this process sent, whole, before its socket closes
  (n,) = struct.unpack("!Q", links._recv_exactly(theirs, 8))
  assert wire.unpack(SECRET, links._recv_exactly(theirs, n), "island_exchange")[1] == meta
  for s in (mine, theirs):
    s.close()


# ------------------------------------------------------------------ (d) malformed messages
def test_huge_dims_whose_product_overflows_are_one_wire_error():
  """2**32 x 2**32 float32 wrapped to 0 bytes in int64 and then failed in reshape; a product of
  more than 4300 digits cannot even be printed."""
  for shape in ([2**32, 2**32], [10**4000] * 10):
    header = json.dumps({"kind": "x", "meta": {}, "arrays": [
        {"dtype": "float32", "shape": shape}]}).encode()
    assert len(header) < wire.MAX_HEADER_BYTES
    _one_line_wire_error(_signed(header, b"\0" * 8), "truncated payload: 8 bytes left")


def test_too_many_dims_or_too_big_a_zero_size_array_is_one_wire_error():
  for shape, payload in (([1] * 100, b"\0" * 4), ([0, 2**62, 2**62], b"")):
    header = json.dumps({"kind": "x", "meta": {}, "arrays": [
        {"dtype": "float32", "shape": shape}]}).encode()
    _one_line_wire_error(_signed(header, payload), "bad array spec")


def test_deeply_nested_json_is_one_wire_error():
  """``json.loads`` raises RecursionError on deep nesting; 100000 levels exceed the header
  limit, 30000 fit in it and reach the parser."""
  deep = b'{"kind":"x","meta":{"a":' + b"[" * 100000 + b"]" * 100000 + b'},"arrays":[]}'
  _one_line_wire_error(_signed(deep), "header length")
  deep = b'{"kind":"x","meta":{"a":' + b"[" * 30000 + b"]" * 30000 + b'},"arrays":[]}'
  assert len(deep) < wire.MAX_HEADER_BYTES
  _one_line_wire_error(_signed(deep), "nested too deeply")


@pytest.mark.parametrize("header,match", [
    (b'[1, 2, 3]', "malformed header"),                               # a header that is a list
    (b'{"kind":"x","meta":[],"arrays":[]}', "malformed header"),
    (b'{"kind":"x","meta":{},"arrays":[{"dtype":"float32","shape":[-4]}]}', "bad array spec"),
    (b'{"kind":"x","meta":{},"arrays":[{"dtype":"float32","shape":[2.5]}]}', "bad array spec"),
    (b'{"kind":"x","meta":{},"arrays":[{"dtype":"float32","shape":"4"}]}', "bad array spec"),
    (b'{"kind":"x","meta":{},"arrays":[7]}', "bad array spec"),
    (b'\xff\xfe', "malformed header"),
])
def test_malformed_signed_header_is_one_wire_error(header, match):
  _one_line_wire_error(_signed(header), match)


# ------------------------------------------------------------------ the coordinator's bind
@pytest.mark.parametrize("address,interface,bind", [
    ("127.0.0.1:1234", "", "127.0.0.1:1234"),
    ("[::1]:1234", "", "[::1]:1234"),
    ("node0:8476", "", "node0:8476"),
    ("node0:8476", "10.0.0.5", "10.0.0.5:8476"),          # a bare host
    ("node0:8476", "fe80::1", "[fe80::1]:8476"),
    ("node0:8476", "[::1]", "[::1]:8476"),
    ("[::1]:1234", "ib0.cluster", "ib0.cluster:1234"),
])
def test_coordinator_binds_one_address(address, interface, bind):
  assert launch.coordinator_bind(address, interface) == bind


@pytest.mark.parametrize("address,interface,match", [
    ("node0", "", "expected host:port"),                # a bare host, no port
    ("[::1]", "", "expected host:port"),
    (":1234", "", "expected host:port"),
    ("node0:http", "", "expected host:port"),
    ("node0:70000", "", "expected host:port"),
    ("::1:1234", "", "needs brackets"),
    ("node0:1234", "10.0.0.5:99", "without a port"),
])
def test_bad_coordinator_address_is_one_error(address, interface, match):
  with pytest.raises(ValueError, match=match):
    launch.coordinator_bind(address, interface)


def test_initialize_passes_the_bind_address():
  """What ``initialize`` would hand ``jax.distributed.initialize`` (which tests never start)."""
  child = {launch.ENV_COORDINATOR: "127.0.0.1:5555", launch.ENV_NUM_PROCESSES: "2",
           launch.ENV_PROCESS_ID: "1"}
  # Local: the launcher's loopback address, which its children dial, whatever the interface.
  assert launch.distributed_args("local", "10.0.0.5", child) == dict(
      coordinator_address="127.0.0.1:5555", num_processes=2, process_id=1,
      coordinator_bind_address="127.0.0.1:5555")
  assert launch.distributed_args("local", "", {}) is None  # the launcher itself
  assert launch.distributed_args("none", "", child) is None
  plain = {"JAX_COORDINATOR_ADDRESS": "[::1]:1234", launch.ENV_NUM_PROCESSES: "2",
           launch.ENV_PROCESS_ID: "0"}
  assert launch.distributed_args("cluster", "", plain) == dict(
      num_processes=2, process_id=0, coordinator_bind_address="[::1]:1234")
  assert launch.distributed_args("cluster", "::1", plain)["coordinator_bind_address"] == (
      "[::1]:1234")
  # An explicit JAX_COORDINATOR_BIND_ADDRESS is JAX's to read; auto-detection passes nothing.
  assert launch.distributed_args(
      "cluster", "", {**plain, "JAX_COORDINATOR_BIND_ADDRESS": "10.1.1.1:1234"}) == dict(
          num_processes=2, process_id=0)
  assert launch.distributed_args("cluster", "", {}) == {}
  with pytest.raises(ValueError, match="launch.mode='mpi'"):
    launch.distributed_args("mpi", "", {})
