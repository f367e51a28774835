"""Network paths (fedjax_lm/wire.py and the host link's handshake): no pickle, peers
authenticated before a payload byte is read, malformed or altered messages refused."""

import os
import pickle
import socket
import struct
import threading

import numpy as np
import pytest

from fedjax_lm import wire
from fedjax_lm.engine import links

SECRET = b"s" * 32


def test_roundtrip_keeps_dtypes_shapes_and_meta():
  arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.uint16),
            np.zeros((0, 4), np.int8)]
  kind, meta, got = wire.unpack(SECRET, wire.pack(SECRET, "x", {"step": 3}, arrays), "x")
  assert kind == "x" and meta == {"step": 3}
  for a, b in zip(arrays, got):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m[:-1], "authentication"),                       # truncated
    (lambda m: m[:40] + bytes([m[40] ^ 1]) + m[41:], "authentication"),   # one bit flipped
    (lambda m: m[:10], "too short"),
])
def test_altered_or_truncated_message_is_refused(mutate, match):
  message = wire.pack(SECRET, "x", {}, [np.ones(100, np.float32)])
  with pytest.raises(wire.WireError, match=match):
    wire.unpack(SECRET, mutate(message), "x")


def _chunks(arrays, chunk=4096, key=SECRET, meta=None):
  return list(wire.stream(key, "send", meta or {"step": 1}, arrays, chunk=chunk))


