"""The channel's bulk path (fedjax_lm/decoupled/bulk.py): the same calls as gRPC with the same
result, and the red-team list re-run against it: replay, strangers and bad hellos refused
before a payload byte is read, silent and excess connections closed, oversize frames
refused, the listener on the configured interface, mutual TLS. Each refusal leaves the
syncer's global state as it was."""

import itertools
import json
import socket
import struct
import threading
import time

import grpc
import jax
import numpy as np
import pytest

import golden
from conftest import tiny_config
from fedjax_lm import wire
from fedjax_lm.decoupled import bulk
from fedjax_lm.decoupled import channel
from fedjax_lm.decoupled import pki
from fedjax_lm.decoupled import syncer as syncer_lib

SECRET = b"u" * 32
_COUNTER = itertools.count(1)
_FRAME = struct.Struct("!I")


def _keys(who):
  return wire.derive(SECRET, who) if who.startswith("island/") else None


def _echo(calls):
  def fn(who, meta, arrays):
    calls.append(who)
    return "echo", {"x": meta.get("x")}, [a * 2 for a in arrays]
  return {"Echo": channel.Method(fn, ("echo",), lambda who: 1 << 26)}


def _client(port, who="island/0", tls=None, bulk_min_bytes=0, **kw):
  return channel.Client(f"127.0.0.1:{port}", wire.derive(SECRET, who), who, "job",
                        tls=tls, bulk_min_bytes=bulk_min_bytes, **kw)


def test_a_call_over_the_bulk_path_is_the_grpc_call():
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls))
  try:
    arrays = [np.arange(3_000_001, dtype=np.float32), np.ones((0, 3), np.int32),
              np.arange(7, dtype=np.uint16)]
    got = {}
    for name, threshold in (("bulk", 0), ("grpc", -1)):
      c = _client(port, bulk_min_bytes=threshold)
      c.call("Echo", "echo", {"x": 0}, reply="echo", reply_limit=1 << 26)  # (bulk: its port)
      sent, received = c.sent_bytes, c.received_bytes
      kind, meta, out = c.call("Echo", "echo", {"x": name}, arrays, reply="echo",
                               reply_limit=1 << 26)
      got[name] = (kind, meta, out, c.sent_bytes - sent, c.received_bytes - received)
      assert (c._bulk_port or 0) == (server.bulk.port if threshold == 0 else 0)  # pylint: disable=protected-access
      c.close()
    for name in got:
      kind, meta, out, _, _ = got[name]
      assert kind == "echo" and meta == {"x": name}
      for a, b in zip(arrays, out):
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(b, a * 2)
    assert got["bulk"][3] == got["grpc"][3] and got["bulk"][4] == got["grpc"][4]
    assert calls == ["island/0"] * 4
  finally:
    server.stop(grace=0)


