"""The decoupled channel: gRPC between island jobs and the syncer, authenticated, no pickle.

gRPC (grpcio, the RPC library JAX's own coordination service is built on) gives deadlines,
retries on a fresh connection, keep-alives and bounded message sizes. Methods carry raw bytes:
each request and reply is a :mod:`fedjax_lm.wire` message (HMAC-signed typed header plus raw
array bytes), so nothing is deserialised by a generic codec.

Authentication happens twice, both before our code reads a payload byte:

1. every call carries a ``fedjax-auth`` metadata token, ``island:time:nonce:HMAC(secret,
   method|island|time|nonce)``; a server interceptor checks it (and that ``time`` is within
   five minutes) and aborts the call with UNAUTHENTICATED otherwise, without running the
   method's handler;
2. the handler checks the message's own MAC (:func:`wire.unpack`) before parsing its header.

With ``launch.tls_ca`` / ``tls_cert`` / ``tls_key`` (PEM files) the channel is also mutual TLS:
the syncer presents its certificate and requires one from every island, both signed by the job's
CA, so a peer without one is refused in the handshake, before any call reaches the server; the
HMAC checks stay (a certificate alone does not make a peer a member of this job).

The server listens on the configured interface only (``launch.interface``, default loopback).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import logging
import secrets
import time
from typing import Callable, NamedTuple

import grpc

from fedjax_lm import wire

SERVICE = "fedjax_lm.Syncer"
MAX_MESSAGE_BYTES = 1 << 30  # what the syncer accepts (work before authentication is bounded)
# What the syncer may send and an island accept: gRPC's largest message (int32 length), so a
# joiner of a 150M-parameter model takes its params and outer state (1.2 GB) in one reply.
MAX_REPLY_BYTES = (1 << 31) - 1
_TOKEN_AGE_S = 300.0
_SERVER_OPTIONS = [("grpc.max_send_message_length", MAX_REPLY_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# Reconnect within a second of a restarted syncer coming back (gRPC's default backoff grows to
# minutes: measured here, islands with a 2 s heartbeat were dropped by a syncer that was up).
_CLIENT_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


def _token(secret: bytes, method: str, who: str) -> str:
  stamp, nonce = f"{time.time():.3f}", secrets.token_hex(8)
  mac = hmac.new(secret, f"{method}|{who}|{stamp}|{nonce}".encode(), hashlib.sha256).hexdigest()
  return f"{who}:{stamp}:{nonce}:{mac}"


def check_token(secret: bytes, method: str, token: str | None) -> str:
  """The caller's identity, if ``token`` is authentic for ``method``; WireError otherwise."""
  try:
    who, stamp, nonce, mac = (token or "").rsplit(":", 3)
    fresh = abs(time.time() - float(stamp)) < _TOKEN_AGE_S
  except ValueError as e:
    raise wire.WireError("missing or malformed fedjax-auth token") from e
  want = hmac.new(secret, f"{method}|{who}|{stamp}|{nonce}".encode(), hashlib.sha256).hexdigest()
  if not hmac.compare_digest(want, mac):
    raise wire.WireError(f"bad fedjax-auth token (caller claims {who!r})")
  if not fresh:
    raise wire.WireError(f"stale fedjax-auth token from {who!r}")
  return who


class _Auth(grpc.ServerInterceptor):
  """Refuses a call whose metadata token is not authentic, before its handler runs."""

  def __init__(self, secret: bytes):
    self._secret = secret

  def intercept_service(self, continuation, handler_call_details):
    token = dict(handler_call_details.invocation_metadata).get("fedjax-auth")
    try:
      check_token(self._secret, handler_call_details.method, token)
    except wire.WireError as e:
      logging.warning("syncer: refused %s: %s", handler_call_details.method, e)
      message = str(e)

      def deny(request, context):
        del request
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
      return grpc.unary_unary_rpc_method_handler(deny)
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


def serve(secret: bytes, host: str, port: int, methods: dict[str, Callable[[bytes], bytes]],
          threads: int = 16, tls: Tls | None = None) -> tuple[grpc.Server, int]:
  """Starts a server for ``methods`` (name -> bytes handler) on ``host:port`` (0: any free
  port), mutual TLS with ``tls``; returns (server, port)."""
  # No SO_REUSEPORT (gRPC's default on Linux): a second server on a taken port would share it
  # silently, the kernel splitting connections between the two (the likely cause of a CI run
  # where one test's island got UNAVAILABLE from a syncer that another island had joined).
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(threads),
                       options=_SERVER_OPTIONS + [("grpc.so_reuseport", 0)],
                       interceptors=[_Auth(secret)])

  def wrap(fn):
    def handler(request: bytes, context) -> bytes:
      try:
        return fn(request)
      except wire.WireError as e:
        logging.warning("syncer: rejected a message: %s", e)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
      except Refused as e:
        logging.warning("syncer: refused: %s", e)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    return grpc.unary_unary_rpc_method_handler(handler)

  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
      SERVICE, {name: wrap(fn) for name, fn in methods.items()}),))
  try:
    if tls is None:
      bound = server.add_insecure_port(f"{host}:{port}")
    else:
      bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials(
          [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True))
  except RuntimeError:  # grpcio raises where older versions returned 0
    bound = 0
  if not bound:
    raise OSError(f"syncer: cannot listen on {host}:{port}")
  server.start()
  return server, bound


class SyncerUnreachable(ConnectionError):
  """The syncer did not answer within the deadline."""


class Client:
  """Calls the syncer's methods with a deadline, retrying while it is unavailable (a syncer
  being restarted) until ``give_up_s``."""

  def __init__(self, address: str, secret: bytes, who: str, give_up_s: float = 60.0,
               tls: Tls | None = None):
    self.address, self._secret, self.who, self.give_up_s = address, secret, who, give_up_s
    if tls is None:
      self._channel = grpc.insecure_channel(address, options=_CLIENT_OPTIONS)
    else:
      self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
          root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert),
                                          options=_CLIENT_OPTIONS)
    self.sent_bytes = 0  # request bytes put on the wire (what this client sent)
    self.received_bytes = 0

  def call(self, method: str, request: bytes, deadline_s: float = 30.0) -> bytes:
    full = f"/{SERVICE}/{method}"
    stub = self._channel.unary_unary(full)
    start = time.time()
    while True:
      try:
        reply = stub(request, timeout=deadline_s,
                     metadata=[("fedjax-auth", _token(self._secret, full, self.who))])
        self.sent_bytes += len(request)
        self.received_bytes += len(reply)
        return reply
      except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION):
          raise wire.WireError(f"syncer {self.address} refused {method}: {e.details()}") from e
        if time.time() - start > self.give_up_s:
          raise SyncerUnreachable(
              f"syncer {self.address} did not answer {method} within {self.give_up_s:.0f} s "
              f"({code.name}); check launch.syncer and that the syncer is running") from e
        time.sleep(0.2)

  def close(self):
    self._channel.close()
