"""The channel's bulk path: a large call's stream over one plain TCP (or mutual-TLS) connection.

gRPC's Python path costs 0.8 CPU s per GB on the sending side and 1.2 on the receiving one
(measured, beside raw TCP's 0.3 and 0.15), so a 1B model's 4.2 GB payload ran at a quarter of
what the socket carries (``experiments/channel_bench.py``). A call whose request or reply may be large (:data:`MIN_BYTES`, per
client) goes here instead: the same call, the same token, the same signed head and
authenticated chunks (:func:`fedjax_lm.wire.stream`), the same handler, deadline, slots and
per-member limits as its gRPC twin (``channel.serve`` runs both), only the framing differs:

    client -> server   hello: frame(JSON {"method", "token"}), at most HELLO_BYTES
    server -> client   status frame(JSON {"code", "details"}): "OK" once the token is checked
    client -> server   (only then) the request's stream messages, one frame each
    server -> client   status frame and, if "OK", the reply's stream messages, one frame each

Each side reads and writes from one thread (an SSL socket is not safe to read and write from
two at once: measured, a segmentation fault under mutual TLS), and no payload byte is sent
before the caller is admitted.

    frame = length[4, big-endian] | bytes; an empty frame ends a stream (no message is empty)

Work before authentication is bounded like gRPC's: at most ``threads`` connections are
served at once (more are closed on accept), a connection that has not sent its hello (and,
with TLS, finished its handshake) within HELLO_DEADLINE_S is closed, the hello is at most
HELLO_BYTES, and no frame is read before the token was checked (its member, MAC, age and
nonce: the gRPC path's nonce cache, so a token is good for one call on either path). A frame
is at most a chunk and a header; a reply frame must be written within WRITE_S. The listener
binds the gRPC server's interface; its port (ephemeral) is told by the gRPC method ``Bulk``, so
a member learns it over an authenticated reply (and one that cannot reach it falls back to
gRPC: ``channel.BULK_TRIES``). With TLS, the connection is mutual TLS with the job's CA, as the
gRPC channel is.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from typing import Callable, Iterator

import grpc

from fedjax_lm import wire

METHOD = "Bulk"
MIN_BYTES = 16 << 20  # a call whose request or reply may exceed this takes the bulk path
HELLO_BYTES = 4096
HELLO_DEADLINE_S = 5.0
WRITE_S = 30.0  # the most one reply frame (a chunk, 4 MiB) may take to be written
_FRAME = struct.Struct("!I")
_STATUS_BYTES = 1 << 16
_DRAIN_S, _DRAIN_BYTES = 1.0, 16 << 20


class Abort(Exception):
  """A call ended with a gRPC status (either transport reports it the same way)."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code, self.message = code, message


class Failed(grpc.RpcError):
  """A bulk call that failed, with the status its gRPC twin would have given."""

  def __init__(self, code: grpc.StatusCode, details: str, unreachable: bool = False):
    super().__init__(details)
    self._code, self._details = code, details
    self.unreachable = unreachable  # no connection could be made to the bulk port

  def code(self) -> grpc.StatusCode:
    return self._code

  def details(self) -> str:
    return self._details


def _frame_length(conn: socket.socket, limit: int) -> int | None:
  """The next frame's length (None if the peer closed the connection before it); WireError
  past ``limit``."""
  head = bytearray(_FRAME.size)
  k = conn.recv_into(head)
  if not k:
    return None
  if k < len(head):
    _read_into(conn, memoryview(head)[k:])
  (n,) = _FRAME.unpack(head)
  if n > limit:
    raise wire.WireError(f"a {n}-byte frame (at most {limit})")
  return n


def _read_frame(conn: socket.socket, limit: int) -> bytearray | None:
  """One frame's bytes (None at a clean end of the stream); WireError past ``limit``."""
  n = _frame_length(conn, limit)
  if n is None:
    return None
  body = bytearray(n)
  _read_into(conn, memoryview(body))
  return body


def _frames(conn: socket.socket, limit: int) -> Iterator[memoryview]:
  """A stream's messages, up to its end (an empty frame); a connection closed before it is
  a broken stream. Each is read into one of a ring of buffers, reused (no fresh allocation,
  zeroing and page faults per message): :func:`wire.unstream` holds at most ``wire._AHEAD``
  messages unfinished when it asks for the next, so a ring two longer is never overwritten
  while in use."""
  ring = [None] * (wire._AHEAD + 2)  # pylint: disable=protected-access
  for i in itertools.count():
    n = _frame_length(conn, limit)
    if n is None:
      raise ConnectionError("the connection closed before the stream's end")
    if not n:
      return
    slot = i % len(ring)
    if ring[slot] is None or len(ring[slot]) < n:
      ring[slot] = bytearray(max(n, min(limit, wire.CHUNK_BYTES + wire.CHUNK_TAG_BYTES)))
    view = memoryview(ring[slot])[:n]
    _read_into(conn, view)
    yield view


