"""Decoupled islands (fedjax_lm/decoupled/): independent island jobs and a syncer over an
authenticated gRPC channel; equivalence with the mesh-axis mode, an island crash and rejoin,
and bad peers refused without touching the global state."""

import copy
import glob
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import golden
from conftest import run_cli, tiny_config
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import model as model_lib
from fedjax_lm import train
from fedjax_lm import wire
from fedjax_lm.decoupled import channel
from fedjax_lm.decoupled import pki
from fedjax_lm.decoupled import syncer as syncer_lib

SECRET = b"k" * 32


def _decoupled(workdir, data_dir, run, *extra, env=None):
  cfg = golden.overrides(run, data_dir)
  cfg.update({"launch.mode": "decoupled", "launch.processes": 1, "mesh.island": 1})
  args = ["--config", "configs/tiny.py", "--workdir", str(workdir),
          *(f"--config.{k}={v}" for k, v in cfg.items()), *extra]
  return run_cli(args, env=env, timeout=900)


def _island_losses(workdir, k):
  """The last logged loss of every step of island k (a restarted island logs again)."""
  by_step = {}
  for r in metrics_lib.read_jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl")):
    by_step[r["step"]] = r["island_loss"]
  return [by_step[s] for s in sorted(by_step)]


def _no_orphans(workdir):
  roles = json.load(open(os.path.join(workdir, "roles.json")))
  for role in roles.values():
    assert subprocess.run(["kill", "-0", str(role["pid"])], capture_output=True).returncode
  return roles


@pytest.mark.slow
@pytest.mark.parametrize("run", ["diloco", "streaming_int4_ef", "delayed_naive",
                                 "dropout_keep"])
def test_decoupled_sync_with_every_island_is_the_mesh_axis_run(tmp_path, data_dir, run):
  """Island jobs + a syncer, policy sync: the per-step losses of each island, the evals and
  island_bytes are those of the mesh-axis run (tests/golden); with ``outer.delay=naive`` too
  (each island restarts from the previous round's global), and with scheduled drop-out (3
  islands, one absent from each of three rounds: it sends weight 0 and keeps its params)."""
  result = _decoupled(tmp_path, data_dir, run)
  assert result.returncode == 0, result.stderr[-3000:]
  want = json.load(open(golden.golden_file()[0]))[run]
  for k in range(len(want["island_loss"][0])):
    np.testing.assert_allclose(_island_losses(tmp_path, k),
                               [row[k] for row in want["island_loss"]], rtol=1e-5)
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  np.testing.assert_allclose([r["eval_loss"] for r in evals], want["eval_loss"], rtol=1e-5)
  assert evals[-1]["island_bytes"] == want["island_bytes"]
  _no_orphans(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["eager", "delayed_eager"])
def test_decoupled_eager_variants_are_the_mesh_axis_run_over_40_steps(tmp_path, data_dir, run):
  """The variants the decoupled island used to refuse run through the one island loop: ours
  eager (P=2, tau=1, alpha=0.5) and Kale et al.'s ``outer.delay=eager``, 40 steps (10 rounds)
  as 2 island jobs + a syncer, equal to the mesh-axis run of the same config (islands
  simulated in this process) per island and step, and at every eval (rtol 1e-5)."""
  steps = {"total_steps": 40, "eval_every": 20}
  config = tiny_config(**{**golden.overrides(run, data_dir), **steps})
  train.train(config, str(tmp_path / "mesh"), devices=jax.devices()[:1])
  mesh = metrics_lib.read_jsonl(str(tmp_path / "mesh" / "metrics.jsonl"))
  result = _decoupled(tmp_path / "decoupled", data_dir, run,
                      *(f"--config.{k}={v}" for k, v in steps.items()))
  assert result.returncode == 0, result.stderr[-3000:]
  for k in range(2):
    np.testing.assert_allclose(_island_losses(tmp_path / "decoupled", k),
                               [r["island_loss"][k] for r in mesh], rtol=1e-5)
  evals = metrics_lib.read_jsonl(str(tmp_path / "decoupled" / "metrics.jsonl"))
  np.testing.assert_allclose([r["eval_loss"] for r in evals],
                             [r["eval_loss"] for r in mesh if "eval_loss" in r], rtol=1e-5)
  assert [r["step"] for r in evals] == [20, 40]


