"""One decoupled island: its own JAX job training alone, talking only to the syncer.

The island runs the mesh-axis engine and loop with M = 1 on its own devices (its own in-island
mesh, its own batch): ``engine.build`` with a :class:`remote.RemoteLink` to the syncer and the
run's clock as this island sees it (:meth:`Clock.from_config` ``member``; async: its own
:class:`clock.LocalClock`). The clock's events go through the engine's one ``sync``, exactly as
in the mesh-axis mode: SEND runs the encode program and the link sends the payload; RECEIVE
(just before the MERGE, or with ``outer.delay`` just before the next send) takes the round's
mean from the syncer through the same outer-step program; MERGE runs the merge program. So
every variant runs here unchanged. Data: partition ``launch.island`` of ``islands.max_num``
(default ``islands.num``). It heartbeats on a thread. On start it joins: the syncer checks its
fingerprint and hands over its server state, the step to start at and this island's data
position (live recovery after a crash).

``islands.speed`` emulates slower hardware: with speed f < 1 the island sleeps after each inner
step so that the step's compute takes 1/f of its measured time (the exchange with the syncer is
not slowed). With ``islands.step_seconds`` = S > 0 every step is instead padded to S / f of wall
time: islands that share a few cores (here) then run as if each had its own hardware, since
their compute no longer slows one another as long as it fits in S. The measured compute seconds
per step (slowdown included, communication not) go to the syncer with each heartbeat, for
dynamic local updates (``outer.policy=async``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import data as data_lib
from fedjax_lm import engine
from fedjax_lm import faults
from fedjax_lm import input as input_lib
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import model as model_lib
from fedjax_lm import wire
from fedjax_lm.decoupled import channel
from fedjax_lm.decoupled import region as region_lib
from fedjax_lm.decoupled import remote
from fedjax_lm.decoupled import syncer as syncer_lib
from fedjax_lm.decoupled import tokens
from fedjax_lm.engine import clock as clock_lib
from fedjax_lm.engine import merges


def speeds(config) -> list[float]:
  text = str(config.islands.speed).strip()
  if not text:
    return [1.0] * max(int(config.islands.num), int(config.islands.max_num))
  values = [float(v) for v in text.split(",")]
  if any(not 0 < v <= 1 for v in values):
    raise ValueError(f"islands.speed={text!r}: each factor must be in (0, 1]")
  return values


class Job(NamedTuple):
  """What one island job holds: its engine (M = 1, with the remote link), its batches."""
  engine: Any
  link: remote.RemoteLink
  batches: Any
  island: int


def build(config, clients) -> Job:
  """The mesh-axis engine for this one island: its own in-island mesh and batch, the run's
  clock as this island sees it (or, async, its own), and the remote link to the syncer."""
  k = int(config.launch.island)
  parts = int(config.islands.max_num) or int(config.islands.num)
  if not 0 <= k < parts:
    raise ValueError(f"launch.island={k} must be in [0, {parts}) (islands.max_num or "
                     "islands.num data partitions)")
  one = syncer_lib.island_config(config)
  one.data.batch_size = tokens.batch_sizes(config)[k]  # islands.batch_sizes: its own rows
  mesh = mesh_lib.make_mesh(dict(one.mesh))
  want = tokens.devices(config)
  if want is not None and mesh.devices.size != want[k]:
    raise ValueError(f"island {k}: islands.devices={config.islands.devices!r} gives it "
                     f"{want[k]} devices, its mesh has {mesh.devices.size}")
  batches = input_lib.TrainBatches(one.data, mesh, num_islands=1, seed=int(config.seed),
                                   tokenizer=data_lib.get_tokenizer(config.data.tokenizer),
                                   part=(k, parts))
  asynchronous = config.outer.policy == "async"
  link = remote.RemoteLink(clients, k, total_steps=int(config.total_steps),
                           position=lambda: batches.global_state()[f"island{k}"],
                           asynchronous=asynchronous)
  if asynchronous:
    clock = clock_lib.LocalClock(int(config.outer.sync_every), 0, int(config.total_steps))
  else:  # the run's clock (drop-out drawn over every partition), this island's entry
    clock = clock_lib.Clock.from_config(config, receive_at_merge=link.overlaps, member=k,
                                        num=parts, delayed=merges.from_config(config.outer).delayed)
  eng = engine.build(one, mesh, model_lib.ModelConfig.from_config(config.model), link=link,
                     clock=clock, world=int(config.islands.num))
  server = jax.eval_shape(eng.init, jax.random.key(0)).server
  link.reply_limit = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(server)) + 4096
  return Job(eng, link, batches, k)


def join(job: Job, config, clients, inner: Any = None) -> tuple[Any, int]:
  """Joins the run: the syncer (every shard, in parallel) checks the fingerprint and hands
  over its server state, the step to start at and this island's data position (live recovery
  after a crash). The island starts from the global params (its server copy adopts the
  syncer's; nothing is initialised twice); the inner learning-rate schedule resumes at the
  run's position, not at warm-up, and the inner optimizer state from this island's own last
  checkpoint (``inner``) if it has one."""
  _, abstract = model_lib.build(model_lib.ModelConfig.from_config(config.model))
  request = {"island": job.island, "fingerprint": syncer_lib.fingerprint(config, abstract)}
  with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
    replies = list(pool.map(lambda c: c.call("Join", "join", request, reply="joined",
                                             reply_limit=job.link.reply_limit), clients))
  eng, link = job.engine, job.link
  server_like = ckpt_lib.abstract_like(jax.eval_shape(eng.init, jax.random.key(0)).server,
                                       eng.state_shardings.server)
  if len(clients) == 1:
    parts = link.parts(eng.spec, server_like, replies[0][2])
    state = eng.programs.init(parts[0])
    state = state._replace(server=jax.jit(functools.partial(remote.adopt, eng.spec),
                                          donate_argnums=0)(state.server, parts))
  else:  # each shard's fragments put into place, then the islands start from them
    server = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), server_like),
                     out_shardings=eng.state_shardings.server)()
    for s, (_, _, arrays) in enumerate(replies):
      owned = syncer_lib.owned_fragments(eng.spec.frags.num, len(clients), s)
      server = jax.jit(functools.partial(remote.adopt_fragments, eng.spec, owned),
                       donate_argnums=0)(server, link.parts(eng.spec, server_like, arrays, s))
    state = eng.programs.init(server.params)._replace(server=server)
  meta = _joined(replies)
  del replies  # (the replies' host buffers)
  if inner is not None:
    restored = inner.restore_latest(eng.state_shardings.islands.opt_state, state.islands.opt_state)
    if restored is not None:
      state = state._replace(islands=state.islands._replace(opt_state=restored))
  link.version, start = int(meta.get("version", 0)), int(meta["step"])
  link.phase_start = start
  link.applied = {int(p): int(s) for p, s in meta.get("closed", {}).items()}
  if meta["data"]:
    job.batches.set_global_state({f"island{job.island}": meta["data"]})
  if isinstance(eng.clock, clock_lib.LocalClock):
    eng.clock.last, link.progress = start, int(meta["progress"])
  position = link.progress if link.progress is not None else start
  state = state._replace(islands=_reschedule(eng)(state.islands, np.int32(position)))
  return state, start


def _joined(replies: list) -> dict:
  """One join reply from every shard's: the earliest start step and version sum, every
  shard's closed rounds, the data position of the shard whose latest round is the newest."""
  metas = [m for _, m, _ in replies]
  if len(metas) == 1:
    return metas[0]
  newest = max(metas, key=lambda m: max(m.get("closed", {}).values(), default=0))
  return {"step": min(int(m["step"]) for m in metas), "data": newest["data"],
          "version": sum(int(m.get("version", 0)) for m in metas),
          "closed": {p: s for m in metas for p, s in m.get("closed", {}).items()},
          "progress": int(metas[0].get("progress", 0))}


class InnerCheckpoint:
  """This island's inner optimizer state (Adam's moments: the syncer holds none of it), saved
  asynchronously every ``checkpoint_every`` steps under ``islands/<k>/inner_checkpoints`` and
  restored when the island rejoins after a crash, so it does not restart from zero moments."""

  def __init__(self, directory: str, every: int):
    self.every = int(every)
    self.ckpt = ckpt_lib.Checkpointer(directory, every=self.every, keep=1,
                                      name="inner_checkpoints")

  def maybe_save(self, step: int, opt_state: Any) -> None:
    if step % self.every == 0:
      self.ckpt.save(step, opt_state, None, force=True)

  def restore_latest(self, shardings: Any, like: Any) -> Any:
    """The newest saved state laid out like ``like``, or None if there is none."""
    step, restored = self.ckpt.restore_latest(ckpt_lib.abstract_like(like, shardings), None,
                                              layout={})
    if step is not None:
      logging.warning("island: inner optimizer state restored from its step %d", step)
    return restored

  def close(self) -> None:
    self.ckpt.wait()
    self.ckpt.close()


def _reschedule(eng) -> Any:
  return jax.jit(at_schedule_step, out_shardings=eng.state_shardings.islands, donate_argnums=0)


def run(config, workdir: str) -> None:
  """Joins, then the mesh-axis loop (inner step, then the clock's events through the engine's
  one ``sync``), paced by ``islands.speed``; heartbeats on a thread; leaves at the end."""
  syncer_lib.compilation_cache(workdir)
  clients = connect(config)
  job = build(config, clients)
  out_dir = os.path.join(workdir, "islands", str(job.island))
  os.makedirs(out_dir, exist_ok=True)
  inner = InnerCheckpoint(out_dir, int(config.checkpoint_every))
  state, start = join(job, config, clients, inner)
  timing = {"step_s": 0.0}  # measured seconds per step (EMA), for dynamic local updates
  stop = threading.Event()
  for client in clients:
    threading.Thread(target=_heartbeat, args=(config, client, job.island, timing, stop),
                     daemon=True).start()
  try:
    with metrics_lib.JsonlWriter(os.path.join(out_dir, "metrics.jsonl")) as log:
      _loop(config, workdir, job, state, start, timing, log, inner)
    for client in clients:
      client.call("Leave", "leave", {"island": job.island})
  finally:
    inner.close()
    stop.set()
    job.link.close()
    for client in clients:
      client.close()


def _loop(config, workdir, job: Job, state, start: int, timing: dict, log,
          inner: InnerCheckpoint) -> None:
  eng, link, k = job.engine, job.link, job.island
  factors = speeds(config)
  factor, pace_s = factors[k] if k < len(factors) else 1.0, float(config.islands.step_seconds)
  plan = faults.Plan.from_config(config)
  reschedule = _reschedule(eng)
  asynchronous = isinstance(eng.clock, clock_lib.LocalClock)
  limit = int(config.total_steps) * (4 if asynchronous else 1)  # async: until the syncer stops
  for step in range(start, limit):
    began = time.perf_counter()
    batch = next(job.batches)
    state, metrics = eng.inner_step(state, batch)
    jax.block_until_ready(metrics["island_loss"])
    if step > start:  # (the first step compiles: it is neither emulated nor timed)
      time.sleep(slowdown_s(time.perf_counter() - began, factor, pace_s))
      timing["step_s"] = step_seconds(timing["step_s"], time.perf_counter() - began)
    done = step + 1
    pulled = link.version
    state = eng.sync(state, done)
    if asynchronous and link.version != pulled:  # the run's position and the next H
      state = state._replace(islands=reschedule(state.islands, np.int32(link.progress)))
      eng.clock.h = link.local_steps
    inner.maybe_save(done, state.islands.opt_state)
    log.write({"step": done, "island_loss": float(np.asarray(jax.device_get(
        metrics["island_loss"]))[0]), "island_bytes": link.sent_bytes,
               "wire_sent_bytes": sum(c.sent_bytes for c in link.clients),
               "wire_received_bytes": sum(c.received_bytes for c in link.clients), "time": time.time(),
               **({"batch": _digest(batch)} if plan.record_batches else {})})
    plan.maybe_kill(f"island/{k}", done, workdir)
    if link.stopping:
      break


def _digest(batch) -> str:
  """Which tokens a step read (``faults.record_batches``: the data-position checks)."""
  return hashlib.sha1(np.asarray(batch["inputs"]).tobytes()).hexdigest()


def connect(config) -> list[channel.Client]:
  """This island's clients of the syncer, one per shard (``launch.syncer``: HOST:PORT,...):
  its own key (``FEDJAX_LM_MEMBER_KEY``, or derived from the job secret), the job's id (the
  config fingerprint's digest)."""
  who = f"island/{int(config.launch.island)}"
  _, abstract = model_lib.build(model_lib.ModelConfig.from_config(config.model))
  key = wire.member_key(who, config.launch.secret_file)
  job = channel.job_id(syncer_lib.fingerprint(config, abstract))
  addresses = str(config.launch.syncer).split(",")
  if int(config.outer.halos_regions):  # HALoS: its region's syncer
    addresses = [region_lib.island_address(config, int(config.launch.island))]
  return [channel.Client(address, key, who, job,
                         give_up_s=max(60.0, 3 * float(config.launch.heartbeat_seconds)),
                         tls=channel.Tls.from_config(config.launch),
                         bulk_min_bytes=int(config.launch.bulk_min_bytes))
          for address in addresses]


def _heartbeat(config, client, island: int, timing: dict, stop) -> None:
  while not stop.wait(float(config.launch.heartbeat_seconds) / 4):
    try:
      client.call("Heartbeat", "heartbeat", {"island": island, "step_s": timing["step_s"]},
                  deadline=5.0)
    except (channel.SyncerUnreachable, wire.WireError):
      pass
    except ValueError:  # its channel closed: the island is leaving
      if stop.is_set():
        return
      raise


def slowdown_s(compute_s: float, factor: float, pace_s: float = 0.0) -> float:
  """``islands.speed``: the sleep that makes a step whose compute took ``compute_s`` take
  ``compute_s / factor``, or, with ``islands.step_seconds`` = ``pace_s`` > 0, take
  ``pace_s / factor`` of wall time (none if the compute alone took longer). Only compute is
  slowed: the exchange with the syncer (send, a receive waiting for a round or for the
  syncer's lock) is not hardware speed and is not scaled."""
  if not 0 < factor <= 1:
    raise ValueError(f"islands.speed factor {factor} must be in (0, 1]")
  compute_s = max(0.0, float(compute_s))
  if pace_s > 0:
    return max(0.0, float(pace_s) / factor - compute_s)
  return compute_s * (1.0 / factor - 1.0)


def step_seconds(ema: float, took: float) -> float:
  """The island's measured seconds per inner step (an EMA over steps; 0 = none yet) that
  dynamic local updates read: compute and the emulated slowdown, no communication."""
  return float(took) if not ema else 0.9 * float(ema) + 0.1 * float(took)


def at_schedule_step(islands, step):
  """The islands' inner optimizer state with every learning-rate schedule's position
  (``optax.ScaleByScheduleState.count``) set to ``step``; other counters unchanged."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  opt_state = jax.tree.map(
      lambda x: x._replace(count=jnp.full_like(x.count, step)) if is_schedule(x) else x,
      islands.opt_state, is_leaf=is_schedule)
  return islands._replace(opt_state=opt_state)
