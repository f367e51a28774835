"""The decoupled channel against a hostile network and a hostile member (issue 44's red-team
list, kept as regression checks): replays, forged identities, work before authentication, and
an island that holds its key but sends poison. Each is refused, logged, and leaves the
syncer's global state untouched; the honest islands' contributions still count."""

import itertools
import threading
import time

import grpc
import jax
import numpy as np
import pytest

import golden
from conftest import tiny_config
from fedjax_lm import wire
from fedjax_lm.decoupled import channel
from fedjax_lm.decoupled import syncer as syncer_lib

SECRET = b"r" * 32
_COUNTER = itertools.count(1)


@pytest.fixture
def served(tmp_path, data_dir):
  """A syncer for the tiny DiLoCo config (2 islands, both joined), served on loopback."""
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled"})
  syncer = syncer_lib.Syncer(config, str(tmp_path), SECRET)
  for k in (0, 1):
    _direct(syncer, "Join", k, {"fingerprint": syncer.fingerprint})
  server, port = channel.serve(syncer.keys, syncer.job, "127.0.0.1", 0, syncer.methods())
  yield syncer, f"127.0.0.1:{port}"
  server.stop(grace=0)
  syncer.close()


def _direct(syncer, method, island, meta, arrays=()):
  """A method as the channel calls it once the caller proved it is ``island``."""
  return syncer.methods()[method].fn(f"island/{island}", {
      "island": island, "counter": next(_COUNTER), **meta}, list(arrays))


def _payload(syncer, scale=0.01, seed=0, weight=1.0):
  layout = jax.tree.leaves(syncer._sent[0])  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  out = [(scale * rng.normal(size=a.shape)).astype(a.dtype) for a in layout[:-1]]
  return out + [np.full(layout[-1].shape, weight, layout[-1].dtype)]


def _global(syncer):
  return [np.array(x) for x in jax.tree.leaves(syncer.server)]


def _unchanged(before, syncer):
  for a, b in zip(before, _global(syncer)):
    np.testing.assert_array_equal(a, b)


def _raw(address, key, who, job, meta, arrays=(), method="Send", kind="send", stamp=None):
  """One hand-made call: (token, messages), for replay and forgery."""
  full = f"/{channel.SERVICE}/{method}"
  value, nonce = channel.token(key, full, who)
  if stamp is not None:  # a token dated ``stamp`` (signed with the key: only its age is off)
    import hashlib, hmac  # pylint: disable=g-import-not-at-top,multiple-imports
    n = value.split(":")[2]
    mac = hmac.new(key, f"{full}|{who}|{stamp:.3f}|{n}".encode(), hashlib.sha256).hexdigest()
    value = f"{who}:{stamp:.3f}:{n}:{mac}"
  messages = list(wire.stream(key, kind, {**meta, "nonce": nonce, "job": job,
                                          "counter": next(_COUNTER)}, arrays))
  return value, messages


def _invoke(address, method, value, messages):
  with grpc.insecure_channel(address) as ch:
    stub = ch.stream_stream(f"/{channel.SERVICE}/{method}")
    return list(stub(iter(messages), timeout=20, metadata=[("fedjax-auth", value)]))


def test_a_captured_send_replayed_is_refused_and_counts_once(served, caplog):
  """The red team replayed a captured Send 4 times after its round closed (no secret
  needed): now the nonce cache refuses the token, and a re-signed copy (a member replaying
  itself) breaks the counter and the one-contribution rule."""
  syncer, address = served
  key = wire.derive(SECRET, "island/0")
  step = syncer._next_send(0)  # pylint: disable=protected-access
  value, messages = _raw(address, key, "island/0", syncer.job,
                         {"island": 0, "fragment": 0, "step": step}, _payload(syncer))
  assert _invoke(address, "Send", value, messages)  # the honest call
  assert set(syncer.rounds[0][step].senders) == {0}
  before = _global(syncer)
  for _ in range(4):
    with pytest.raises(grpc.RpcError) as e:
      _invoke(address, "Send", value, messages)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in e.value.details()
  # the same body under a fresh token of the same member: the head names the old nonce
  fresh, _ = channel.token(key, f"/{channel.SERVICE}/Send", "island/0")
  with pytest.raises(grpc.RpcError, match="another call"):
    _invoke(address, "Send", fresh, messages)
  # island 0 re-sends the round in a new, valid call: counted once
  _direct(syncer, "Send", 0, {"fragment": 0, "step": step}, _payload(syncer, seed=9))
  assert syncer.rounds[0][step].count == 1
  assert any(e["event"] == "duplicate_send" for e in syncer.events)
  _unchanged(before, syncer)