@pytest.mark.slow
def test_island_crash_is_survived_and_the_island_rejoins(tmp_path, data_dir):
  """SIGKILL island 1 after step 10 (of 16, H=4): the syncer drops it within
  launch.heartbeat_seconds of the kill, island 0 keeps going, the launcher restarts island 1,
  which pulls the global params and its data position, restores its own inner optimizer
  state (saved every checkpoint_every = 4 steps) and rejoins; the run finishes and every
  process is gone."""
  result = _decoupled(tmp_path, data_dir, "diloco", "--config.launch.heartbeat_seconds=2",
                      "--config.faults.kill=island/1@10", "--config.checkpoint_every=4")
  assert result.returncode == 0, result.stderr[-3000:]
  events = [json.loads(l) for l in open(tmp_path / "events.jsonl")]
  kinds = [(e["event"], e.get("island")) for e in events]
  assert ("island_left", 1) in kinds and ("island_rejoined", 1) in kinds, kinds
  killed_at = os.path.getmtime(glob.glob(str(tmp_path / ".faults" / "**" / "*@*"),
                                         recursive=True)[0])
  left_at = next(e["time"] for e in events if e["event"] == "island_left")
  assert 0 < left_at - killed_at <= 2 + 1.0, left_at - killed_at  # heartbeat_seconds + a tick
  log = open(tmp_path / "logs" / "island_1.log", encoding="utf-8").read()
  assert re.search(r"inner optimizer state restored from its step (4|8)\b", log), log
  assert "island_1 exited with -9: restarting it" in result.stderr
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert evals[-1]["step"] == 16 and np.isfinite(evals[-1]["eval_loss"])
  assert _island_losses(tmp_path, 0)[-1] < _island_losses(tmp_path, 0)[0]
  assert _no_orphans(tmp_path)["island_1"]["restarts"] == 1


@pytest.mark.slow
def test_an_island_slower_than_its_heartbeat_is_never_dropped(tmp_path, data_dir):
  """Liveness is not slowness: island 0 takes 3 x launch.heartbeat_seconds per inner step
  (islands.step_seconds / speed); its heartbeats go on from their own thread, so it is never
  dropped and every round closes with both islands."""
  result = _decoupled(tmp_path, data_dir, "diloco", "--config.launch.heartbeat_seconds=1",
                      "--config.islands.step_seconds=1", "--config.islands.speed=0.33,1",
                      "--config.total_steps=4", "--config.outer.sync_every=2",
                      "--config.eval_every=4")
  assert result.returncode == 0, result.stderr[-3000:]
  events = [json.loads(l) for l in open(tmp_path / "events.jsonl")]
  assert not [e for e in events if e["event"] in ("island_left", "round_closed_without")], events
  steps = [r["time"] for r in metrics_lib.read_jsonl(
      os.path.join(tmp_path, "islands", "0", "metrics.jsonl"))]
  assert min(np.diff(steps)) >= 3 * 1 - 0.1  # it really was that slow
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert evals[-1]["rounds"] == 2 and evals[-1]["members"] == [0, 1]