def _read_into(conn: socket.socket, view: memoryview) -> None:
  got = 0
  while got < len(view):
    k = conn.recv_into(view[got:], len(view) - got)
    if not k:
      raise ConnectionError(f"connection closed {got} bytes into a {len(view)}-byte frame")
    got += k


def _write_frame(conn: socket.socket, data: bytes | tuple) -> None:
  """One frame of ``data``: bytes, or a message in parts (:func:`wire.stream`'s
  ``join=False``: each part written in place, no copy)."""
  parts = data if isinstance(data, tuple) else (data,)
  conn.sendall(_FRAME.pack(sum(len(p) for p in parts)))
  for part in parts:
    conn.sendall(part)


def _server_context(tls) -> ssl.SSLContext:
  """Mutual TLS with the job's CA (the gRPC server's own settings, for a plain socket)."""
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  ctx.minimum_version = ssl.TLSVersion.TLSv1_2
  ctx.verify_mode = ssl.CERT_REQUIRED
  ctx.load_verify_locations(cadata=tls.ca.decode())
  _load_pair(ctx, tls)
  return ctx


def _client_context(tls) -> ssl.SSLContext:
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
  ctx.minimum_version = ssl.TLSVersion.TLSv1_2
  ctx.load_verify_locations(cadata=tls.ca.decode())
  _load_pair(ctx, tls)
  return ctx


def _load_pair(ctx: ssl.SSLContext, tls) -> None:
  """``ssl`` loads a certificate and key from files only: a private temporary file, removed
  at once."""
  fd, path = tempfile.mkstemp(prefix="fedjax_lm-tls-")
  try:
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
      f.write(tls.cert + b"\n" + tls.key)
    ctx.load_cert_chain(path)
  finally:
    os.unlink(path)


class Listener:
  """The server half: accepts connections on ``host:port`` (0: any free port), admits each call with
  ``admit(method, token) -> (who, nonce)`` (the gRPC interceptor's check) and runs the
  method's ``calls[method](who, nonce, requests, cancel)`` (the gRPC handler's body)."""

  def __init__(self, host: str, tls, admit: Callable, calls: dict, log: Callable,
               threads: int, frame_limit: int, port: int = 0):
    self.admit, self.calls, self.log = admit, calls, log
    self.frame_limit = frame_limit  # the largest message (a chunk and a header)
    try:
      self._sock = socket.create_server((host, port))
    except OSError as e:
      raise OSError(f"syncer: cannot listen on {host}:{port} (the bulk path): "
                    f"{e.strerror or e}") from None
    self.port = self._sock.getsockname()[1]
    self._ctx = _server_context(tls) if tls is not None else None
    self._slots = threading.BoundedSemaphore(threads)
    self._closed = threading.Event()
    self._active = 0  # connections being served (a reply may still be streaming)
    self._idle = threading.Condition()

  def start(self) -> None:
    threading.Thread(target=self._accept, daemon=True, name="bulk-accept").start()

  def close(self, grace: float = 0.0) -> None:
    """Stops accepting, then waits up to ``grace`` seconds for the connections being served to
    end (a reply still streaming: a process that exits under it cuts it)."""
    self._closed.set()
    try:
      self._sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass
    self._sock.close()
    with self._idle:
      self._idle.wait_for(lambda: self._active == 0, timeout=grace)

  def _accept(self) -> None:
    while not self._closed.is_set():
      try:
        conn, _ = self._sock.accept()
      except OSError:
        return
      if not self._slots.acquire(blocking=False):
        self.log("syncer: bulk: every connection slot busy; one closed")
        conn.close()
        continue
      with self._idle:
        self._active += 1
      threading.Thread(target=self._serve, args=(conn,), daemon=True, name="bulk").start()

  def _serve(self, conn: socket.socket) -> None:
    # The handshake and the hello within HELLO_DEADLINE_S in all (a socket timeout alone is
    # per read: a hello sent a byte at a time would hold the connection for hours).
    current = [conn]  # (wrapping in TLS makes a new socket object: the timer ends that one)
    hello_timer = threading.Timer(HELLO_DEADLINE_S, lambda: _shut(current[0]))
    hello_timer.daemon = True
    hello_timer.start()
    try:
      conn.settimeout(HELLO_DEADLINE_S)
      conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      if self._ctx is not None:
        conn = current[0] = self._ctx.wrap_socket(conn, server_side=True)
      self._call(conn, hello_timer)
    except (OSError, ValueError, ssl.SSLError) as e:
      self.log("syncer: bulk: connection dropped: %s", e)
    finally:
      hello_timer.cancel()
      try:
        conn.close()
      finally:
        self._slots.release()
        with self._idle:
          self._active -= 1
          self._idle.notify_all()

  def _call(self, conn: socket.socket, hello_timer: threading.Timer) -> None:
    try:
      frame = _read_frame(conn, HELLO_BYTES)
      if frame is None:
        return
      try:
        hello = json.loads(bytes(frame))
        method, value = hello["method"], hello["token"]
        if not (isinstance(method, str) and isinstance(value, str)):
          raise TypeError
      except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise wire.WireError("a malformed bulk hello") from e
      handle = self.calls.get(method)
      if handle is None:
        raise wire.WireError(f"no method {method[:80]!r}")
    except wire.WireError as e:
      self.log("syncer: bulk: refused: %s", e)
      _status(conn, grpc.StatusCode.INVALID_ARGUMENT, str(e))
      return
    try:
      who, nonce = self.admit(method, value)
    except Abort as e:
      _status(conn, e.code, e.message)
      return
    hello_timer.cancel()
    # From here the call's own deadline (its timer) bounds reading the request, and each read
    # or write must progress within WRITE_S (a member that stops reading is cut off).
    conn.settimeout(WRITE_S)
    _status(conn, grpc.StatusCode.OK, "admitted")  # the caller sends its request only now

    replies = handle(who, nonce, _frames(conn, self.frame_limit), lambda: _shut(conn))
    try:
      first = next(replies)
    except Abort as e:
      _status(conn, e.code, e.message)
      return
    except OSError as e:  # (the connection broke or the call's deadline ended it)
      self.log("syncer: bulk: %s from %s: %s", method, who, e)
      return
    _status(conn, grpc.StatusCode.OK, "")
    _write_frame(conn, first)
    for message in replies:
      _write_frame(conn, message)
    _write_frame(conn, b"")