def test_tokens_from_the_future_the_past_or_a_stranger_are_refused(served):
  syncer, address = served
  key = wire.derive(SECRET, "island/0")
  for stamp, match in ((time.time() + 299, "old"), (time.time() - 120, "old")):
    value, messages = _raw(address, key, "island/0", syncer.job, {"island": 0},
                           method="Heartbeat", kind="heartbeat", stamp=stamp)
    with pytest.raises(grpc.RpcError, match=match):
      _invoke(address, "Heartbeat", value, messages)
  for who in ("island/7", "island/-1", "island/1000000", "island/01", "syncer"):
    value, messages = _raw(address, wire.derive(SECRET, who), who, syncer.job, {},
                           method="Heartbeat", kind="heartbeat")
    with pytest.raises(grpc.RpcError, match="not a member"):
      _invoke(address, "Heartbeat", value, messages)
  value, messages = _raw(address, b"x" * 64, "island/0", syncer.job, {"island": 0},
                         method="Heartbeat", kind="heartbeat")
  with pytest.raises(grpc.RpcError, match="bad fedjax-auth token"):
    _invoke(address, "Heartbeat", value, messages)
  assert sorted(syncer.members) == [0, 1]


def test_a_member_cannot_sign_as_another_or_for_another_job(served):
  syncer, address = served
  key = wire.derive(SECRET, "island/0")
  step = syncer._next_send(0)  # pylint: disable=protected-access
  before = _global(syncer)
  value, messages = _raw(address, key, "island/0", syncer.job,
                         {"island": 1, "fragment": 0, "step": step}, _payload(syncer))
  with pytest.raises(grpc.RpcError, match="island 0 signs as island 1"):
    _invoke(address, "Send", value, messages)
  value, messages = _raw(address, key, "island/0", "another-job",
                         {"island": 0, "fragment": 0, "step": step}, _payload(syncer))
  with pytest.raises(grpc.RpcError, match="another job"):
    _invoke(address, "Send", value, messages)
  assert not syncer.rounds[0]
  _unchanged(before, syncer)


def test_work_before_authentication_is_bounded(served, caplog):
  """An oversized unauthenticated message is refused by the transport (one message is at most
  a chunk), a stream head may not declare more than the method's limit, and refusals flood
  the log at most a few lines per window."""
  syncer, address = served
  big = b"\0" * (channel._MESSAGE_BYTES + 1)  # pylint: disable=protected-access
  with pytest.raises(grpc.RpcError) as e:
    _invoke(address, "Send", "island/0:0:0:0", [big])
  assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.UNAUTHENTICATED)
  key = wire.derive(SECRET, "island/0")
  huge = [np.zeros(1, np.float32)]
  value, messages = _raw(address, key, "island/0", syncer.job, {"island": 0}, huge,
                         method="Heartbeat", kind="heartbeat")
  # the head declares 2^40 floats: refused before a buffer is allocated
  forged = list(wire.stream(key, "heartbeat", {"island": 0, "nonce": value.split(":")[2],
                                               "job": syncer.job}, ()))
  head = wire.pack(key, "heartbeat", {"island": 0, "nonce": value.split(":")[2],
                                      "job": syncer.job, "stream": {
                                          "arrays": [{"dtype": "float32", "shape": [1 << 40]}],
                                          "chunk": 1 << 20}})
  del forged, messages
  with pytest.raises(grpc.RpcError, match="limit"):
    _invoke(address, "Heartbeat", value, [head])
  caplog.clear()
  for _ in range(40):
    with pytest.raises(grpc.RpcError):
      _invoke(address, "Heartbeat", "island/0:1:2:3", [b"x"])
  refused = [r for r in caplog.records if "refused" in r.getMessage()]
  assert 0 < len(refused) <= 6


def test_stalled_streams_cannot_starve_honest_calls(served, monkeypatch):
  """20 calls that open a stream and never finish it (the red team's slow sender): a member
  holds at most PER_MEMBER_CALLS handlers, each is cancelled at its deadline, and an honest
  island's heartbeats are answered meanwhile."""
  syncer, address = served
  monkeypatch.setattr(channel, "BASE_DEADLINE_S", 2.0)
  key = wire.derive(SECRET, "island/1")
  release, results = threading.Event(), []

  def stall():
    value, messages = _raw(address, key, "island/1", syncer.job,
                           {"island": 1, "fragment": 0, "step": syncer._next_send(0)},  # pylint: disable=protected-access
                           _payload(syncer))

    def slowly():
      yield messages[0]
      release.wait(30)
      yield from messages[1:]
    try:
      _invoke(address, "Send", value, slowly())
      results.append("served")
    except grpc.RpcError as e:
      results.append(e.code())
  threads = [threading.Thread(target=stall, daemon=True) for _ in range(20)]
  for t in threads:
    t.start()
  time.sleep(0.5)
  honest = channel.Client(address, wire.derive(SECRET, "island/0"), "island/0", syncer.job,
                          give_up_s=5)
  for _ in range(3):
    assert honest.call("Heartbeat", "heartbeat", {"island": 0}, deadline=5)[0] == "ok"
  for t in threads:
    t.join(20)
  release.set()
  assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 20 - channel.PER_MEMBER_CALLS
  assert results.count(grpc.StatusCode.CANCELLED) <= channel.PER_MEMBER_CALLS
  assert "served" not in results and not syncer.rounds[0]
  honest.close()