def test_a_fixed_bulk_port_is_used_and_a_taken_one_named():
  """launch.bulk_port_offset: the bulk listener on the gRPC port + the offset (a firewall's
  fixed port), told and used like a free one; a taken port is one clear error."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    grpc_port = probe.getsockname()[1]
  fixed = syncer_lib.bulk_port(grpc_port, 7)
  assert fixed == grpc_port + 7 and syncer_lib.bulk_port(0, 7) == 0
  assert syncer_lib.bulk_port(grpc_port, 0) == 0
  with pytest.raises(ValueError, match="launch.bulk_port_offset=70000"):
    syncer_lib.bulk_port(grpc_port, 70000)
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", grpc_port, _echo(calls),
                               bulk_port=fixed)
  try:
    assert port == grpc_port and server.bulk.port == fixed
    c = _client(port)
    kind, _, out = c.call("Echo", "echo", {}, [np.arange(5, dtype=np.float32)], reply="echo",
                          reply_limit=1 << 26)
    assert kind == "echo" and np.array_equal(out[0], np.arange(5) * 2)
    assert c._bulk_port == fixed  # pylint: disable=protected-access
    c.close()
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{fixed} \\(the bulk path\\)"):
      channel.serve(_keys, "job", "127.0.0.1", 0, _echo([]), bulk_port=fixed)
  finally:
    server.stop(grace=0)


def test_the_bulk_listener_is_on_the_configured_interface_only():
  server, _ = channel.serve(_keys, "job", "127.0.0.1", 0, _echo([]))
  try:
    assert server.bulk._sock.getsockname()[0] == "127.0.0.1"  # pylint: disable=protected-access
  finally:
    server.stop(grace=0)


@pytest.fixture
def served(tmp_path, data_dir):
  """A syncer for the tiny DiLoCo config (2 islands, both joined), served on loopback."""
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled"})
  syncer = syncer_lib.Syncer(config, str(tmp_path), SECRET)
  for k in (0, 1):
    syncer.methods()["Join"].fn(f"island/{k}", {"island": k, "counter": next(_COUNTER),
                                                "fingerprint": syncer.fingerprint}, [])
  server, port = channel.serve(syncer.keys, syncer.job, "127.0.0.1", 0, syncer.methods())
  yield syncer, server
  server.stop(grace=0)
  syncer.close()


def _payload(syncer, seed=0):
  layout = jax.tree.leaves(syncer._sent[0])  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  out = [(0.01 * rng.normal(size=a.shape)).astype(a.dtype) for a in layout[:-1]]
  return out + [np.ones(layout[-1].shape, layout[-1].dtype)]


def _global(syncer):
  return [np.array(x) for x in jax.tree.leaves(syncer.server)]


def _send_messages(syncer, who, meta, arrays):
  key = wire.derive(SECRET, who)
  full = f"/{channel.SERVICE}/Send"
  value, nonce = channel.token(key, full, who)
  messages = list(wire.stream(key, "send", {**meta, "nonce": nonce, "job": syncer.job,
                                            "counter": next(_COUNTER)}, arrays))
  return full, value, messages


def _bulk_call(port, full, value, messages, timeout=20):
  return list(bulk.call("127.0.0.1", port, None, full, value, iter(messages), timeout))


def test_a_captured_bulk_send_replayed_is_refused_and_counts_once(served):
  syncer, server = served
  step = syncer._next_send(0)  # pylint: disable=protected-access
  full, value, messages = _send_messages(syncer, "island/0", {
      "island": 0, "fragment": 0, "step": step}, _payload(syncer))
  assert _bulk_call(server.bulk.port, full, value, messages)  # the honest call
  assert set(syncer.rounds[0][step].senders) == {0}
  before = _global(syncer)
  for _ in range(3):  # replayed on the bulk path, then on gRPC: one nonce cache for both
    with pytest.raises(bulk.Failed) as e:
      _bulk_call(server.bulk.port, full, value, messages)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in e.value.details()
  with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
    with pytest.raises(grpc.RpcError, match="replayed"):
      list(ch.stream_stream(full)(iter(messages), timeout=20,
                                  metadata=[("fedjax-auth", value)]))
  assert syncer.rounds[0][step].count == 1
  for a, b in zip(before, _global(syncer)):
    np.testing.assert_array_equal(a, b)


def _raw_connect(port):
  s = socket.create_connection(("127.0.0.1", port), timeout=10)
  s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  return s


def _status(sock):
  n = _FRAME.unpack(_recv_exact(sock, 4))[0]
  return json.loads(_recv_exact(sock, n))


def _recv_exact(sock, n):
  out = b""
  while len(out) < n:
    got = sock.recv(n - len(out))
    if not got:
      raise ConnectionError("closed")
    out += got
  return out


@pytest.mark.parametrize("hello,code", [
    (b"island/0:1:2:3", "INVALID_ARGUMENT"),                         # not JSON
    (b"[" * 3000 + b"]" * 3000, "INVALID_ARGUMENT"),                 # deep JSON, at the limit
    (json.dumps({"method": 1, "token": "x"}).encode(), "INVALID_ARGUMENT"),
    (json.dumps({"method": "/fedjax_lm.Syncer/Nope", "token": "x"}).encode(),
     "INVALID_ARGUMENT"),
    (json.dumps({"method": "/fedjax_lm.Syncer/Send", "token": "island/0:1:2:3"}).encode(),
     "UNAUTHENTICATED"),                                             # a forged token
    (json.dumps({"method": "/fedjax_lm.Syncer/Send",
                 "token": "stranger:1:2:3"}).encode(), "UNAUTHENTICATED"),
])
def test_bad_hellos_are_one_refusal_before_any_payload_byte_is_read(served, hello, code,
                                                                    caplog):
  """Each bad hello is answered with its status and the connection closed; the 2 GiB frame
  the caller declared after it is never read (the server's memory does not move)."""
  syncer, server = served
  before = _global(syncer)
  with _raw_connect(server.bulk.port) as s:
    s.sendall(_FRAME.pack(len(hello)) + hello + _FRAME.pack(2 << 30) + b"\0" * 4096)
    assert _status(s)["code"] == code
  assert not any(r.exc_info for r in caplog.records)  # one line each, never a traceback
  for a, b in zip(before, _global(syncer)):
    np.testing.assert_array_equal(a, b)


def test_an_oversize_hello_or_frame_is_refused(served):
  syncer, server = served
  with _raw_connect(server.bulk.port) as s:  # a hello past HELLO_BYTES
    s.sendall(_FRAME.pack(bulk.HELLO_BYTES + 1) + b"{" * 64)
    assert _status(s)["code"] == "INVALID_ARGUMENT"
  # an admitted call whose first frame is past the message limit
  full, value, _ = _send_messages(syncer, "island/0", {}, [])
  with _raw_connect(server.bulk.port) as s:
    hello = json.dumps({"method": full, "token": value}).encode()
    s.sendall(_FRAME.pack(len(hello)) + hello)
    assert _status(s) == {"code": "OK", "details": "admitted"}
    s.sendall(_FRAME.pack(channel._MESSAGE_BYTES + 1))  # pylint: disable=protected-access
    status = _status(s)
    assert status["code"] == "INVALID_ARGUMENT" and "frame" in status["details"]
  assert not any(syncer.rounds.values())


def test_silent_and_excess_connections_cannot_starve_honest_calls(monkeypatch):
  """Connections that never say hello are closed at HELLO_DEADLINE_S; past the listener's
  ``threads`` connections, more are closed at once; an honest call goes through once the
  silent ones are gone."""
  monkeypatch.setattr(bulk, "HELLO_DEADLINE_S", 1.0)
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls), threads=3)
  try:
    silent = [_raw_connect(server.bulk.port) for _ in range(3)]
    time.sleep(0.3)
    extra = _raw_connect(server.bulk.port)
    extra.settimeout(5)
    assert extra.recv(1) == b""  # closed at once: every slot held
    for s in silent:
      s.settimeout(30)
      assert s.recv(1) == b""  # closed at the hello deadline (not left open)
    c = _client(port, give_up_s=10)
    assert c.call("Echo", "echo", {"x": 1}, [np.ones(8, np.float32)], reply="echo")[1] == {
        "x": 1}
    assert calls == ["island/0"]
    c.close()
    for s in [*silent, extra]:
      s.close()
  finally:
    server.stop(grace=0)