@pytest.mark.slow
def test_syncer_crash_is_survived_and_it_resumes_from_its_checkpoint(tmp_path, data_dir):
  """SIGKILL the syncer on the first send after 2 rounds (of 4): the islands retry, the
  launcher restarts it, it resumes from its checkpoint, the islands resend what it lost, and
  the run ends with the fault-free run's losses (nothing applied twice or lost)."""
  result = _decoupled(tmp_path, data_dir, "diloco",
                      "--config.faults.kill=syncer@2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "syncer exited with -9: restarting it" in result.stderr
  events = [json.loads(l)["event"] for l in open(tmp_path / "events.jsonl")]
  assert "syncer_restored" in events
  want = json.load(open(golden.golden_file()[0]))["diloco"]
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  np.testing.assert_allclose(evals[-1]["eval_loss"], want["eval_loss"][-1], rtol=1e-5)
  for k in range(2):
    np.testing.assert_allclose(_island_losses(tmp_path, k),
                               [row[k] for row in want["island_loss"]], rtol=1e-5)
  assert _no_orphans(tmp_path)["syncer"]["restarts"] == 1


@pytest.mark.slow
def test_islands_join_mid_run_and_no_token_is_read_twice(tmp_path, data_dir):
  """2 islands, 2 more joining once rounds closed through step 8 (of 16; islands.max_num=4
  data partitions): the joiners start at the current global params and step, every island
  reads its own partition, and no batch is read twice across the four islands."""
  result = _decoupled(tmp_path, data_dir, "diloco", "--config.islands.max_num=4",
                      "--config.launch.join=2:8,3:8", "--config.faults.record_batches=True")
  assert result.returncode == 0, result.stderr[-3000:]
  joined = {e["island"]: e["step"] for e in map(json.loads, open(tmp_path / "events.jsonl"))
            if e["event"] == "island_joined"}
  assert joined[0] == joined[1] == 0 and joined[2] >= 8 and joined[3] >= 8, joined
  digests = [r["batch"] for k in range(4)
             for r in metrics_lib.read_jsonl(os.path.join(tmp_path, "islands", str(k),
                                                          "metrics.jsonl"))]
  assert len(digests) == 2 * 16 + (16 - joined[2]) + (16 - joined[3])
  assert len(set(digests)) == len(digests)
  evals = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert evals[-1]["members"] == [0, 1, 2, 3] and np.isfinite(evals[-1]["eval_loss"])
  _no_orphans(tmp_path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir):
  """A syncer for the tiny DiLoCo config, in this process, on loopback."""
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled"})
  workdir = str(tmp_path_factory.mktemp("syncer"))
  syncer = syncer_lib.Syncer(config, workdir, SECRET)
  server, port = channel.serve(syncer.keys, syncer.job, "127.0.0.1", 0, syncer.methods())
  yield config, syncer, f"127.0.0.1:{port}"
  server.stop(grace=0)


def _client(address, syncer, secret=SECRET, who="island/0", **kw):
  return channel.Client(address, wire.derive(secret, who), who, syncer.job, give_up_s=5, **kw)


def _join(address, c, syncer, secret=SECRET):
  _, abstract = model_lib.build(model_lib.ModelConfig.from_config(c.model))
  return _client(address, syncer, secret).call(
      "Join", "join", {"island": 0, "fingerprint": syncer_lib.fingerprint(c, abstract)},
      reply="joined", reply_limit=1 << 30)


def test_client_without_the_secret_is_refused_before_its_payload_is_read(served, caplog):
  config, syncer, address = served
  with pytest.raises(wire.WireError, match="UNAUTHENTICATED|refused Join"):
    _join(address, config, syncer, secret=b"x" * 32)
  assert 0 not in syncer.members
  assert any("bad fedjax-auth token" in r.getMessage() for r in caplog.records)


def test_island_with_another_model_is_refused_naming_the_difference(served):
  config, syncer, address = served
  c = copy.deepcopy(config)
  c.model.num_layers = 3
  with pytest.raises(wire.WireError, match=r"island 0 refused: model.num_layers=3 \(syncer: 2\)"):
    _join(address, c, syncer)
  assert 0 not in syncer.members


def test_corrupt_or_truncated_payload_leaves_the_global_state_alone(served):
  config, syncer, address = served
  _join(address, config, syncer)
  before = jax.tree.map(np.asarray, syncer.server)
  client = _client(address, syncer)
  step = syncer._next_send(0)  # pylint: disable=protected-access
  wrong_shapes = [np.zeros((1, 8), np.float32)]  # not the fragment's layout
  with pytest.raises(wire.WireError, match="fragment 0"):
    client.call("Send", "send", {"island": 0, "fragment": 0, "step": step}, wrong_shapes)
  # a chunk altered in transit: the stream is refused, nothing of it applied
  layout = [np.ones(x.shape, x.dtype) for x in jax.tree.leaves(syncer._sent[0])]  # pylint: disable=protected-access
  stub = client._channel.stream_stream(f"/{channel.SERVICE}/Send")  # pylint: disable=protected-access
  value, nonce = channel.token(wire.derive(SECRET, "island/0"), f"/{channel.SERVICE}/Send",
                               "island/0")
  messages = list(wire.stream(wire.derive(SECRET, "island/0"), "send", {
      "island": 0, "fragment": 0, "step": step, "nonce": nonce, "job": syncer.job,
      "counter": 1 << 62}, layout, chunk=4096))
  messages[2] = messages[2][:-1] + bytes([messages[2][-1] ^ 1])
  with pytest.raises(Exception, match="chunk 1: bad message authentication"):
    list(stub(iter(messages), timeout=10, metadata=[("fedjax-auth", value)]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), syncer.server,
               before)
  assert not any(syncer.rounds.values())


def test_a_round_waits_for_an_island_that_has_not_come_up_until_its_join_grace(tmp_path,
                                                                               data_dir):
  """Island 1 of 2 is slow to start: island 0's send does not close the first round (it would
  run ahead alone, CI saw it); after launch.join_grace_seconds island 1 is dropped, logged, and
  the round closes with island 0; island 1 joining later is a first join at the current step."""
  config = tiny_config(**{**golden.overrides("diloco", data_dir), "launch.mode": "decoupled",
                          "launch.join_grace_seconds": 1.5})
  syncer = syncer_lib.Syncer(config, str(tmp_path), SECRET)
  _, abstract = model_lib.build(model_lib.ModelConfig.from_config(config.model))
  fingerprint = syncer_lib.fingerprint(config, abstract)
  syncer.join("island/0", {"island": 0, "fingerprint": fingerprint}, [])
  step = syncer._next_send(0)  # pylint: disable=protected-access
  payload = [np.zeros(x.shape, x.dtype) for x in jax.tree.leaves(syncer._sent[0])]  # pylint: disable=protected-access
  payload[-1] = np.ones_like(payload[-1])
  syncer.send("island/0", {"island": 0, "fragment": 0, "step": step, "counter": 1}, payload)
  syncer.tick()
  assert syncer.closed[0] == 0 and step in syncer.rounds[0]
  time.sleep(1.6)
  syncer.tick()
  assert syncer.closed[0] == step
  left = [e for e in syncer.events if e["event"] == "island_left"]
  assert [(e["island"], e["reason"]) for e in left] == [(1, "did not join within 2 s")]
  _, meta, _ = syncer.join("island/1", {"island": 1, "fingerprint": fingerprint}, [])
  assert meta["step"] == step and syncer.events[-1]["event"] == "island_joined"
  syncer.close()


def test_unreachable_syncer_is_one_clear_line_after_the_deadline(tmp_path, data_dir):
  start = time.time()
  result = run_cli(["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                    f"--config.data.data_dir={data_dir}", "--config.launch.mode=decoupled",
                    "--config.algorithm=islands", "--config.islands.num=2",
                    "--config.launch.role=island", "--config.launch.syncer=127.0.0.1:9",
                    "--config.launch.heartbeat_seconds=1"],
                   env={wire.ENV_SECRET: "s" * 32}, timeout=300)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: syncer 127.0.0.1:9 did not answer Join within"), last
  assert "Traceback" not in result.stderr and time.time() - start < 200


def _pki(root, name):
  """A throwaway CA and two certificates it signed (``server`` for 127.0.0.1, ``client``), by
  the openssl command line; returns {role: channel.Tls}."""
  root.mkdir()
  run = lambda *a: subprocess.run(["openssl", *a], cwd=root, check=True, capture_output=True)
  run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name} CA",
      "-keyout", "ca.key", "-out", "ca.pem")
  out = {}
  for role, san in (("server", "IP:127.0.0.1"), ("client", "DNS:island")):
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={role}", "-keyout",
        f"{role}.key", "-out", f"{role}.csr")
    (root / f"{role}.ext").write_text(f"subjectAltName={san}\n")
    run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", f"{role}.ext", "-out", f"{role}.pem")
    out[role] = channel.Tls(*((root / f).read_bytes()
                              for f in ("ca.pem", f"{role}.pem", f"{role}.key")))
  return out


