"""What crosses a network between processes: a typed header plus raw array bytes, signed.

No pickle, ever. A message is

    mac[32] | header_len[4] | header (JSON, <= 64 KiB) | array bytes

``mac`` is HMAC-SHA256 over everything after it with the job's secret; :func:`unpack` checks it
(constant time) before reading a byte of the header, then checks the header against a fixed
schema: the message ``kind`` expected, array dtypes from an allow-list, non-negative shapes whose
sizes add up to exactly the bytes that follow. Only then are arrays made (``np.frombuffer``,
read-only views). Anything else raises :class:`WireError` with one line naming what was wrong;
the caller refuses the peer and leaves its state untouched.

Peers prove they hold the secret before any message is read: :func:`challenge` /
:func:`answer` / :func:`check_answer` are a nonce handshake (HMAC of the nonce and the peer's
claimed identity), used on every new connection.

The secret comes from ``FEDJAX_LM_JOB_SECRET`` (the local launcher makes a random one per job
and hands it to its children) or the file ``launch.secret_file`` names (on a cluster, the
scheduler distributes it like any credential).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import hashlib
import hmac
import json
import math
import mmap
import os
import secrets
import struct
import threading
from typing import Sequence

from cryptography.hazmat.primitives.ciphers import aead
import ml_dtypes
import numpy as np

ENV_SECRET = "FEDJAX_LM_JOB_SECRET"
MAC_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024
DTYPES = ("float32", "bfloat16", "float16", "int32", "int8", "uint8", "uint16", "uint32",
          "bool")
_LEN = struct.Struct("!I")


class WireError(ValueError):
  """A message or handshake that is not authentic or not well formed."""


def new_secret() -> str:
  return secrets.token_hex(32)


def job_secret(secret_file: str = "") -> bytes:
  """The job's shared secret: ``FEDJAX_LM_JOB_SECRET``, else the contents of ``secret_file``;
  one clear error if neither is set (a network path never runs unauthenticated)."""
  value = os.environ.get(ENV_SECRET, "")
  if not value and secret_file:
    try:
      with open(secret_file, encoding="utf-8") as f:
        value = f.read().strip()
    except OSError as e:
      raise WireError(f"launch.secret_file={secret_file!r}: {e.strerror}") from e
  if len(value) < 16:
    raise WireError(f"no job secret: set {ENV_SECRET} (16+ characters) or launch.secret_file "
                    "(the local launcher makes one itself)")
  return value.encode()


def _short(x, limit: int = 200) -> str:
  """``repr(x)`` cut to ``limit`` characters: an error line quotes a peer's value, not 64 KiB
  of it."""
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


def _dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def pack(secret: bytes, kind: str, meta: dict, arrays: Sequence[np.ndarray] = ()) -> bytes:
  """A signed message of ``kind`` with JSON-able ``meta`` and raw ``arrays``."""
  specs = []
  for a in arrays:
    name = str(a.dtype)
    if name not in DTYPES:
      raise WireError(f"dtype {name} cannot be sent (allowed: {', '.join(DTYPES)})")
    specs.append({"dtype": name, "shape": [int(d) for d in a.shape]})
  header = json.dumps({"kind": kind, "meta": meta, "arrays": specs},
                      sort_keys=True, separators=(",", ":")).encode()
  if len(header) > MAX_HEADER_BYTES:
    raise WireError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
  body = b"".join([_LEN.pack(len(header)), header] +
                  [np.ascontiguousarray(a).tobytes() for a in arrays])
  return hmac.new(secret, body, hashlib.sha256).digest() + body


def unpack(secret: bytes, message: bytes, kind: str | Sequence[str]
           ) -> tuple[str, dict, list[np.ndarray]]:
  """(kind, meta, arrays) of an authentic, well-formed message of an expected ``kind``."""
  view = memoryview(message)
  if len(view) < MAC_BYTES + _LEN.size:
    raise WireError(f"message of {len(view)} bytes is too short")
  mac, body = bytes(view[:MAC_BYTES]), view[MAC_BYTES:]
  if not hmac.compare_digest(mac, hmac.new(secret, body, hashlib.sha256).digest()):
    raise WireError("bad message authentication code (wrong secret, or altered in transit)")
  (n,) = _LEN.unpack(body[:_LEN.size])
  if n > MAX_HEADER_BYTES or _LEN.size + n > len(body):
    raise WireError(f"header length {n} out of range")
  try:
    header = json.loads(bytes(body[_LEN.size:_LEN.size + n]))
    got, meta, specs = header["kind"], header["meta"], header["arrays"]
    if not isinstance(meta, dict) or not isinstance(specs, list):
      raise TypeError("meta must be an object and arrays a list")
  except RecursionError as e:  # json.loads of deeply nested input: no traceback, one line
    raise WireError("malformed header: nested too deeply") from e
  except (ValueError, KeyError, TypeError) as e:
    raise WireError(f"malformed header: {e}") from e
  kinds = (kind,) if isinstance(kind, str) else tuple(kind)
  if got not in kinds:
    raise WireError(f"message kind {got!r}, expected {' or '.join(kinds)}")
  arrays, offset = [], _LEN.size + n
  for spec in specs:
    if (not isinstance(spec, dict) or spec.get("dtype") not in DTYPES or
        not isinstance(spec.get("shape"), list) or
        not all(isinstance(d, int) and d >= 0 for d in spec["shape"])):
      raise WireError(f"bad array spec {_short(spec)}")
    dtype = _dtype(spec["dtype"])
    # Python ints: np.prod in int64 wraps (2**32 x 2**32 gave 0 bytes, then a reshape error).
    size = math.prod(spec["shape"]) * dtype.itemsize
    if offset + size > len(body):
      declared = size if size < 2**63 else "over 2**63"  # str() of 4300+ digits raises
      raise WireError(f"truncated payload: {len(body) - offset} bytes left, {declared} declared")
    try:  # numpy's own limits (at most 64 dims, each size within intp)
      arrays.append(np.frombuffer(body[offset:offset + size], dtype).reshape(spec["shape"]))
    except ValueError as e:
      raise WireError(f"bad array spec {_short(spec)}: {e}") from e
    offset += size
  if offset != len(body):
    raise WireError(f"{len(body) - offset} bytes after the declared arrays")
  return got, meta, arrays


def challenge() -> bytes:
  return secrets.token_bytes(32)


def answer(secret: bytes, nonce: bytes, identity: str) -> bytes:
  return hmac.new(secret, b"fedjax_lm/hello|" + nonce + b"|" + identity.encode(),
                  hashlib.sha256).digest()


def check_answer(secret: bytes, nonce: bytes, identity: str, got: bytes) -> None:
  if not hmac.compare_digest(answer(secret, nonce, identity), bytes(got)):
    raise WireError(f"peer claiming to be {identity!r} failed the handshake (wrong secret)")


# ------------------------------------------------------------------ streams and per-peer keys
# A payload of any size travels as a stream of messages: a signed head (``pack`` with no
# arrays; ``meta["stream"]`` lists the arrays' dtypes and shapes and the chunk size) and then
# the array bytes, concatenated and cut into chunks of at most ``chunk`` bytes, each
#
#     tag[16] | bytes     tag = GMAC(chunk_key, nonce = index[12], bytes)
#     chunk_key = HMAC-SHA256(key, "fedjax_lm/chunks|" | head_mac)
#
# so every chunk is authenticated on arrival, bound to its head (each stream's chunk key is
# derived from its head's MAC, which covers the call's random nonce: no key is used for two
# streams) and to its place (the index is the GMAC nonce, used once per key); a reader holds one
# buffer of the declared size (checked against its limit before it is allocated) and at most
# _AHEAD + 1 chunks besides, and a stream that breaks or ends early yields nothing. GMAC is
# AES-GCM with the chunk as associated data and no plaintext (NIST SP 800-38D), from
# ``cryptography`` (OpenSSL): 20 GB/s a core here against HMAC-SHA256's 1.7, which made the
# MACs the largest cost of a 1B model's payload.

CHUNK_BYTES = 4 << 20
CHUNK_TAG_BYTES = 16
# Chunk tags are computed (sender) and checked, then copied into place (reader) by a small pool
# shared by the process's streams, a few chunks ahead of the gRPC thread: bytes.join and
# numpy's copy release the GIL on large buffers, so copying overlaps with sending and
# receiving and can use a second core. At most _AHEAD chunks per stream wait for the pool
# (memory stays bounded).
_WORKERS, _AHEAD = 2, 4
_pool_lock, _pool = threading.Lock(), (0, None)


def _workers() -> concurrent.futures.ThreadPoolExecutor:
  """The process's MAC pool (a new one after a fork: the parent's threads are not there)."""
  global _pool  # pylint: disable=global-statement
  with _pool_lock:
    if _pool[0] != os.getpid():
      _pool = (os.getpid(), concurrent.futures.ThreadPoolExecutor(
          _WORKERS, thread_name_prefix="wire-mac"))
    return _pool[1]


def derive(secret: bytes, identity: str) -> bytes:
  """The key of one identity (``island/3``) derived from the job secret (HMAC as a PRF): a
  member given only its own key cannot sign as another."""
  return hmac.new(secret, b"fedjax_lm/key|" + identity.encode(), hashlib.sha256).hexdigest(
      ).encode()


class _Chunks:
  """The chunk tags of one stream (see above): GMAC under the stream's own key."""

  def __init__(self, key: bytes, head_mac: bytes):
    self._gcm = aead.AESGCM(hmac.new(key, b"fedjax_lm/chunks|" + bytes(head_mac),
                                     hashlib.sha256).digest())

  def tag(self, index: int, data) -> bytes:
    return self._gcm.encrypt(index.to_bytes(12, "big"), b"", data)