@pytest.mark.parametrize("over_tls", [False, True])
def test_a_hello_dripped_a_byte_at_a_time_is_cut_at_the_deadline(monkeypatch, tmp_path,
                                                                 over_tls):
  """The hello deadline is the whole hello's, not each read's (after a TLS handshake too)."""
  monkeypatch.setattr(bulk, "HELLO_DEADLINE_S", 1.0)
  tls = None
  if over_tls:
    made = pki.make(str(tmp_path / "job"), [], islands=1)
    read = lambda *paths: channel.Tls(*(open(p, "rb").read() for p in paths))
    ca = str(tmp_path / "job" / "ca.pem")
    tls = (read(ca, *made["syncer"]), read(ca, *made["island0"]))
  server, _ = channel.serve(_keys, "job", "127.0.0.1", 0, _echo([]),
                            tls=tls[0] if tls else None)
  try:
    hello = json.dumps({"method": "/fedjax_lm.Syncer/Echo", "token": "x" * 200}).encode()
    data = _FRAME.pack(len(hello)) + hello
    raw = _raw_connect(server.bulk.port)
    if tls:
      raw = bulk._client_context(tls[1]).wrap_socket(raw, server_hostname="127.0.0.1")  # pylint: disable=protected-access
    with raw as s:
      began, sent = time.time(), 0
      with pytest.raises(OSError):
        for i in range(len(data)):
          s.sendall(data[i:i + 1])
          sent += 1
          time.sleep(0.2)
      # cut long before the ~50 s the whole hello takes at this pace
      assert sent < len(data) and time.time() - began < 30
  finally:
    server.stop(grace=0)


