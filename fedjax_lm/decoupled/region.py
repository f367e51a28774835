"""HALoS's tiers as decoupled processes (:mod:`fedjax_lm.outer.halos`, arXiv 2506.04531): a
global parameter server (GPS) whose members are R regional ones (LPS), each an asynchronous
syncer whose members are its region's islands.

    island k (region r = k // (M / R)) --send / pull--> LPS r      (launch.regions[r])
    LPS r --every halos_k arrivals: its progress / the GPS's params--> GPS (launch.syncer)

Each tier is the asynchronous :class:`fedjax_lm.decoupled.syncer.Syncer` (each arrival applied
by Delayed Nesterov; islands pull, heartbeat and rejoin as with a flat async syncer), with its
tier's optimizer (``outer.halos_local_*`` at an LPS, ``outer.halos_global_*`` at the GPS) and
members: the LPS serves only its region's islands (``island/<k>``); the GPS serves only the
regions (``region/<r>``, a key derived from the job secret that no island holds: an island
cannot push to the GPS). An LPS is the GPS's member through :class:`Uplink`: after every
``halos_k`` arrivals since its last merge it sends ``Delta = ref - theta`` to the GPS as an island sends its
pseudo-gradient (the same signed, streamed, validated path; ``local_steps`` = the inner steps
it holds), pulls the GPS's params and merges them, ``theta <- (1 - alpha) theta + alpha
Theta``, ``ref <- theta``. ``launch.region_push=async`` (HALoS) keeps serving its islands while
the push is in flight (the merge lands when the GPS's params arrive); ``sync`` holds the LPS
until it lands (the timing model with no WAN delay: the identity tests).

The run's tokens: an LPS stops its islands once they have applied ``(M / R) x total_steps``
inner steps, flushes what the GPS has not had, and leaves; the GPS evaluates at every
``eval_every`` steps of the islands' progress (inner steps applied at the GPS / M) and at the
end, once every region has flushed.

Left out: an LPS restarted from its checkpoint resumes its params and optimizer but not its
tier state (``ref``, arrivals since its last merge): it starts a new merge period from its
restored params; one region's LPS holds all of its region (no sharded LPS); the run's tokens
are split per region (a slow region does not hand its share to a fast one, as the timing
model's one budget for all workers does).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_lm import wire
from fedjax_lm.decoupled import channel
from fedjax_lm.outer import halos

PUSH_MODES = ("async", "sync")


class Tier(NamedTuple):
  """A syncer process's place in the hierarchy."""
  kind: str  # "global" (the GPS) | "region" (LPS ``region``)
  region: int  # the LPS's region (-1 at the GPS)
  prefix: str  # its members' identity prefix: "island" (an LPS) | "region" (the GPS)
  members: tuple[int, ...]  # its members' ids (islands of the region | regions)
  islands: int  # islands whose applied steps make the progress (the region's | all M)
  settings: halos.Settings

  def outer_tx(self):
    return self.settings.local_tx() if self.kind == "region" else self.settings.global_tx()


def tier(config) -> Tier | None:
  """The tier of ``config``'s syncer role (None: not HALoS, a flat syncer)."""
  settings = halos.Settings.from_config(config.outer)
  if settings.regions <= 0:
    return None
  num = int(config.islands.num)
  per = num // settings.regions
  r = int(config.launch.region)
  if r < 0:
    return Tier("global", -1, "region", tuple(range(settings.regions)), num, settings)
  return Tier("region", r, "island", tuple(range(r * per, (r + 1) * per)), per, settings)


def region_of(config, island: int) -> int:
  """The region island ``island`` belongs to (contiguous blocks of M / R)."""
  return int(island) // (int(config.islands.num) // int(config.outer.halos_regions))


def island_address(config, island: int) -> str:
  """Where island ``island`` sends: its region's LPS (``launch.regions``)."""
  return addresses(config)[region_of(config, island)]


def addresses(config) -> list[str]:
  return [a for a in str(config.launch.regions).split(",") if a]


def validate(config) -> str | None:
  """What is wrong with a decoupled HALoS config, or None (config_lib calls it)."""
  regions = int(config.outer.halos_regions)
  if config.outer.policy != "async":
    return "outer.halos_regions with launch.mode=decoupled needs outer.policy=async"
  if int(config.launch.syncer_shards) != 1:
    return "outer.halos_regions: each tier is one syncer process (launch.syncer_shards=1)"
  if config.outer.merge != "mean" or config.outer.compression != "none":
    return "outer.halos_regions in decoupled mode: plain float32 payloads (no codec, merge=mean)"
  if not -1 <= int(config.launch.region) < regions:
    return f"launch.region={config.launch.region} must be -1 (the GPS) or in [0, {regions})"
  if config.launch.region_push not in PUSH_MODES:
    return f"launch.region_push={config.launch.region_push!r}: expected one of {PUSH_MODES}"
  if config.launch.role and len(addresses(config)) != regions:
    return (f"launch.regions={config.launch.regions!r}: expected HOST:PORT for each of the "
            f"{regions} regions' syncers, comma-separated")
  return None