def test_stream_round_trip_across_chunk_and_array_boundaries():
  arrays = [np.arange(3001, dtype=np.float32), np.ones((5, 7), np.int32),
            np.zeros((0, 2), np.float32), np.arange(1500, dtype=np.uint16)]
  messages = _chunks(arrays, chunk=1000)
  kind, meta, got = wire.unstream(SECRET, iter(messages), "send", 1 << 20)
  assert kind == "send" and meta == {"step": 1} and len(messages) == 1 + -(-15176 // 1000)
  for a, b in zip(arrays, got):
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  got[0][0] = 7.0  # (the reader's own writable buffer)


def test_chunk_tag_is_gmac_under_the_streams_own_key_with_the_index_as_nonce():
  """The wire format from its description, computed independently: tag = AES-GCM(chunk_key,
  nonce = index as 12 bytes, no plaintext, the chunk as associated data), chunk_key =
  HMAC-SHA256(key, "fedjax_lm/chunks|" + the head's MAC)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import hmac  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives.ciphers import aead  # pylint: disable=import-outside-toplevel
  payload = np.arange(2048, dtype=np.float32)
  messages = _chunks([payload], chunk=3000)
  chunk_key = hmac.new(SECRET, b"fedjax_lm/chunks|" + messages[0][:wire.MAC_BYTES],
                       hashlib.sha256).digest()
  raw = payload.tobytes()
  for index, message in enumerate(messages[1:]):
    body = raw[index * 3000:(index + 1) * 3000]
    want = aead.AESGCM(chunk_key).encrypt(index.to_bytes(12, "big"), b"", body)
    assert message == want + body and len(want) == wire.CHUNK_TAG_BYTES


@pytest.mark.parametrize("attack", ["flip", "swap", "other_stream", "drop", "extra", "short"])
def test_altered_reordered_or_foreign_chunks_are_refused(attack):
  """Each chunk is bound to its stream's head and its place: a flipped bit, two chunks swapped,
  a chunk of another stream with the same key (same bytes, same index), a dropped or an extra
  chunk, a short chunk: refused."""
  payload = np.arange(4096, dtype=np.float32)
  messages = _chunks([payload])
  other = _chunks([payload], meta={"step": 2})
  match = "authentication"
  if attack == "flip":
    messages[2] = messages[2][:-1] + bytes([messages[2][-1] ^ 1])
  elif attack == "swap":
    messages[1], messages[2] = messages[2], messages[1]
  elif attack == "other_stream":  # identical chunk bytes; only the head (nonce) differs
    messages[3] = other[3]
  elif attack == "drop":  # (a middle one: the next chunk's tag fails first)
    del messages[-1]
    match = "ended after"
  elif attack == "extra":
    messages.append(messages[-1])
    match = "runs on"
  else:
    messages[1] = messages[1][:-4]
    match = "expected"
  with pytest.raises(wire.WireError, match=match):
    wire.unstream(SECRET, iter(messages), "send", 1 << 20)


def test_large_receive_buffer_is_its_own_writable_mapping():
  buf = wire.receive_buffer(5 << 20)
  assert buf.shape == (5 << 20,) and buf.flags.writeable
  buf[:] = 3
  assert int(buf[-1]) == 3 and wire.receive_buffer(100).nbytes == 100


def test_wrong_secret_or_kind_is_refused():
  message = wire.pack(SECRET, "x", {}, [np.ones(3, np.float32)])
  with pytest.raises(wire.WireError, match="authentication"):
    wire.unpack(b"t" * 32, message, "x")
  with pytest.raises(wire.WireError, match="kind 'x', expected y"):
    wire.unpack(SECRET, message, "y")


def test_signed_but_inconsistent_header_is_refused():
  """Even with a valid MAC (a peer holding the secret, but buggy), sizes must add up and
  dtypes come from the allow-list: nothing is unpickled or allocated from the header."""
  body_header = b'{"arrays":[{"dtype":"float32","shape":[1000]}],"kind":"x","meta":{}}'
  body = struct.pack("!I", len(body_header)) + body_header + b"\0" * 8
  import hashlib, hmac  # pylint: disable=g-import-not-at-top,multiple-imports
  message = hmac.new(SECRET, body, hashlib.sha256).digest() + body
  with pytest.raises(wire.WireError, match="truncated payload"):
    wire.unpack(SECRET, message, "x")
  body_header = b'{"arrays":[{"dtype":"object","shape":[1]}],"kind":"x","meta":{}}'
  body = struct.pack("!I", len(body_header)) + body_header + b"\0" * 8
  message = hmac.new(SECRET, body, hashlib.sha256).digest() + body
  with pytest.raises(wire.WireError, match="bad array spec"):
    wire.unpack(SECRET, message, "x")


def test_no_secret_is_one_clear_error(monkeypatch):
  monkeypatch.delenv(wire.ENV_SECRET, raising=False)
  with pytest.raises(wire.WireError, match="no job secret"):
    wire.job_secret("")


class _Evil:
  """What the old transport would have unpickled: runs code when loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_host_link_refuses_the_pickle_attack_and_accepts_the_real_peer(tmp_path, caplog):
  """The attack of the issue, re-run: a local process connects to a worker's listener before
  the first exchange, claims to be process 1 and sends a pickle that would create a file. It
  is refused at the handshake (no secret), nothing is unpickled, and the real process 1, which
  holds the job's secret, is accepted."""
  listener = socket.create_server((links.advertised_host(), 0))
  address = listener.getsockname()
  marker = str(tmp_path / "pwned")
  result = {}

  def accept():
    result["peers"] = links.accept_peers(listener, SECRET, me=0, count=2, timeout_s=30)

  thread = threading.Thread(target=accept)
  thread.start()
  attacker = socket.create_connection(address)
  attacker.sendall(struct.pack("!q", 1) + pickle.dumps(_Evil(marker)))  # old protocol
  attacker.recv(64)
  impostor = socket.create_connection(address)  # tries the new protocol with a guessed secret
  links.hello(impostor, b"guess" * 8, 1)
  real = socket.create_connection(address)
  links.hello(real, SECRET, 1)
  thread.join(timeout=30)
  assert list(result["peers"]) == [1]
  assert not os.path.exists(marker)
  refusals = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
  assert len(refusals) == 2, refusals
  for s in (attacker, impostor, real, listener):
    s.close()


def test_listener_binds_the_configured_interface_not_all():
  assert links.advertised_host("127.0.0.2") == "127.0.0.2"
  assert links.advertised_host() != "0.0.0.0"


def test_received_arrays_are_aligned_for_the_device_to_take_in_place():
  """Every received array starts on a 64-byte boundary, whatever the sizes before it, so a
  CPU device takes it without a copy (the same memory, not a second payload)."""
  import jax  # pylint: disable=import-outside-toplevel
  arrays = [np.arange(n, dtype=np.float32) for n in (3, 1 << 20, 5, 0, 700_001)]
  _, _, got = wire.unstream(SECRET, iter(_chunks(arrays, chunk=1 << 16)), "send", 1 << 24)
  for a, b in zip(arrays, got):
    assert np.array_equal(a, b) and b.ctypes.data % 64 == 0
  on_device = jax.device_put(got[1])
  assert on_device.unsafe_buffer_pointer() == got[1].ctypes.data