def test_a_stream_cut_short_applies_nothing(served):
  """A bulk Send whose connection closes half-way: refused, the round holds nothing of it."""
  syncer, server = served
  step = syncer._next_send(0)  # pylint: disable=protected-access
  full, value, messages = _send_messages(syncer, "island/0", {
      "island": 0, "fragment": 0, "step": step}, _payload(syncer))
  before = _global(syncer)
  with _raw_connect(server.bulk.port) as s:
    hello = json.dumps({"method": full, "token": value}).encode()
    s.sendall(_FRAME.pack(len(hello)) + hello)
    assert _status(s)["code"] == "OK"  # admitted
    for m in messages[:max(1, len(messages) // 2)]:
      s.sendall(_FRAME.pack(len(m)) + m)
  time.sleep(1.0)
  assert not syncer.rounds[0] or step not in syncer.rounds[0]
  for a, b in zip(before, _global(syncer)):
    np.testing.assert_array_equal(a, b)


def test_the_bulk_path_over_mutual_tls_admits_the_job_s_certificates_only(tmp_path):
  made = pki.make(str(tmp_path / "job"), [], islands=1)
  read = lambda *paths: channel.Tls(*(open(p, "rb").read() for p in paths))
  ca = str(tmp_path / "job" / "ca.pem")
  server_tls, client_tls = read(ca, *made["syncer"]), read(ca, *made["island0"])
  other = pki.make(str(tmp_path / "rogue"), [], islands=1)
  rogue = read(str(tmp_path / "rogue" / "ca.pem"), *other["island0"])
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls), tls=server_tls)
  try:
    ok = _client(port, tls=client_tls, give_up_s=10)
    x = np.arange(1 << 20, dtype=np.float32)
    kind, _, out = ok.call("Echo", "echo", {"x": "tls"}, [x], reply="echo",
                           reply_limit=1 << 26)
    assert kind == "echo" and np.array_equal(out[0], 2 * x)
    assert ok._bulk_port == server.bulk.port  # pylint: disable=protected-access
    # a certificate of another CA, or none: the bulk handshake fails, the method never runs
    for tls in (client_tls._replace(cert=rogue.cert, key=rogue.key), None):
      with pytest.raises(bulk.Failed):
        list(bulk.call("127.0.0.1", server.bulk.port, tls, "/fedjax_lm.Syncer/Echo",
                       "island/0:1:2:3", iter([]), 5))
    assert calls == ["island/0"]
    ok.close()
  finally:
    server.stop(grace=0)


def test_a_restarted_server_s_new_bulk_port_is_asked_again():
  """The syncer restarts (same gRPC port, a new ephemeral bulk port): the client's cached bulk
  port fails, it asks again and the call goes through."""
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls))
  c = _client(port, give_up_s=20)
  x = [np.ones(1 << 10, np.float32)]
  try:
    c.call("Echo", "echo", {"x": 1}, x, reply="echo")
    first = c._bulk_port  # pylint: disable=protected-access
    server.stop(grace=0)
    server, _ = channel.serve(_keys, "job", "127.0.0.1", port, _echo(calls))
    assert server.bulk.port != first
    assert c.call("Echo", "echo", {"x": 2}, x, reply="echo")[1] == {"x": 2}
    assert c._bulk_port == server.bulk.port and calls == ["island/0"] * 2  # pylint: disable=protected-access
  finally:
    c.close()
    server.stop(grace=0)


