"""A WAN in network namespaces: one namespace per island, joined by a bridge over shaped links.

Independent of ``fedjax_lm``; used by ``experiments.wan`` and its test. Needs root.

  island k: namespace ``fjwan-<pid>-i<k>``, loopback up, ``wan0`` = 198.18.0.<k+1>/24
  hub:      namespace ``fjwan-<pid>-hub``, bridge ``br0``, one port ``p<k>`` per island

Each ``wan0`` <-> ``p<k>`` veth pair is island k's access link: its two egress sides (upload on
``wan0``, download on ``p<k>``) carry a ``tc tbf`` qdisc at the given rate, so any two islands
talk at that rate in each direction. ``netem`` is not in this kernel: there is no added delay,
the only latency is queueing in tbf (at most ``queue_ms`` per shaped hop). MTU 1500 and GSO/TSO
segments of one packet (as on a WAN; 64 KiB GSO packets exceed the tbf bucket, are dropped for
good and stall TCP), so the veth byte counters count every packet's headers.
Addresses come from the benchmarking range 198.18.0.0/15 and exist only inside the namespaces;
IPv6 is off there. ``/etc/netns/<ns>/hosts`` (bind-mounted by ``ip netns exec``) maps this
machine's hostname to the island's address: gloo binds to the hostname's address.

Everything is removed by ``teardown()``; a detached reaper process removes it too if the owner
dies without cleaning up (SIGKILL), and ``clean_stale()`` removes testbeds of dead owners.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys

PREFIX = "fjwan-"
NOT_ROOT = ("experiments.wan needs root to create network namespaces, veth links and tc "
            "qdiscs (ip netns / ip link / tc); run it as root")


class NotRootError(RuntimeError):
  pass


def require_root() -> None:
  if os.geteuid() != 0:
    raise NotRootError(NOT_ROOT)


def _ip(*args: str) -> str:
  done = subprocess.run(["ip", *args], capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
  return done.stdout


def namespaces() -> list[str]:
  out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
  return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_namespace(ns: str) -> None:
  """Kills what runs inside ``ns`` (its links and qdiscs go with it), then removes it."""
  pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
  for pid in pids.split():
    try:
      os.kill(int(pid), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass
  subprocess.run(["ip", "netns", "del", ns], capture_output=True)
  shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def remove_testbed(tag: str) -> None:
  """Removes every namespace (and hosts file) of the testbed ``tag`` (``fjwan-<pid>``)."""
  for ns in namespaces():
    if ns.startswith(tag + "-"):
      _remove_namespace(ns)
  if os.path.isdir("/etc/netns"):
    for name in os.listdir("/etc/netns"):
      if name.startswith(tag + "-"):
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
    try:
      os.rmdir("/etc/netns")  # only if no other namespace keeps files there
    except OSError:
      pass


def _owner(name: str) -> int | None:
  try:
    return int(name[len(PREFIX):].split("-")[0])
  except ValueError:
    return None


def clean_stale() -> list[str]:
  """Removes testbeds whose owner process is gone (e.g. a SIGKILLed launcher); returns their
  namespaces. Testbeds of live owners (another run) are left alone."""
  names = [n for n in namespaces() if n.startswith(PREFIX)]
  if os.path.isdir("/etc/netns"):
    names += [n for n in os.listdir("/etc/netns") if n.startswith(PREFIX) and n not in names]
  stale = [n for n in names if _owner(n) is None or not _alive(_owner(n))]
  for tag in sorted({n.rsplit("-", 1)[0] for n in stale}):
    remove_testbed(tag)
  return stale


class Testbed:
  """``islands`` namespaces joined through a hub bridge; every access link shaped to ``rate``
  (a tc rate such as ``20mbit``; ``None``: unshaped; a list: namespace k's link to
  ``rate[k]``)."""

  def __init__(self, islands: int, rate: str | None | list, queue_ms: int = 100,
               burst: str = "64kb"):
    require_root()
    if not 1 <= islands <= 250:
      raise ValueError(f"islands={islands}: expected 1..250")
    self.islands, self.rate, self.queue_ms, self.burst = islands, rate, queue_ms, burst
    self.rates = list(rate) if isinstance(rate, (list, tuple)) else [rate] * islands
    if len(self.rates) != islands:
      raise ValueError(f"rate: {len(self.rates)} rates for {islands} namespaces")
    self.tag = f"{PREFIX}{os.getpid()}"
    self.hub = f"{self.tag}-hub"
    self.names = [f"{self.tag}-i{k}" for k in range(islands)]
    self._reaper = None

  def address(self, k: int) -> str:
    return f"198.18.0.{k + 1}"

  def exec_argv(self, k: int, argv: list[str]) -> list[str]:
    """``argv`` run inside island ``k``'s namespace."""
    return ["ip", "netns", "exec", self.names[k], *argv]

  def __enter__(self) -> "Testbed":
    self.build()
    return self

  def __exit__(self, *exc) -> None:
    self.teardown()

  def build(self) -> None:
    clean_stale()
    remove_testbed(self.tag)  # a testbed this process built earlier and did not remove
    self._start_reaper()
    try:
      self._build()
    except BaseException:
      self.teardown()
      raise

  def _build(self) -> None:
    for ns in [self.hub, *self.names]:
      _ip("netns", "add", ns)
      subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                      "net.ipv6.conf.all.disable_ipv6=1",
                      "net.ipv6.conf.default.disable_ipv6=1"], check=True, capture_output=True)
      _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
    _ip("-n", self.hub, "link", "set", "br0", "up")
    hostname = socket.gethostname()
    for k, ns in enumerate(self.names):
      port = f"p{k}"
      _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "wan0",
          "netns", ns)
      for where, dev in ((self.hub, port), (ns, "wan0")):
        _ip("-n", where, "link", "set", "dev", dev, "mtu", "1500", "gso_max_size", "1500",
            "gso_max_segs", "1")
        self._shape(where, dev, self.rates[k])
      _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
      _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "wan0")
      _ip("-n", ns, "link", "set", "wan0", "up")
      os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
      with open(f"/etc/netns/{ns}/hosts", "w") as f:
        f.write(f"127.0.0.1 localhost\n{self.address(k)} {hostname}\n")

  def _shape(self, ns: str, dev: str, rate: str | None) -> None:
    if rate:
      subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                      "tbf", "rate", rate, "burst", self.burst, "latency",
                      f"{self.queue_ms}ms"], check=True, capture_output=True, text=True)

  def counters(self) -> list[dict[str, int]]:
    """Per island, ``wan0``'s byte and packet counters (tx = sent into the WAN)."""
    out = []
    for ns in self.names:
      stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", "wan0"))[0]["stats64"]
      out.append({"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                  "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"],
                  "tx_dropped": stats["tx"]["dropped"]})
    return out

  def qdisc_drops(self) -> int:
    """Packets the tbf queues dropped (queue full), over every shaped device."""
    total = 0
    for ns, dev in [(self.hub, f"p{k}") for k in range(self.islands)] + [
        (n, "wan0") for n in self.names]:
      out = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev",
                            dev], capture_output=True, text=True).stdout
      total += sum(q.get("drops", 0) for q in json.loads(out or "[]"))
    return total

  def _start_reaper(self) -> None:
    """A detached process that removes this testbed once this process is gone, however it
    ended (SIGKILL included)."""
    self._reaper = subprocess.Popen(
        [sys.executable, "-m", "experiments.wan_net", str(os.getpid()), self.tag],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)

  def teardown(self) -> None:
    remove_testbed(self.tag)
    if self._reaper is not None and self._reaper.poll() is None:
      self._reaper.kill()
      self._reaper.wait()
    self._reaper = None


def _reap(owner: int, tag: str) -> None:
  """Waits for ``owner`` to exit, then removes its testbed."""
  try:
    fd = os.pidfd_open(owner)
  except ProcessLookupError:
    fd = None
  if fd is not None:
    select.select([fd], [], [])
  remove_testbed(tag)


if __name__ == "__main__":
  _reap(int(sys.argv[1]), sys.argv[2])