class Uplink:
  """An LPS's link to the GPS: joins it, heartbeats, and after every ``halos_k`` arrivals pushes
  its progress and merges the GPS's params back (``launch.region_push``). ``syncer``: the
  LPS's :class:`~fedjax_lm.decoupled.syncer.Syncer` (its lock, server params, fragment layout)."""

  def __init__(self, config, syncer, secret: bytes):
    self.syncer, self.tier = syncer, syncer.tier
    self.who = f"region/{self.tier.region}"
    self.client = channel.Client(
        str(config.launch.syncer), wire.derive(secret, self.who), self.who, syncer.job,
        give_up_s=max(300.0, 10 * float(config.launch.heartbeat_seconds)),
        tls=channel.Tls.from_config(config.launch),
        bulk_min_bytes=int(config.launch.bulk_min_bytes))
    self.blocking = config.launch.region_push == "sync"
    self.alpha = float(self.tier.settings.alpha)
    self.k = int(self.tier.settings.k)
    self.heartbeat_s = float(config.launch.heartbeat_seconds)
    spec = syncer.server_spec
    self._take = jax.jit(lambda params: spec.frags.take(params, 0))
    self._outgoing = jax.jit(lambda ref, params: tuple(
        (r - x)[None] for r, x in zip(ref, spec.frags.take(params, 0))))
    self._merge = jax.jit(lambda params, theta, alpha: spec.frags.put(params, 0, tuple(
        (1.0 - alpha) * x + alpha * t.astype(x.dtype)
        for x, t in zip(spec.frags.take(params, 0), theta))), donate_argnums=0)
    self.reference = self._take(syncer.server.params)  # the params at the last merge
    self.since = 0  # arrivals applied since the last merge
    self.pending = 0  # inner steps applied since the last push
    self.version = 0  # the GPS's updates when this LPS last pulled
    self.pushes = 0
    self.pushed_bytes = 0
    self.flushed = False
    self._pushing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="uplink")
    self._in_flight: list[concurrent.futures.Future] = []
    self._stop = threading.Event()
    reply = self.client.call("Join", "join", {"island": self.tier.region,
                                              "fingerprint": syncer.fingerprint},
                             reply="joined", reply_limit=syncer.state_bytes())
    self.version = int(reply[1].get("version", 0))
    threading.Thread(target=self._heartbeat, daemon=True).start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s / 4):
      try:
        self.client.call("Heartbeat", "heartbeat", {"island": self.tier.region}, deadline=5.0)
      except (channel.SyncerUnreachable, wire.WireError):
        pass
      except ValueError:  # the channel closed: leaving
        return

  def arrived(self, local_steps: int) -> None:
    """After the LPS applied an island's update (its lock held): the ``halos_k``-th since the
    last merge pushes (as the authors' LPS: arrivals while a push is in flight do not start
    another; the merge starts the count again)."""
    self.since += 1
    self.pending += int(local_steps)
    if self.since == self.k:
      self._push()

  def _push(self, final: bool = False) -> None:
    """``Delta = ref - theta`` to the GPS (lock held while it is taken); the merge follows when
    the GPS's params come back (``sync``: before this returns)."""
    arrays = [np.asarray(x) for x in jax.device_get(
        self._outgoing(self.reference, self.syncer.server.params))]
    arrays.append(np.ones((1, 1), np.float32))  # the weight: sent, healthy
    meta = {"island": self.tier.region, "fragment": 0, "data": "",
            "step": min(self.syncer.progress(), self.syncer.total) or 1,
            "version": self.version, "local_steps": self.pending}
    self.pending = 0
    self.pushes += 1
    self.pushed_bytes += sum(a.nbytes for a in arrays[:-1])
    if self.blocking or final:
      self._exchange(meta, arrays, hold=False)
    else:
      self._in_flight = [f for f in self._in_flight if not f.done()]
      self._in_flight.append(self._pushing.submit(self._exchange, meta, arrays, True))

  def _exchange(self, meta: dict, arrays: list, hold: bool) -> None:
    """The push and the pull; the merge under the LPS's lock (``hold``: taken here)."""
    self.client.call("Send", "send", meta, arrays)
    kind, got, values = self.client.call(
        "Receive", "receive", {"island": self.tier.region, "fragment": 0, "step": meta["step"]},
        reply="global", reply_limit=self.syncer.state_bytes())
    del kind
    theta = tuple(jax.device_put(v) for v in values)
    if hold:
      with self.syncer.lock:
        self._land(theta, got)
    else:
      self._land(theta, got)

  def _land(self, theta: tuple, got: dict) -> None:
    server = self.syncer.server
    self.syncer.server = server._replace(params=self._merge(server.params, theta, self.alpha))
    self.reference = self._take(self.syncer.server.params)
    self.since = 0
    self.version = int(got.get("version", self.version))
    self.syncer._log("region_merged", region=self.tier.region, gps_version=self.version,
                    pushes=self.pushes)  # pylint: disable=protected-access

  def flush(self) -> None:
    """The end (lock not held): the push in flight landed, what the GPS has not had (the
    arrivals since the last merge) pushed, and this region leaves the GPS."""
    for f in self._in_flight:
      f.result()
    with self.syncer.lock:
      if not self.flushed:
        # arrivals since the last merge: pushed; none, but steps applied while the last push
        # was in flight: their progress was folded into the merge (theta's 1 - alpha share),
        # not sent (the timing model's final flush does the same)
        folded = 0 if self.since else self.pending
        if self.since:
          self._push(final=True)
        self.syncer._log("region_flushed", region=self.tier.region, pushes=self.pushes,  # pylint: disable=protected-access
                         folded_steps=folded)
      self.flushed = True
    self._stop.set()
    try:
      self.client.call("Leave", "leave", {"island": self.tier.region})
    except (channel.SyncerUnreachable, wire.WireError) as e:
      logging.warning("region %d: leave: %s", self.tier.region, e)

  def close(self) -> None:
    self._stop.set()
    self._pushing.shutdown()
    self.client.close()