def _keys(who):
  return wire.derive(SECRET, who) if who.startswith("island/") else None


def _echo(calls):
  return {"Echo": channel.Method(lambda who, meta, arrays: calls.append(meta["x"]) or (
      "echo", {"x": meta["x"]}, arrays), ("echo",))}


def test_mutual_tls_admits_the_job_s_certificates_only(tmp_path):
  """With launch.tls_*: a client holding a certificate of the job's CA (and the secret) is
  served; one with another CA's certificate, or none, is refused in the TLS handshake: the
  method never runs."""
  made = pki.make(str(tmp_path / "job"), [], islands=1)  # the one-command job CA
  read = lambda *paths: channel.Tls(*(open(p, "rb").read() for p in paths))
  ca = str(tmp_path / "job" / "ca.pem")
  job = {"server": read(ca, *made["syncer"]), "client": read(ca, *made["island0"])}
  rogue = _pki(tmp_path / "rogue", "rogue")
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls), tls=job["server"])
  try:
    address = f"127.0.0.1:{port}"
    ok = channel.Client(address, _keys("island/0"), "island/0", "job", give_up_s=5,
                        tls=job["client"])
    assert ok.call("Echo", "echo", {"x": "hello"}, reply="echo")[1] == {"x": "hello"}
    assert calls == ["hello"]
    wrong_ca = job["client"]._replace(cert=rogue["client"].cert, key=rogue["client"].key)
    for tls in (wrong_ca, None):
      bad = channel.Client(address, _keys("island/1"), "island/1", "job", give_up_s=1, tls=tls)
      with pytest.raises(channel.SyncerUnreachable):
        bad.call("Echo", "echo", {"x": "let me in"}, reply="echo", deadline=1)
      bad.close()
    assert calls == ["hello"]
    ok.close()
  finally:
    server.stop(grace=0)