def test_an_insider_s_poison_is_refused_and_the_honest_contribution_counts(served):
  """Island 1 holds its key and sends 1e30 values, then a NaN (the red team's silent veto):
  each is logged and left out of the sum, island 0's contribution counts, the round closes
  with it alone, and the global params stay finite and near their start."""
  syncer, _ = served
  every = syncer.schedule.every
  for r in (1, 2):  # two honest rounds: the norm gate's history
    for k in (0, 1):
      _direct(syncer, "Send", k, {"fragment": 0, "step": r * every}, _payload(syncer, seed=k))
    assert syncer.closed[0] == r * every
  for r, poison in ((3, 1e30), (4, np.nan)):
    _direct(syncer, "Send", 0, {"fragment": 0, "step": r * every}, _payload(syncer, seed=3))
    bad = _payload(syncer, seed=4)
    bad[0] = np.full_like(bad[0], poison)
    _, reply, _ = _direct(syncer, "Send", 1, {"fragment": 0, "step": r * every}, bad)
    assert "refused" in reply
    assert syncer.closed[0] == r * every  # the round closed, with island 0's payload
    closed = syncer.after_round[0][r * every]
    assert float(closed.arrays[-2]) == 1.0  # count: island 0 alone
  assert [e["island"] for e in syncer.events if e["event"] == "payload_refused"] == [1, 1]
  for x in jax.tree.leaves(syncer.server.params):
    assert np.all(np.isfinite(np.asarray(x))) and np.max(np.abs(np.asarray(x))) < 100


@pytest.mark.parametrize("meta,match", [
    ({"fragment": 0, "step": 1}, "schedule"),  # a round off the send schedule
    ({"fragment": 0, "step": 0}, "step"),
    ({"fragment": 0, "step": 10 ** 9}, "step"),
    ({"fragment": 5, "step": 4}, "fragment"),
    ({"fragment": 0, "step": "4"}, "step"),
    ({"fragment": 0, "step": 4, "data": "{not json"}, "data position"),
])
def test_an_insider_s_fields_off_schedule_are_refused(served, meta, match):
  syncer, _ = served
  before = _global(syncer)
  with pytest.raises(ValueError, match=match):
    _direct(syncer, "Send", 0, meta, _payload(syncer))
  assert not syncer.rounds[0]
  _unchanged(before, syncer)


def test_an_insider_s_weight_and_counter_are_checked(served):
  syncer, _ = served
  step = syncer._next_send(0)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="weight"):
    _direct(syncer, "Send", 0, {"fragment": 0, "step": step}, _payload(syncer, weight=1e9))
  _direct(syncer, "Send", 0, {"fragment": 0, "step": step, "counter": 10 ** 15},
          _payload(syncer))
  with pytest.raises(ValueError, match="counter"):
    _direct(syncer, "Send", 0, {"fragment": 0, "step": step + syncer.schedule.every,
                                "counter": 10 ** 15}, _payload(syncer))


def test_a_syncer_off_loopback_needs_mutual_tls_or_an_explicit_opt_out():
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  base = {"launch.mode": "decoupled", "launch.role": "island", "algorithm": "islands"}
  for syncer, ok in (("127.0.0.1:5000", True), ("[::1]:5000", True), ("localhost:5000", True),
                     ("10.1.2.3:5000", False), ("syncer.example.org:5000", False)):
    c = tiny_config(**base, **{"launch.syncer": syncer})
    if ok:
      config_lib.validate(c)
    else:
      with pytest.raises(ValueError, match="mutual TLS is required there.*fedjax_lm.decoupled.pki"):
        config_lib.validate(c)
  config_lib.validate(tiny_config(**base, **{"launch.syncer": "10.1.2.3:5000",
                                             "launch.plaintext": True}))
  config_lib.validate(tiny_config(**base, **{"launch.syncer": "10.1.2.3:5000",
                                             "launch.tls_ca": "ca.pem"}))


def test_a_payload_method_s_slots_bound_its_concurrent_receives():
  """A method with ``slots=1`` receives and handles one call at a time whatever the number of
  callers (the syncer's Send: its receive buffers do not grow with the islands); the others
  wait for the slot and are all served."""
  secret = b"q" * 32
  busy, most, served = [0], [0], []
  lock = threading.Lock()

  def handle(who, meta, arrays):
    with lock:
      busy[0] += 1
      most[0] = max(most[0], busy[0])
    time.sleep(0.2)  # long enough that callers overlap without the slot
    with lock:
      busy[0] -= 1
      served.append((who, float(arrays[0].sum())))
    return "ok", {}, []
  keys = lambda who: wire.derive(secret, who) if who.startswith("island/") else None
  server, port = channel.serve(keys, "job", "127.0.0.1", 0, {
      "Send": channel.Method(handle, ("send",), lambda who: 1 << 22, slots=1)})
  try:
    def call(k):
      client = channel.Client(f"127.0.0.1:{port}", wire.derive(secret, f"island/{k}"),
                              f"island/{k}", "job", give_up_s=60)
      client.call("Send", "send", {}, [np.full(1 << 18, k, np.float32)])
      client.close()
    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    assert most[0] == 1
    assert sorted(served) == [(f"island/{k}", float(k << 18)) for k in range(4)]
  finally:
    server.stop(grace=0)
