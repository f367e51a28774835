"""The decoupled channel: gRPC streams between island jobs and the syncer, authenticated, no pickle.

gRPC (grpcio, the RPC library JAX's own coordination service is built on) gives deadlines,
keep-alives and bounded message sizes. Every method is a bidirectional stream of bounded
messages carrying a :func:`fedjax_lm.wire.stream` payload each way: a signed typed head, then
the raw array bytes in authenticated chunks. No payload size is capped by the transport (a 1B
model's float32 pseudo-gradient is 4.2 GB); each side holds one buffer of the declared size,
checked against what it expects before it is allocated.

Identity. Every member has its own key, derived from the job secret
(:func:`wire.derive` of ``island/<k>``); the syncer derives them all, an island is given only
its own (``FEDJAX_LM_MEMBER_KEY``; the local launcher does this). Every call:

1. carries a ``fedjax-auth`` token ``who:time:nonce:HMAC(key(who), method|who|time|nonce)``.
   Before any handler runs (no payload byte read), the server checks that ``who`` is a member
   it knows, the MAC, that ``time`` is within ``TOKEN_AGE_S`` (seconds, not minutes) and that the
   nonce was not seen within that window (a nonce cache): a captured call cannot be replayed;
2. the request head is signed with the same key and names the token's nonce, the job
   (``job``: the digest of the config fingerprint) and the sender's counter (strictly
   increasing per member across its restarts; the syncer checks it on sends), so a body cannot
   be moved to another call, job or member; each chunk's MAC binds it to that head and index;
3. the reply is signed with the member's key and names the request's nonce (``reply_to``):
   the island accepts no reply but the one to its own call.

Work before authentication is bounded: one gRPC message is at most a chunk plus a header;
calls are capped per server (``maximum_concurrent_rpcs``) and per member; a call whose request
does not arrive in full within its deadline (the declared bytes at ``MIN_RATE`` bytes/s, plus
``BASE_DEADLINE_S``) is cancelled; refusals are logged at most ``_LOG_BURST`` lines per
``_LOG_WINDOW_S`` (then counted).

A call whose request or reply may exceed ``launch.bulk_min_bytes`` (a payload, a mean, a
joiner's state) runs the same way over the bulk path (:mod:`fedjax_lm.decoupled.bulk`): one
TCP (or mutual-TLS) connection per call carrying the same token, messages and handler, without
gRPC Python's copies (a 1B payload at 0.61 of raw TCP here, against 0.25 over gRPC).

With ``launch.tls_ca`` / ``tls_cert`` / ``tls_key`` (PEM files) the channel is also mutual TLS:
the syncer presents its certificate and requires one from every island, both signed by the
job's CA; the keys above stay (a certificate alone does not make a peer a member of this job).
The server listens on the configured interface only (``launch.interface``, default loopback).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from typing import Callable, Iterator, NamedTuple, Sequence

import grpc
import numpy as np

from fedjax_lm import wire
from fedjax_lm.decoupled import bulk as bulk_lib

SERVICE = "fedjax_lm.Syncer"
TOKEN_AGE_S = 30.0
BASE_DEADLINE_S = 30.0
MIN_RATE = 1 << 20  # bytes/s a call's stream must sustain (1 MiB/s) before it is cancelled
SMALL_BYTES = 1 << 20  # what a control call (join, heartbeat, receive request) may carry
BULK_TRIES = 3  # a bulk port unreachable this many times in a row: that client uses gRPC
PER_MEMBER_CALLS = 6  # a member's calls in flight (heartbeat, send, receive, join, retries)
_MESSAGE_BYTES = wire.CHUNK_BYTES + wire.MAX_HEADER_BYTES + 4096
_SERVER_OPTIONS = [("grpc.max_send_message_length", _MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", _MESSAGE_BYTES),
                   ("grpc.so_reuseport", 0)]
# Reconnect within a second of a restarted syncer coming back (gRPC's default backoff grows to
# minutes: measured here, islands with a 2 s heartbeat were dropped by a syncer that was up).
# Retries 0.2 s after a refused connection, at most 1 s apart. gRPC also takes
# min_reconnect_backoff as the least time a connection attempt (TCP and TLS handshakes) is given:
# left at its default (20 s), not lowered with the backoff, or a handshake slower than the
# backoff (a loaded host, a long round trip) fails every attempt, forever (measured on the WAN
# testbed: every island's Join UNAVAILABLE for 180 s with 0.1 s).
_CLIENT_OPTIONS = [("grpc.max_send_message_length", _MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", _MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
_LOG_WINDOW_S, _LOG_BURST = 10.0, 5


def deadline_s(nbytes: int) -> float:
  """How long a call carrying ``nbytes`` may take (either end cancels it after that)."""
  return BASE_DEADLINE_S + nbytes / MIN_RATE


def token(key: bytes, method: str, who: str) -> tuple[str, str]:
  """(token, nonce) for one call of ``method`` by ``who``."""
  stamp, nonce = f"{time.time():.3f}", secrets.token_hex(16)
  mac = hmac.new(key, f"{method}|{who}|{stamp}|{nonce}".encode(), hashlib.sha256).hexdigest()
  return f"{who}:{stamp}:{nonce}:{mac}", nonce


class Tokens:
  """The server's token check: members' keys, freshness, and a nonce cache over the tokens'
  lifetime (a replayed token is refused even within it)."""

  def __init__(self, keys: Callable[[str], bytes | None], max_age_s: float = TOKEN_AGE_S):
    self.keys, self.max_age_s = keys, max_age_s
    self._seen: dict[str, float] = {}
    self._order: collections.deque = collections.deque()
    self._lock = threading.Lock()

  def check(self, method: str, value: str | None) -> tuple[str, str]:
    """(who, nonce) of an authentic, fresh, unseen token; WireError otherwise."""
    try:
      who, stamp, nonce, mac = (value or "").rsplit(":", 3)
      age = time.time() - float(stamp)
    except ValueError as e:
      raise wire.WireError("missing or malformed fedjax-auth token") from e
    key = self.keys(who)
    if key is None:
      raise wire.WireError(f"token from {who[:40]!r}, which is not a member of this job")
    want = hmac.new(key, f"{method}|{who}|{stamp}|{nonce}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
      raise wire.WireError(f"bad fedjax-auth token (caller claims {who!r})")
    if not abs(age) < self.max_age_s:
      raise wire.WireError(f"fedjax-auth token from {who!r} is {age:.0f} s old (at most "
                           f"{self.max_age_s:.0f} s either way)")
    now = time.time()
    with self._lock:
      while self._order and self._order[0][0] < now:
        self._seen.pop(self._order.popleft()[1], None)
      if nonce in self._seen:
        raise wire.WireError(f"replayed fedjax-auth token from {who!r}")
      self._seen[nonce] = now + 2 * self.max_age_s
      self._order.append((now + 2 * self.max_age_s, nonce))
    return who, nonce


class _Log:
  """Refusal lines, at most ``_LOG_BURST`` per ``_LOG_WINDOW_S`` (a flood writes a count)."""

  def __init__(self):
    self._lock, self._window, self._lines, self._dropped = threading.Lock(), 0.0, 0, 0

  def __call__(self, fmt: str, *args) -> None:
    with self._lock:
      now = time.time()
      if now - self._window > _LOG_WINDOW_S:
        if self._dropped:
          logging.warning("syncer: %d more refusals not logged", self._dropped)
        self._window, self._lines, self._dropped = now, 0, 0
      self._lines += 1
      if self._lines > _LOG_BURST:
        self._dropped += 1
        return
    logging.warning(fmt, *args)


class _Auth(grpc.ServerInterceptor):
  """Refuses a call whose token is not authentic, fresh and new, or whose member has too many
  calls in flight, before its handler runs."""

  def __init__(self, tokens: Tokens, log: _Log):
    self.tokens, self.log = tokens, log
    self.in_flight: collections.Counter = collections.Counter()
    self.lock = threading.Lock()

  def admit(self, method: str, value: str | None) -> tuple[str, str]:
    """(who, nonce) of a call that may run; :class:`_Abort` (logged) otherwise."""
    code = grpc.StatusCode.UNAUTHENTICATED
    try:
      who, nonce = self.tokens.check(method, value)
      with self.lock:
        if self.in_flight[who] >= PER_MEMBER_CALLS:
          code = grpc.StatusCode.RESOURCE_EXHAUSTED
          raise wire.WireError(f"{who} has {PER_MEMBER_CALLS} calls in flight")
    except wire.WireError as e:
      self.log("syncer: refused %s: %s", method, e)
      raise _Abort(code, str(e)) from e
    return who, nonce

  def intercept_service(self, continuation, handler_call_details):
    value = dict(handler_call_details.invocation_metadata).get("fedjax-auth")
    try:
      self.admit(handler_call_details.method, value)
    except _Abort as e:
      def deny(requests, context, e=e):
        del requests
        context.abort(e.code, e.message)
      return grpc.stream_stream_rpc_method_handler(deny)
    return continuation(handler_call_details)


class Tls(NamedTuple):
  """PEM bytes of the job's CA and of this role's certificate and private key."""
  ca: bytes
  cert: bytes
  key: bytes

  @classmethod
  def from_config(cls, launch) -> "Tls | None":
    """``launch.tls_{ca,cert,key}``: all three paths, or none (HMAC only)."""
    paths = {k: str(launch[f"tls_{k}"]) for k in ("ca", "cert", "key")}
    if not any(paths.values()):
      return None
    missing = [f"launch.tls_{k}" for k, v in paths.items() if not v]
    if missing:
      raise ValueError(f"mutual TLS needs launch.tls_ca, tls_cert and tls_key; missing "
                       f"{', '.join(missing)}")
    out = {}
    for k, path in paths.items():
      try:
        with open(path, "rb") as f:
          out[k] = f.read()
      except OSError as e:
        raise ValueError(f"launch.tls_{k}={path!r}: {e.strerror}") from e
    return cls(**out)


class Refused(Exception):
  """A well-formed, authentic request the syncer will not serve (one line says why)."""


_Abort = bulk_lib.Abort  # (a call's status, on either transport)

Reply = tuple  # (kind, meta, arrays)


class Method(NamedTuple):
  """A served method: ``fn(who, meta, arrays) -> (kind, meta, arrays)``, the request kinds it
  takes, the most request bytes ``limit(who)`` it accepts, and whether the request must name
  this job (``Join`` carries the whole fingerprint instead, compared field by field), and how
  many of its calls may be received and handled at once (``slots``, 0: no cap; a payload
  method's cap bounds the server's receive buffers whatever the number of members: the others
  wait, their streams held back by flow control, and give up with the call's deadline)."""
  fn: Callable[[str, dict, list], Reply]
  kinds: tuple[str, ...]
  limit: Callable[[str], int] = lambda who: SMALL_BYTES
  same_job: bool = True
  slots: int = 0


def serve(keys: Callable[[str], bytes | None], job: str, host: str, port: int,
          methods: dict[str, Method], threads: int = 16, tls: Tls | None = None,
          bulk: bool = True, bulk_port: int = 0) -> tuple["Server", int]:
  """Starts a server for ``methods`` on ``host:port`` (0: any free port), with members'
  ``keys`` (identity -> key, None for a stranger), mutual TLS with ``tls``, and (``bulk``) the
  bulk path beside it on the same interface (:mod:`fedjax_lm.decoupled.bulk`), on
  ``bulk_port`` (0: any free one; either way the ``Bulk`` method tells it); returns
  (server, port)."""
  log = _Log()
  tokens = Tokens(keys)
  auth = _Auth(tokens, log)
  # No SO_REUSEPORT (gRPC's default on Linux): a second server on a taken port would share it
  # silently, the kernel splitting connections between the two.
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(threads), options=_SERVER_OPTIONS,
                       interceptors=[auth], maximum_concurrent_rpcs=threads)
  calls = {}

  def wrap(name: str, method: Method):
    full = f"/{SERVICE}/{name}"
    slots = threading.BoundedSemaphore(method.slots) if method.slots else None

    def handle(who: str, nonce: str, requests: Iterator[bytes], cancel: Callable[[], None]
               ) -> Iterator[bytes]:
      """One admitted call of either transport: its request read (within its deadline,
      ``cancel`` ends the transport's stream), handled, its reply's messages; :class:`_Abort`
      with the status otherwise."""
      key, limit = keys(who), method.limit(who)
      with auth.lock:
        auth.in_flight[who] += 1
      timer = threading.Timer(deadline_s(limit), cancel)
      timer.daemon = True
      held = False
      try:
        if slots is not None:  # wait for a slot (the request is not read meanwhile)
          held = slots.acquire(timeout=deadline_s(limit))
          if not held:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{full}: every slot busy")
        timer.start()
        kind, meta, arrays = wire.unstream(key, requests, method.kinds, limit)
        if meta.pop("nonce", None) != nonce:
          raise wire.WireError(f"{full}: the request names another call")
        if meta.pop("job", None) != job and method.same_job:
          raise wire.WireError(f"{full}: the request names another job")
        timer.cancel()
        out_kind, out_meta, out_arrays = method.fn(who, meta, arrays)
        del arrays  # (the receive buffer: free before the slot is)
        if held:
          slots.release()
          held = False
        yield from wire.stream(key, out_kind, {**out_meta, "reply_to": nonce}, out_arrays)
      except wire.WireError as e:
        log("syncer: rejected %s from %s: %s", name, who, e)
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
      except Refused as e:
        log("syncer: refused %s from %s: %s", name, who, e)
        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
      finally:
        timer.cancel()
        if held:
          slots.release()
        with auth.lock:
          auth.in_flight[who] -= 1
    calls[full] = handle

    def handler(requests: Iterator[bytes], context) -> Iterator[bytes]:
      who, _, nonce, _ = dict(context.invocation_metadata())["fedjax-auth"].rsplit(":", 3)
      try:
        yield from handle(who, nonce, requests, context.cancel)
      except _Abort as e:
        context.abort(e.code, e.message)
    return grpc.stream_stream_rpc_method_handler(handler)

  handlers = {name: wrap(name, m) for name, m in methods.items()}
  side = None
  if bulk:
    side = bulk_lib.Listener(host, tls, auth.admit, calls, log, threads, _MESSAGE_BYTES,
                             bulk_port)
    handlers[bulk_lib.METHOD] = wrap(bulk_lib.METHOD, Method(
        lambda who, meta, arrays: ("bulk", {"port": side.port}, []), ("bulk",)))
  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
  try:
    if tls is None:
      bound = server.add_insecure_port(f"{host}:{port}")
    else:
      bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials(
          [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True))
  except RuntimeError:  # grpcio raises where older versions returned 0
    bound = 0
  if not bound:
    if side is not None:
      side.close()
    raise OSError(f"syncer: cannot listen on {host}:{port}")
  server.start()
  if side is not None:
    side.start()
  return Server(server, side, bound), bound


