"""One decoupled island: its own JAX job training alone, talking only to the syncer.

The island builds the same engine as the mesh-axis mode with M = 1 on its own devices (its own
in-island mesh, its own batch), reads data partition ``launch.island`` of ``islands.max_num``
(default ``islands.num``), and follows the same clock: at a SEND it runs the same encode program
(pseudo-gradient against its copy of the global fragment, error feedback, codec) and sends the
encoded payload; at the RECEIVE (just before the MERGE, tau steps later) it asks the syncer for
the new global fragment; at the MERGE it runs the same merge program. It heartbeats on a
thread. On start it joins: the syncer checks its fingerprint and hands it the current global
params, the step to start at and its data position (live recovery after a crash).

``islands.speed`` emulates slower hardware: with speed f < 1 the island sleeps after each inner
step so that the step's compute takes 1/f of its measured time (the exchange with the syncer is
not slowed). With ``islands.step_seconds`` = S > 0 every step is instead padded to S / f of wall
time: islands that share a few cores (here) then run as if each had its own hardware, since
their compute no longer slows one another as long as it fits in S. The measured compute seconds
per step (slowdown included, communication not) go to the syncer with each heartbeat, for
dynamic local updates (``outer.policy=async``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lm import data as data_lib
from fedjax_lm import engine
from fedjax_lm import input as input_lib
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib
from fedjax_lm import wire
from fedjax_lm.decoupled import channel
from fedjax_lm.decoupled import syncer as syncer_lib
from fedjax_lm.engine import clock as clock_lib

ENV_KILL = "FEDJAX_LM_KILL_ISLAND"  # fault injection: "island:step" SIGKILLs that island once
ENV_RECORD = "FEDJAX_LM_RECORD_BATCHES"  # test hook: log a digest of every batch read


def speeds(config) -> list[float]:
  text = str(config.islands.speed).strip()
  if not text:
    return [1.0] * max(int(config.islands.num), int(config.islands.max_num))
  values = [float(v) for v in text.split(",")]
  if any(not 0 < v <= 1 for v in values):
    raise ValueError(f"islands.speed={text!r}: each factor must be in (0, 1]")
  return values


def _maybe_kill(workdir: str, island: int, step: int) -> None:
  spec = os.environ.get(ENV_KILL, "")
  if spec and spec == f"{island}:{step}":
    marker = os.path.join(workdir, f".killed_island_{island}_{step}")
    if not os.path.exists(marker):
      open(marker, "w").close()
      os.kill(os.getpid(), signal.SIGKILL)


def run(config, workdir: str) -> None:
  k = int(config.launch.island)
  parts = int(config.islands.max_num) or int(config.islands.num)
  if not 0 <= k < parts:
    raise ValueError(f"launch.island={k} must be in [0, {parts}) (islands.max_num or "
                     "islands.num data partitions)")
  secret = wire.job_secret(config.launch.secret_file)
  client = channel.Client(config.launch.syncer, secret, f"island/{k}",
                          give_up_s=max(60.0, 3 * float(config.launch.heartbeat_seconds)),
                          tls=channel.Tls.from_config(config.launch))
  single = syncer_lib.single_island_config(config)
  mesh = mesh_lib.make_mesh(dict(single.mesh))
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  eng = engine.build(single, mesh, model_cfg)
  _, abstract = model_lib.build(model_cfg)
  tokenizer = data_lib.get_tokenizer(config.data.tokenizer)
  batches = input_lib.TrainBatches(single.data, mesh, num_islands=1, tokenizer=tokenizer,
                                   seed=int(config.seed), part=(k, parts))
  everyone = copy.deepcopy(config)  # the clock's drop-out schedule over every partition
  everyone.islands.num = parts
  clock = clock_lib.Clock.from_config(everyone, receive_at_merge=True,
                                      delayed=config.outer.delay != "none")
  factors = speeds(config)
  factor = factors[k] if k < len(factors) else 1.0
  pace_s = float(config.islands.step_seconds)

  _, meta, arrays = wire.unpack(secret, client.call("Join", wire.pack(
      secret, "join", {"island": k, "fingerprint": syncer_lib.fingerprint(config, abstract)})),
      "joined")
  leaves, treedef = jax.tree.flatten(abstract)
  if [a.shape for a in arrays] != [x.shape for x in leaves]:
    raise wire.WireError("the syncer's global params do not match this model")
  params = jax.device_put(jax.tree.unflatten(treedef, list(arrays)),
                          eng.state_shardings.server.params)
  state = eng.programs.init(params)
  reschedule = jax.jit(at_schedule_step, out_shardings=eng.state_shardings.islands,
                       donate_argnums=0)
  start = int(meta["step"])
  if config.outer.policy == "async":
    state = state._replace(islands=reschedule(state.islands, np.int32(meta["progress"])))
  if meta["data"]:
    batches.set_global_state({f"island{k}": meta["data"]})
  out_dir = os.path.join(workdir, "islands", str(k))
  os.makedirs(out_dir, exist_ok=True)
  log = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
  stop = threading.Event()

  timing = {"step_s": 0.0}  # measured seconds per step (EMA), for dynamic local updates

  def beat():
    while not stop.wait(float(config.launch.heartbeat_seconds) / 4):
      try:
        client.call("Heartbeat", wire.pack(secret, "heartbeat",
                                           {"island": k, "step_s": timing["step_s"]}),
                    deadline_s=5.0)
      except (channel.SyncerUnreachable, wire.WireError):
        pass

  threading.Thread(target=beat, daemon=True).start()
  frags = eng.spec.frags
  put = [jax.jit(lambda server, values, p=p: server._replace(
      params=frags.put(server.params, p, values))) for p in range(frags.num)]
  sent_bytes, in_flight = 0, {}
  asynchronous = config.outer.policy == "async"
  version, local_h, last_sync = int(meta.get("version", 0)), int(config.outer.sync_every), start
  limit = int(config.total_steps) * (4 if asynchronous else 1)  # async: until the syncer stops
  stopping = False
  try:
    for step in range(start, limit):
      began = time.perf_counter()
      batch = next(batches)
      record_batch = os.environ.get(ENV_RECORD) == "1"  # test hook: which tokens were read
      digest = (hashlib.sha1(np.asarray(batch["inputs"]).tobytes()).hexdigest()
                if record_batch else "")
      state, metrics = eng.inner_step(state, batch)
      jax.block_until_ready(metrics["island_loss"])
      if step > start:  # (the first step compiles: it is neither emulated nor timed)
        compute_s = time.perf_counter() - began
        time.sleep(slowdown_s(compute_s, factor, pace_s))
        timing["step_s"] = step_seconds(timing["step_s"], time.perf_counter() - began)
      done = step + 1
      if asynchronous:
        events = [] if done - last_sync < local_h else [
            clock_lib.Event(clock_lib.SEND, 0, np.ones(1, bool)),
            clock_lib.Event(clock_lib.RECEIVE, 0), clock_lib.Event(clock_lib.MERGE, 0)]
      else:
        events = island_events(clock, done)
      for event in events:
        p = event.fragment
        if event.kind == clock_lib.SEND:
          who = event.who if asynchronous else event.who[k:k + 1]
          islands, sent = eng.programs.encode[p](state.islands, state.server, np.int32(done), who)
          state = state._replace(islands=islands)
          payload = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(sent)]
          position = batches.global_state()[f"island{k}"]
          message = wire.pack(secret, "send", {
              "island": k, "fragment": p, "step": min(done, int(config.total_steps)),
              "data": position, "version": version, "local_steps": done - last_sync},
              payload)
          reply = wire.unpack(secret, client.call("Send", message), "ok")[1]
          stopping = stopping or (asynchronous and bool(reply.get("stop", False)))
          sent_bytes += sum(a.nbytes for a in payload[:-1])
          in_flight.setdefault(p, []).append((done, message))
        elif event.kind == clock_lib.RECEIVE:
          queue = in_flight.get(p, [])
          if not queue or (clock.delayed and len(queue) < 2 and done < int(config.total_steps)):
            continue  # delayed: only the previous round is received (none before round 2)
          values, reply = _receive(client, secret, k, p, *in_flight[p].pop(0))
          state = state._replace(server=put[p](state.server, tuple(values)))
          version, last_sync = int(reply.get("version", 0)), done
          local_h = int(reply.get("local_steps", local_h))
          if asynchronous:
            state = state._replace(islands=reschedule(state.islands,
                                                      np.int32(reply["progress"])))
          stopping = stopping or (asynchronous and bool(reply.get("stop", False)))
        else:
          state = state._replace(islands=eng.programs.merge[p](state.islands, state.server))
      loss = float(np.asarray(jax.device_get(metrics["island_loss"]))[0])
      log.write(json.dumps({"step": done, "island_loss": loss, "island_bytes": sent_bytes,
                            "wire_sent_bytes": client.sent_bytes,
                            "wire_received_bytes": client.received_bytes,
                            "time": time.time(), **({"batch": digest} if digest else {})}) + "\n")
      log.flush()
      _maybe_kill(workdir, k, done)
      if stopping:
        break
    client.call("Leave", wire.pack(secret, "leave", {"island": k}))
  finally:
    stop.set()
    log.close()
    client.close()


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


def island_events(clock: clock_lib.Clock, done: int) -> list:
  """The clock's events for one island job. With ``outer.delay=naive`` the island sends round
  r's pseudo-gradient (relative to where phase r started) before it takes round r - 1's global,
  which the syncer closed during phase r, and restarts from it: the exchange overlaps the whole
  inner phase. (The mesh engine's order receives first; there a receive only holds the mean.)"""
  events = clock.events(done)
  if not clock.delayed:
    return events
  out = []
  for event in events:
    if event.kind == clock_lib.SEND and out and out[-1].kind == clock_lib.RECEIVE:
      out.insert(len(out) - 1, event)
    else:
      out.append(event)
  return out


def _receive(client, secret, k: int, p: int, step: int, message: bytes) -> list:
  """The global fragment after round (p, step), resending our contribution if the syncer
  lost it (it restarted from an older checkpoint)."""
  while True:
    kind, meta, arrays = wire.unpack(secret, client.call("Receive", wire.pack(
        secret, "receive", {"island": k, "fragment": p, "step": step})),
        ("global", "pending", "resend"))
    if kind == "global":
      return arrays, meta
    if kind == "resend":
      client.call("Send", message)