def _status(conn: socket.socket, code: grpc.StatusCode, details: str) -> None:
  """The call's status. A refusal then drains what the client already sent (at most
  _DRAIN_BYTES, for _DRAIN_S): closing with unread bytes would reset the connection and the
  client could lose the status before it reads it."""
  try:
    _write_frame(conn, json.dumps({"code": code.name, "details": details[:2000]}).encode())
    if code == grpc.StatusCode.OK:
      return
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(_DRAIN_S)
    drained, scratch = 0, bytearray(1 << 16)
    while drained < _DRAIN_BYTES and (k := conn.recv_into(scratch)):
      drained += k
  except OSError:
    pass


def call(host: str, port: int, tls, method: str, token: str, requests: Iterator[bytes],
         timeout: float, frame_limit: int = 64 << 20) -> Iterator[memoryview]:
  """The client half: one call's reply messages (an iterator: read as consumed). Raises
  :class:`Failed` with the call's status (UNAVAILABLE when the connection could not be made
  or broke)."""
  deadline = time.monotonic() + timeout
  try:
    conn = socket.create_connection((host, port), timeout=min(timeout, 20.0))
  except OSError as e:
    raise Failed(grpc.StatusCode.UNAVAILABLE, f"bulk connect: {e}", unreachable=True) from e
  timer = threading.Timer(timeout, lambda: _shut(conn))
  timer.daemon = True
  timer.start()
  try:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
      conn = _client_context(tls).wrap_socket(conn, server_hostname=host)
    conn.settimeout(None)
    _write_frame(conn, json.dumps({"method": method, "token": token}).encode())
    _expect_ok(conn)  # admitted: only now a payload byte is sent
    for message in requests:  # (one thread reads and writes: an SSL socket is not
      _write_frame(conn, message)  # safe to read and write from two at once)
    _write_frame(conn, b"")
    _expect_ok(conn)  # served
    yield from _frames(conn, frame_limit)
  except OSError as e:  # (ssl.SSLError and ConnectionError are OSErrors)
    code = (grpc.StatusCode.DEADLINE_EXCEEDED if time.monotonic() >= deadline else
            grpc.StatusCode.UNAVAILABLE)
    raise Failed(code, f"bulk: {e}") from e
  except wire.WireError:  # (a reply frame past the limit, or a request that cannot be sent)
    raise
  except ValueError as e:  # a status that is not JSON
    raise Failed(grpc.StatusCode.UNAVAILABLE, f"bulk: a malformed status ({e})") from e
  finally:
    timer.cancel()
    conn.close()


def _expect_ok(conn: socket.socket) -> None:
  """Reads a status frame; :class:`Failed` with its code unless it is OK."""
  status = _read_frame(conn, _STATUS_BYTES)
  if status is None:
    raise Failed(grpc.StatusCode.UNAVAILABLE, "bulk: the connection closed without a status")
  status = json.loads(bytes(status))
  if not isinstance(status, dict) or status.get("code") != "OK":
    status = status if isinstance(status, dict) else {}
    code = getattr(grpc.StatusCode, str(status.get("code")), grpc.StatusCode.UNKNOWN)
    raise Failed(code, str(status.get("details", "")))


def _shut(conn: socket.socket) -> None:
  """Ends a connection another thread may be reading or writing: the socket's own shutdown
  (``SSLSocket.shutdown`` would also drop its SSL object under that thread)."""
  try:
    socket.socket.shutdown(conn, socket.SHUT_RDWR)
  except OSError:
    pass