def _seal(chunks: _Chunks, index: int, pieces: list, join: bool = True) -> bytes | tuple:
  """One chunk message, ``tag | bytes``: with ``join`` the arrays' bytes are copied once,
  into it (gRPC sends ``bytes`` only; a memoryview is refused); else ``(tag, *pieces)``, the
  pieces in place (a socket writes them as they are)."""
  body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
  tag = chunks.tag(index, body)
  return b"".join([tag, *pieces]) if join else (tag, *pieces)


def message_bytes(message: bytes | tuple) -> int:
  """The bytes of a message :func:`stream` yields (joined or in parts)."""
  return len(message) if not isinstance(message, tuple) else sum(len(p) for p in message)


def _cut(views: Sequence[memoryview], chunk: int):
  """The arrays' bytes, concatenated and cut into ``chunk``-byte lists of views (in place)."""
  pending, size = [], 0
  for view in views:
    at = 0
    while at < len(view):
      piece = view[at:at + chunk - size]
      pending.append(piece)
      size, at = size + len(piece), at + len(piece)
      if size == chunk:
        yield pending
        pending, size = [], 0
  if size:
    yield pending


def stream(key: bytes, kind: str, meta: dict, arrays: Sequence[np.ndarray] = (),
           chunk: int = CHUNK_BYTES, join: bool = True):
  """The messages of one streamed payload: a signed head, then authenticated chunks. The
  arrays' bytes are read in place (no payload-sized copy is made); ``join=False``: each chunk
  message as ``(tag, *pieces)``, views of the arrays (no copy at all)."""
  specs, views = [], []
  for a in arrays:
    name = str(a.dtype)
    if name not in DTYPES:
      raise WireError(f"dtype {name} cannot be sent (allowed: {', '.join(DTYPES)})")
    specs.append({"dtype": name, "shape": [int(d) for d in a.shape]})
    views.append(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
  head = pack(key, kind, {**meta, "stream": {"arrays": specs, "chunk": int(chunk)}})
  yield head
  chunks, ahead = _Chunks(key, head[:MAC_BYTES]), collections.deque()
  for index, pieces in enumerate(_cut(views, chunk)):
    ahead.append(_workers().submit(_seal, chunks, index, pieces, join))
    if len(ahead) > _AHEAD:
      yield ahead.popleft().result()
  while ahead:
    yield ahead.popleft().result()


def specs_bytes(specs: object, limit: int) -> list[tuple[np.dtype, tuple[int, ...], int]]:
  """``(dtype, shape, nbytes)`` of declared arrays: allowed dtypes, non-negative int dims,
  total at most ``limit`` bytes (checked without overflow); WireError otherwise."""
  if not isinstance(specs, list):
    raise WireError("stream head: arrays must be a list")
  out, total = [], 0
  for spec in specs:
    if (not isinstance(spec, dict) or spec.get("dtype") not in DTYPES or
        not isinstance(spec.get("shape"), list) or
        not all(type(d) is int and d >= 0 for d in spec["shape"])):  # pylint: disable=unidiomatic-typecheck
      raise WireError(f"bad array spec {_short(spec)}")
    dtype, size = _dtype(spec["dtype"]), 1
    for d in spec["shape"]:
      size *= d
      if size * dtype.itemsize > limit:
        raise WireError(f"declared arrays exceed the {limit}-byte limit")
    total += size * dtype.itemsize
    if total > limit:
      raise WireError(f"declared arrays exceed the {limit}-byte limit")
    out.append((dtype, tuple(spec["shape"]), size * dtype.itemsize))
  return out


def unstream(key: bytes, messages, kind: str | Sequence[str], limit: int
             ) -> tuple[str, dict, list[np.ndarray]]:
  """(kind, meta, arrays) of a streamed payload (:func:`stream`), each chunk checked before
  it is copied into the one buffer; WireError if the head or any chunk is not authentic, the
  declared arrays exceed ``limit`` bytes, or the stream ends early or runs on."""
  messages = iter(messages)
  try:
    head = next(messages)
  except StopIteration:
    raise WireError("empty stream") from None
  got, meta, _ = unpack(key, head, kind)
  info = meta.pop("stream", None)
  if not isinstance(info, dict) or type(info.get("chunk")) is not int or info["chunk"] < 1:  # pylint: disable=unidiomatic-typecheck
    raise WireError("stream head without a valid stream description")
  layout = specs_bytes(info.get("arrays"), limit)
  total, chunk = sum(n for _, _, n in layout), info["chunk"]
  # Each array starts on a 64-byte boundary of the buffer: JAX takes an aligned host array
  # onto a CPU device without copying it (a received mean or state is not held twice).
  offsets, starts, ends, place_at, end = [], [], [], 0, 0  # buffer offsets; stream spans
  for _, _, n in layout:
    offsets.append(place_at)
    place_at += -(-n // _ALIGN) * _ALIGN
    starts.append(end)
    end += n
    ends.append(end)
  buffer = receive_buffer(place_at)
  chunks, at, index, checks = _Chunks(key, head[:MAC_BYTES]), 0, 0, collections.deque()

  def check(index: int, at: int, message: memoryview) -> None:
    """In a worker: the chunk's tag, then (only if authentic) its bytes into place (stream
    offset ``at`` on: across array boundaries, each array's part at its own offset)."""
    data = message[CHUNK_TAG_BYTES:]
    if not hmac.compare_digest(bytes(message[:CHUNK_TAG_BYTES]), chunks.tag(index, data)):
      raise WireError(f"chunk {index}: bad message authentication code")
    i, done = bisect.bisect_right(ends, at), 0
    while done < len(data):
      take = min(len(data) - done, ends[i] - (at + done))
      into = offsets[i] + at + done - starts[i]
      buffer[into:into + take] = np.frombuffer(data[done:done + take], np.uint8)
      done, i = done + take, i + 1

  def fail(why: str) -> WireError:
    """The first failure in stream order: an earlier chunk's bad MAC before ``why``."""
    while checks:
      checks.popleft().result()
    return WireError(why)

  try:
    while at < total:
      try:
        message = memoryview(next(messages))
      except StopIteration:
        raise fail(f"stream ended after {at} of {total} bytes") from None
      n = len(message) - CHUNK_TAG_BYTES
      if n != min(chunk, total - at):
        raise fail(f"chunk {index} of {n} bytes, expected {min(chunk, total - at)}")
      checks.append(_workers().submit(check, index, at, message))
      if len(checks) > _AHEAD:
        checks.popleft().result()
      at, index = at + n, index + 1
    while checks:
      checks.popleft().result()
  finally:  # on a failure, chunks not yet checked are dropped (the buffer is never returned)
    for f in checks:
      f.cancel()
  for _ in messages:
    raise WireError("stream runs on after its declared bytes")
  arrays = [buffer[at:at + n].view(dtype).reshape(shape)
            for (dtype, shape, n), at in zip(layout, offsets)]
  return got, meta, arrays


_HUGE = 2 << 20  # a transparent huge page (x86-64)
_ALIGN = 64  # what JAX's CPU client needs to use a host buffer in place


def receive_buffer(nbytes: int) -> np.ndarray:
  """A writable ``nbytes`` uint8 buffer for a payload: from 2 MiB up, its own anonymous mapping
  advised into transparent huge pages (``MADV_HUGEPAGE``: one page fault per 2 MiB instead of
  512; first-touch faults were a second of CPU per 4 GB received), freed when the last array
  viewing it is."""
  if nbytes < _HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
    return np.empty(nbytes, np.uint8)
  mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  try:
    mapping.madvise(mmap.MADV_HUGEPAGE)
  except OSError:  # (no THP support: ordinary pages)
    pass
  return np.frombuffer(mapping, np.uint8)


ENV_MEMBER_KEY = "FEDJAX_LM_MEMBER_KEY"


def member_key(identity: str, secret_file: str = "") -> bytes:
  """This member's own key: ``FEDJAX_LM_MEMBER_KEY`` (what the launcher gives an island: its
  key alone, not the job secret), else derived from the job secret (:func:`job_secret`)."""
  value = os.environ.get(ENV_MEMBER_KEY, "")
  if value:
    if len(value) < 16:
      raise WireError(f"{ENV_MEMBER_KEY} is shorter than 16 characters")
    return value.encode()
  return derive(job_secret(secret_file), identity)
