"""A model-sized payload through the decoupled channel, beside raw loopback TCP, in one run.

    python -m experiments.channel_bench --config configs/c4_1b.py [--repeats 2]

Sends one float32 pseudo-gradient the size of the config's model (c4_1b: 1.06B parameters,
4.2 GB) from a client process to a server process over :mod:`fedjax_lm.decoupled.channel`
(streamed, every chunk authenticated, reduced into a running sum on arrival), once over each
of its paths (``channel``: as a decoupled run sends it, a payload over the bulk path,
:mod:`fedjax_lm.decoupled.bulk`; ``channel-grpc``: ``launch.bulk_min_bytes=-1``, gRPC), then the same
bytes over a plain TCP socket on loopback (``sendall`` / ``recv_into`` one buffer, kept across
sends; then ``raw-fresh``: a new buffer each send, paying its first-touch page faults as the
channel's reader does). Prints seconds, CPU seconds per GB of each process (less disturbed
than wall time on a shared machine), each process's peak RSS (``VmHWM``), the load average
and the ratio channel ÷ raw throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from fedjax_lm import wire

_SECRET = b"b" * 32


def _hwm_bytes() -> int:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def _cpu_s(pid: int) -> float:
  """CPU seconds (user + system, all threads) a process has used: a figure the other work on a
  shared machine disturbs less than wall time."""
  with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def params_of(config_path: str) -> int:
  """The parameter count of a config's model (abstract: nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lm import config_lib, model as model_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_file(config_path)
  _, abstract = model_lib.build(model_lib.ModelConfig.from_config(config.model))
  return sum(int(x.size) for x in jax.tree.leaves(abstract))


def serve(n: int, port_file: str) -> None:
  """The channel's server: a ``Send`` of n float32 values is summed on arrival (the
  syncer's running sum) and answered; exits after ``--repeats`` sends."""
  from fedjax_lm.decoupled import channel  # pylint: disable=g-import-not-at-top
  total = np.zeros(n, np.float32)
  done = []

  def send(who, meta, arrays):
    del who, meta
    np.add(total, arrays[0], out=total)
    done.append(time.time())
    return "ok", {"hwm": _hwm_bytes()}, []
  keys = lambda who: wire.derive(_SECRET, who) if who == "island/0" else None
  server, port = channel.serve(keys, "bench", "127.0.0.1", 0, {
      "Send": channel.Method(send, ("send",), lambda who: n * 4)})
  with open(port_file, "w", encoding="utf-8") as f:
    f.write(str(port))
  while True:
    time.sleep(0.5)
    if os.path.exists(port_file + ".stop"):
      break
  server.stop(grace=1)
  print(json.dumps({"server_hwm": _hwm_bytes()}))


def raw_server(n: int, port_file: str, fresh: bool = False) -> None:
  """Plain TCP: receives n float32 values into one buffer (with ``fresh``, a new one for each
  connection, as the channel's reader allocates one per call), then answers one byte."""
  listener = socket.create_server(("127.0.0.1", 0))
  with open(port_file, "w", encoding="utf-8") as f:
    f.write(str(listener.getsockname()[1]))
  buf = None if fresh else bytearray(n * 4)
  while True:
    conn, _ = listener.accept()
    if fresh:  # first-touch page faults in recv_into, as in the channel's np.empty buffer
      view = buf = None  # the last send's buffer freed first
      buf = np.empty(n * 4, np.uint8)
    view = memoryview(buf).cast("B")
    with conn:
      got = 0
      while got < len(buf):
        k = conn.recv_into(view[got:], min(1 << 22, len(buf) - got))
        if not k:
          return
        got += k
      conn.sendall(b"!")


def _start(role: str, n: int, tmp: str) -> tuple[subprocess.Popen, int]:
  port_file = os.path.join(tmp, f"{role}.port")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.channel_bench", "--role", role,
                           "--n", str(n), "--port-file", port_file], stdout=subprocess.PIPE,
                          text=True)
  while not os.path.exists(port_file) or not open(port_file, encoding="utf-8").read():
    time.sleep(0.1)
  return proc, int(open(port_file, encoding="utf-8").read())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--config", default="configs/c4_1b.py")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--role", default="")
  parser.add_argument("--n", type=int, default=0)
  parser.add_argument("--port-file", default="")
  args = parser.parse_args()
  if args.role == "server":
    return serve(args.n, args.port_file)
  if args.role in ("raw", "raw-fresh"):
    return raw_server(args.n, args.port_file, fresh=args.role == "raw-fresh")
  import tempfile  # pylint: disable=g-import-not-at-top
  from fedjax_lm.decoupled import channel  # pylint: disable=g-import-not-at-top
  n = params_of(args.config)
  payload = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
  tmp = tempfile.mkdtemp()
  rows = []
  proc, port = _start("server", n, tmp)
  sent = 0
  for name, threshold in (("channel", 16 << 20), ("channel-grpc", -1)):
    client = channel.Client(f"127.0.0.1:{port}", wire.derive(_SECRET, "island/0"), "island/0",
                            "bench", give_up_s=30, bulk_min_bytes=threshold)
    for _ in range(args.repeats):
      cpu = _cpu_s(os.getpid()), _cpu_s(proc.pid)
      start = time.time()
      before = client.sent_bytes
      _, meta, _ = client.call("Send", "send", {}, [payload])
      rows.append((name, time.time() - start, _cpu_s(os.getpid()) - cpu[0],
                   _cpu_s(proc.pid) - cpu[1]))
      sent = client.sent_bytes - before
    client.close()
  open(os.path.join(tmp, "server.port.stop"), "w").close()
  server_hwm = json.loads(proc.communicate()[0].strip().splitlines()[-1])["server_hwm"]
  for role in ("raw", "raw-fresh"):
    raw, port = _start(role, n, tmp)
    for _ in range(args.repeats):
      cpu = _cpu_s(os.getpid()), _cpu_s(raw.pid)
      start = time.time()
      with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(memoryview(payload).cast("B"))
        s.recv(1)
      rows.append((role, time.time() - start, _cpu_s(os.getpid()) - cpu[0],
                   _cpu_s(raw.pid) - cpu[1]))
    raw.kill()
    raw.wait()
  best = {k: min(t for r, t, _, _ in rows if r == k) for k in ("channel", "channel-grpc", "raw",
                                                                "raw-fresh")}
  gbps = {k: n * 4 / v / 1e9 for k, v in best.items()}
  print(f"payload: {n:,} float32 = {n * 4 / 1e9:.2f} GB; on the wire per send "
        f"{sent / 1e9:.3f} GB (+{(sent - n * 4) / (n * 4) * 100:.3f}% heads and MACs)")
  for role, t, c, d in rows:
    print(f"  {role:12s} {t:7.2f} s  {n * 4 / t / 1e9:6.2f} GB/s   CPU s per GB: client "
          f"{c / (n * 4 / 1e9):.2f}, server {d / (n * 4 / 1e9):.2f}")
  for name in ("channel", "channel-grpc"):
    print(f"{name} ÷ raw throughput (best of {args.repeats}): "
          f"{gbps[name] / gbps['raw']:.2f}  (÷ raw into a fresh buffer per send, as the "
          f"channel's reader: {gbps[name] / gbps['raw-fresh']:.2f})")
  print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
  print(f"peak RSS: client {_hwm_bytes() / 1e9:.2f} GB (payload {n * 4 / 1e9:.2f} GB), "
        f"server {server_hwm / 1e9:.2f} GB (running sum + one receive buffer: "
        f"{2 * n * 4 / 1e9:.2f} GB)")


if __name__ == "__main__":
  main()