def test_an_unreachable_bulk_port_falls_back_to_grpc_with_one_warning(caplog):
  """Only the gRPC port open (a firewall): the bulk connection is refused BULK_TRIES times,
  then the client says so once and sends over gRPC; the call is served."""
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls))
  closed = socket.socket()
  closed.bind(("127.0.0.1", 0))
  dead = closed.getsockname()[1]  # bound, not listening: connections refused
  server.bulk.port = dead  # what the Bulk method tells
  try:
    c = _client(port, give_up_s=20)
    x = np.arange(1 << 12, dtype=np.float32)
    kind, _, out = c.call("Echo", "echo", {"x": 3}, [x], reply="echo")
    assert kind == "echo" and np.array_equal(out[0], 2 * x) and calls == ["island/0"]
    assert c._bulk_port == 0  # pylint: disable=protected-access
    assert sum("cannot be reached" in r.getMessage() for r in caplog.records) == 1
    c.close()
  finally:
    closed.close()
    server.stop(grace=0)


def test_the_job_ca_helper_writes_private_keys_and_names_the_hosts(tmp_path, capsys):
  """``python -m fedjax_lm.decoupled.pki DIR --hosts ...``: the CA and one certificate per role,
  signed by it, the syncer's valid for loopback and every host given, each key readable by its
  owner only; an unwritable directory is one error line and exit 1."""
  from cryptography import x509  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives import hashes  # pylint: disable=import-outside-toplevel
  assert pki.main([str(tmp_path / "job"), "--hosts", "10.0.0.5,syncer.example.org",
                   "--islands", "2"]) == 0
  ca = x509.load_pem_x509_certificate((tmp_path / "job" / "ca.pem").read_bytes())
  for role in ("syncer", "island0", "island1"):
    cert = x509.load_pem_x509_certificate((tmp_path / "job" / f"{role}.pem").read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                           ec.ECDSA(hashes.SHA256()))
    assert (tmp_path / "job" / f"{role}.key").stat().st_mode & 0o077 == 0
  assert (tmp_path / "job" / "ca.key").stat().st_mode & 0o077 == 0
  syncer = x509.load_pem_x509_certificate((tmp_path / "job" / "syncer.pem").read_bytes())
  names = syncer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
  assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1",
                                                                            "10.0.0.5"}
  assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "syncer.example.org"}
  (tmp_path / "file").write_text("")
  assert pki.main([str(tmp_path / "file" / "job")]) == 1
  assert "error: cannot make the job's certificates" in capsys.readouterr().err


def test_stopping_the_server_lets_a_bulk_reply_in_flight_finish():
  """A syncer shard exits once the lead fetched its final fragments, which it records before
  the reply is streamed: stop(grace) returns once the bulk path's calls in flight have ended,
  so the process does not exit under the reply; with no grace it returns at once."""
  started = threading.Event()

  def slow(who, meta, arrays):
    started.set()
    time.sleep(1.0)
    return "echo", {}, [np.arange(3_000_000, dtype=np.float32)]
  for grace, in_flight_after_stop in ((10.0, 0), (0.0, 1)):
    server, port = channel.serve(_keys, "job", "127.0.0.1", 0,
                                 {"Echo": channel.Method(slow, ("echo",), lambda who: 1 << 26)})
    c = _client(port, give_up_s=3)
    c.call("Echo", "echo", {}, reply="echo", reply_limit=1 << 26)  # (its bulk port asked)
    started.clear()
    got = []
    t = threading.Thread(target=lambda: got.append(
        c.call("Echo", "echo", {}, reply="echo", reply_limit=1 << 26)[2]))
    t.start()
    assert started.wait(10)
    server.stop(grace=grace)
    assert server.bulk._active == in_flight_after_stop  # pylint: disable=protected-access
    t.join(30)
    c.close()
    assert np.array_equal(got[0][0], np.arange(3_000_000))