def test_tls_config_names_the_missing_file(tmp_path):
  c = tiny_config(**{"launch.tls_ca": str(tmp_path / "ca.pem")})
  with pytest.raises(ValueError, match="missing launch.tls_cert, launch.tls_key"):
    channel.Tls.from_config(c.launch)
  c = tiny_config(**{"launch.tls_ca": str(tmp_path / "ca.pem"), "launch.tls_cert": "x",
                     "launch.tls_key": "y"})
  with pytest.raises(ValueError, match="launch.tls_ca=.*No such file"):
    channel.Tls.from_config(c.launch)


@pytest.mark.slow
@pytest.mark.parametrize("bulk_min_bytes", [-1, 0])
def test_decoupled_run_over_mutual_tls_is_the_mesh_axis_run(tmp_path, data_dir,
                                                            bulk_min_bytes):
  """The launcher's syncer and island jobs with launch.tls_* (one certificate for all roles,
  valid for 127.0.0.1): the same losses as without TLS, every call over gRPC (-1) or every
  call but the bulk port's over the bulk path (0: joins, sends, receives, heartbeats; its
  listener on a fixed port, the syncer's + launch.bulk_port_offset, as a firewall opens)."""
  root = tmp_path / "pki"
  _pki(root, "job")  # the syncer's certificate doubles as the islands' (one job, one host)
  files = [f"--config.launch.tls_ca={root / 'ca.pem'}",
           f"--config.launch.tls_cert={root / 'server.pem'}",
           f"--config.launch.tls_key={root / 'server.key'}",
           f"--config.launch.bulk_min_bytes={bulk_min_bytes}",
           f"--config.launch.bulk_port_offset={0 if bulk_min_bytes < 0 else 1}"]
  result = _decoupled(tmp_path / "run", data_dir, "diloco", *files)
  assert result.returncode == 0, result.stderr[-3000:]
  if bulk_min_bytes >= 0:  # the listener on the syncer's port + 1
    log = (tmp_path / "run" / "logs" / "syncer.log").read_text()
    port = int(re.search(r"listening on [\d.]+:(\d+) \(bulk path on port (\d+)\)",
                         log).group(1))
    assert f"bulk path on port {port + 1})" in log
  want = json.load(open(golden.golden_file()[0]))["diloco"]
  for k in range(2):
    np.testing.assert_allclose(_island_losses(tmp_path / "run", k),
                               [row[k] for row in want["island_loss"]], rtol=1e-5)


def test_a_second_server_on_a_taken_port_is_refused_not_shared():
  """gRPC's SO_REUSEPORT default would let two syncers share one port, the kernel splitting
  islands between them; the second must fail to listen instead."""
  first, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo([]))
  try:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
      channel.serve(_keys, "job", "127.0.0.1", port, _echo([]))
  finally:
    first.stop(grace=0)


def _slow_proxy(target_port, delay_s, slow_chunks=3):
  """A TCP proxy on loopback that holds each of the first ``slow_chunks`` server -> client
  chunks of a connection for ``delay_s`` (a handshake over a long or loaded path)."""
  import socket  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(16)

  def pipe(src, dst, slow):
    try:
      n = 0
      while data := src.recv(65536):
        if slow and n < slow_chunks:
          time.sleep(delay_s)
        n += 1
        dst.sendall(data)
    except OSError:
      pass
    finally:
      for s in (src, dst):
        try:
          s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass

  def accept():
    while True:
      try:
        client, _ = listener.accept()
      except OSError:
        return
      server = socket.create_connection(("127.0.0.1", target_port))
      threading.Thread(target=pipe, args=(client, server, False), daemon=True).start()
      threading.Thread(target=pipe, args=(server, client, True), daemon=True).start()

  threading.Thread(target=accept, daemon=True).start()
  return listener, listener.getsockname()[1]