class Server:
  """The gRPC server (on ``grpc_port``) and its bulk listener, stopped together."""

  def __init__(self, grpc_server: grpc.Server, side, grpc_port: int):
    self.grpc, self.bulk, self.grpc_port = grpc_server, side, grpc_port

  def stop(self, grace: float | None = None):
    """Stops both listeners; calls in flight get ``grace`` seconds to end (the bulk path's are
    waited for here, gRPC's returned event is set when its own have)."""
    if self.bulk is not None:
      self.bulk.close(grace or 0.0)
    return self.grpc.stop(grace)

  def wait_for_termination(self, timeout: float | None = None) -> bool:
    return self.grpc.wait_for_termination(timeout)


class SyncerUnreachable(ConnectionError):
  """The syncer did not answer within the deadline."""


class Client:
  """Calls the syncer's methods as member ``who`` with its ``key``, retrying while the syncer
  is unavailable (being restarted) or a stream broke, until ``give_up_s``. A retried call is a
  new call (new token, nonce and counter): the syncer never applies a partial payload, and a
  send it already has is answered as a duplicate."""

  def __init__(self, address: str, key: bytes, who: str, job: str, give_up_s: float = 60.0,
               tls: Tls | None = None, bulk_min_bytes: int = bulk_lib.MIN_BYTES):
    self.address, self._key, self.who, self.job = address, key, who, job
    self.give_up_s = give_up_s
    # calls whose request or reply may exceed this take the bulk path (negative: never)
    self.bulk_min_bytes = int(bulk_min_bytes)
    self._bulk_port: int | None = None  # the server's bulk port (asked once; 0: none)
    self._bulk_misses = 0  # bulk connections refused in a row
    self._tls = tls
    self.state = None
    self._channel = self._open()
    self.sent_bytes = 0  # stream bytes put on the wire (what this client sent)
    self.received_bytes = 0
    # strictly increasing per member, across its restarts (microseconds at start, then +1)
    self._counter, self._lock = time.time_ns() // 1000, threading.Lock()

  def _open(self) -> grpc.Channel:
    """A channel to the syncer, with a watcher of its state for its whole life: the watcher
    polls the channel, and so drives its (re)connection attempts, while no call is in flight.
    Without one, an attempt that starts while the syncer is still down (a call fails fast as
    UNAVAILABLE and is retried 0.2 s later) advances only on gRPC's timer ticks (5 s apart): a
    TLS handshake of several round trips outlasted the 20 s attempt deadline every time
    (measured on the WAN testbed: islands started before the 2 syncer shards never joined
    over mutual TLS)."""
    tls = self._tls
    if tls is None:
      ch = grpc.insecure_channel(self.address, options=_CLIENT_OPTIONS)
    else:
      ch = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(
          root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert),
                               options=_CLIENT_OPTIONS)
    ch.subscribe(self._watch, try_to_connect=True)
    return ch

  def _next(self) -> int:
    with self._lock:
      self._counter += 1
      return self._counter

  def call(self, method: str, kind: str, meta: dict, arrays: Sequence[np.ndarray] = (),
           reply: str | Sequence[str] = "ok", reply_limit: int = SMALL_BYTES,
           deadline: float | None = None) -> Reply:
    """(kind, meta, arrays) of the syncer's reply to one ``method`` call."""
    full = f"/{SERVICE}/{method}"
    nbytes = sum(int(a.nbytes) for a in arrays)
    largest = max(nbytes, reply_limit if reply_limit > SMALL_BYTES else 0)
    deadline = deadline or deadline_s(largest)
    start = time.time()
    big = method != bulk_lib.METHOD and 0 <= self.bulk_min_bytes <= largest
    while True:
      counted = [0]
      try:
        port = self._bulk() if big else 0
        value, nonce = token(self._key, full, self.who)

        def requests():
          for m in wire.stream(self._key, kind, {**meta, "nonce": nonce, "job": self.job,
                                                 "counter": self._next()}, arrays,
                               join=not port):
            counted[0] += wire.message_bytes(m)
            yield m
        if port:
          responses = bulk_lib.call(self.address.rsplit(":", 1)[0].strip("[]"), port,
                                    self._tls, full, value, requests(), deadline,
                                    _MESSAGE_BYTES)
        else:
          responses = self._channel.stream_stream(full)(
              requests(), timeout=deadline, metadata=[("fedjax-auth", value)])
        got = [0]

        def replies():
          for m in responses:
            got[0] += len(m)
            yield m
        out_kind, out_meta, out_arrays = wire.unstream(self._key, replies(), reply,
                                                       reply_limit)
        if out_meta.pop("reply_to", None) != nonce:
          raise wire.WireError(f"syncer {self.address}: a reply to another call")
        self.sent_bytes += counted[0]
        self.received_bytes += got[0]
        return out_kind, out_meta, out_arrays
      except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
          raise wire.WireError(f"syncer {self.address} refused {method}: {e.details()}") from e
        if isinstance(e, bulk_lib.Failed):
          self._bulk_unreachable(e)
        if time.time() - start > self.give_up_s:
          raise SyncerUnreachable(
              f"syncer {self.address} did not answer {method} within {self.give_up_s:.0f} s "
              f"({code.name}); check launch.syncer and that the syncer is running") from e
        time.sleep(0.2)

  def _bulk_unreachable(self, e: "bulk_lib.Failed") -> None:
    """After a failed bulk call: ask for the port again (the syncer may have restarted on
    another); a port that the syncer (answering over gRPC) keeps naming and that cannot be
    connected to ``BULK_TRIES`` times in a row (a firewall that opens only the gRPC port) is
    given up for this client, with one warning: its calls go over gRPC."""
    failed, self._bulk_port = self._bulk_port, None
    self._bulk_misses = self._bulk_misses + 1 if e.unreachable and failed else 0
    if self._bulk_misses >= BULK_TRIES:
      logging.warning("channel: the syncer's bulk port %s at %s cannot be reached (%s); "
                      "large calls go over gRPC (slower: open the port)", failed,
                      self.address, e.details())
      self._bulk_port = 0

  def _bulk(self) -> int:
    """The server's bulk port (asked over gRPC, once; 0 if it has none)."""
    if self._bulk_port is None:
      try:
        _, meta, _ = self.call(bulk_lib.METHOD, "bulk", {}, reply="bulk")
        self._bulk_port = int(meta["port"])
      except wire.WireError:  # (a server without the bulk path: gRPC it is)
        self._bulk_port = 0
    return self._bulk_port

  def _watch(self, state: grpc.ChannelConnectivity) -> None:
    self.state = state

  def close(self):
    self._channel.unsubscribe(self._watch)
    self._channel.close()


def member_keys(secret: bytes, members: Callable[[str], bool]) -> Callable[[str], bytes | None]:
  """The server's ``keys``: a member's derived key (``members(who)``), None for a stranger."""
  return lambda who: wire.derive(secret, who) if members(who) else None


def job_id(fingerprint: dict) -> str:
  """The job's id every signed head names: the digest of the config fingerprint."""
  return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