def test_a_tls_handshake_slower_than_the_retry_backoff_still_connects(tmp_path, monkeypatch):
  """The WAN testbed found every island's Join UNAVAILABLE for minutes: gRPC gives a connection
  attempt (TCP + TLS handshake) no more than min_reconnect_backoff, which the client had
  lowered to 0.1 s with its retry backoff. Through a path that holds the handshake's server
  flight 1.5 s, the client now connects and is served; with the lowered option it never does."""
  made = pki.make(str(tmp_path / "job"), [], islands=1)
  read = lambda *paths: channel.Tls(*(open(p, "rb").read() for p in paths))
  ca = str(tmp_path / "job" / "ca.pem")
  calls = []
  server, port = channel.serve(_keys, "job", "127.0.0.1", 0, _echo(calls),
                               tls=read(ca, *made["syncer"]))
  proxy, proxy_port = _slow_proxy(port, 1.5)
  client_tls = read(ca, *made["island0"])
  try:
    address = f"127.0.0.1:{proxy_port}"
    ok = channel.Client(address, _keys("island/0"), "island/0", "job", give_up_s=30,
                        tls=client_tls)
    assert ok.call("Echo", "echo", {"x": "far"}, reply="echo")[1] == {"x": "far"}
    ok.close()
    monkeypatch.setattr(channel, "_CLIENT_OPTIONS",
                        [*channel._CLIENT_OPTIONS, ("grpc.min_reconnect_backoff_ms", 100)])  # pylint: disable=protected-access
    lowered = channel.Client(address, _keys("island/0"), "island/0", "job", give_up_s=8,
                             tls=client_tls)
    with pytest.raises(channel.SyncerUnreachable):
      lowered.call("Echo", "echo", {"x": "never"}, reply="echo")
    lowered.close()
    assert calls == ["far"]
  finally:
    proxy.close()
    server.stop(grace=0)


_ECHO_SERVER = """
import sys, time
from fedjax_lm import wire
from fedjax_lm.decoupled import channel
secret, port, d = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[3]
read = lambda *p: channel.Tls(*(open(f'{d}/{x}', 'rb').read() for x in p))
keys = lambda who: wire.derive(secret, who) if who.startswith('island/') else None
echo = {'Echo': channel.Method(lambda who, meta, arrays: ('echo', {'x': meta['x']}, arrays),
                               ('echo',))}
server = channel.serve(keys, 'job', '127.0.0.1', port, echo,  # (kept: a collected server stops)
                       tls=read('ca.pem', 'syncer.pem', 'syncer.key'))
print('listening', flush=True)
time.sleep(180)
"""


def test_clients_started_before_their_tls_syncers_connect_once_they_are_up(tmp_path):
  """The WAN testbed found islands that never joined 2 syncer shards over mutual TLS: islands
  start before the shards listen, a call fails fast (UNAVAILABLE) and is retried, and between
  calls nothing polled the channel, so a connection attempt advanced only on gRPC's 5 s timer
  ticks and its TLS handshake outlasted the attempt's 20 s deadline, every attempt. Here two
  clients call in parallel from the start and their syncers (other processes: in this one,
  the servers' own pollers would drive the clients' sockets too) come up 2 s later: both are
  answered within seconds (before the fix: SyncerUnreachable after 40 s)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  made = pki.make(str(tmp_path / "job"), [], islands=1)
  read = lambda *paths: channel.Tls(*(open(p, "rb").read() for p in paths))
  client_tls = read(str(tmp_path / "job" / "ca.pem"), *made["island0"])
  ports = []
  for _ in range(2):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      ports.append(s.getsockname()[1])
  clients = [channel.Client(f"127.0.0.1:{p}", _keys("island/0"), "island/0", "job",
                            give_up_s=120, tls=client_tls) for p in ports]
  servers = []
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      calls = [pool.submit(c.call, "Echo", "echo", {"x": i}, reply="echo")
               for i, c in enumerate(clients)]
      time.sleep(2.0)
      env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
      servers = [subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, SECRET.decode(), str(p),
                                   str(tmp_path / "job")], env=env, stdout=subprocess.PIPE,
                                  text=True) for p in ports]
      for server in servers:  # (their start, an import of gRPC, is not what is measured)
        assert server.stdout.readline().strip() == "listening", server.wait()
      listening = time.time()
      assert [c.result()[1] for c in calls] == [{"x": 0}, {"x": 1}]
      took = time.time() - listening
    assert took < 15, took  # a retry (at most 1 s apart) and one handshake each
  finally:
    for c in clients:
      c.close()
    for s in servers:
      s.kill()
      s.wait()
