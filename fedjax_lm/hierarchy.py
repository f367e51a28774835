"""HALoS's tiers (:mod:`fedjax_lm.outer.halos`) run on a timing model, in one process: the
paper's own method of evaluation (the authors' ``simulation/exec_halos.py`` schedules the same
events on simulated time), beside flat asynchronous DiLoCo and synchronous DiLoCo on the same
timing model, at equal tokens.

Time: worker w's inner step takes ``step_seconds / speeds[w]``; a message between an LPS (or,
flat, a worker) and the GPS takes ``wan_seconds`` one way; worker <-> LPS messages take no time
(the region's fast network). Numerics do not depend on time except through the order of
events. Events at the same time are all applied before any worker starts its next phase (so
equal workers of a region are a synchronous round).

Modes:

* ``halos``: workers -> LPS (Delayed Nesterov per arrival) -> after K arrivals the LPS's progress
  to the GPS (Delayed Nesterov), the GPS's params back, merged with weight alpha.
* ``async``: Async Local-SGD (Liu et al. 2024): each worker's pseudo-gradient goes to the GPS
  over the WAN, is applied by Delayed Nesterov on arrival, and the worker restarts from the
  params sent back (a WAN round trip per phase).
* ``sync``: DiLoCo: every round waits for the slowest worker and a WAN round trip; the outer
  optimizer steps on the mean.

Every worker keeps its own inner optimizer state (and step count, so its learning-rate schedule)
across phases, as DiLoCo's islands do. The run stops starting phases once the workers have
started ``budget`` inner steps in all; an LPS's progress not yet sent is sent at the end (the
engine's final flush), and the GPS's params are the result. WAN bytes: one param-sized message
per push and per reply.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lm.outer import halos


@dataclasses.dataclass
class Result:
  params: Any  # the GPS's params at the end
  losses: list  # per worker, every inner step's loss
  evals: list  # {"time", "steps", **evaluate(params)} as the workers' steps pass eval points
  time: float  # simulated seconds until the GPS holds its final params
  wan_messages: int  # param-sized messages over the WAN (each way counts)
  steps: int  # inner steps run, all workers


def _sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


class _Workers:
  """The workers' inner state and phases (H inner steps from a start, pseudo-gradient out)."""

  def __init__(self, num, params, init_opt, train_step, next_batch, budget, h, max_time):
    self.opt = [init_opt(params) for _ in range(num)]
    self.losses = [[] for _ in range(num)]
    self.next_batch = next_batch
    self.budget, self.h, self.started = int(budget), int(h), 0
    self.max_time = float("inf") if max_time is None else float(max_time)

    def run(p, o, batches):  # the phase's steps as one program (one dispatch a phase)
      def body(carry, batch):
        p, o, loss, _ = train_step(*carry, batch)
        return (p, o), loss
      (p, o), losses = jax.lax.scan(body, (p, o), batches)
      return p, o, losses
    self._run = jax.jit(run)

  def phase(self, w: int, start: Any, t: float) -> tuple[Any, int] | None:
    """Worker w's next phase from ``start`` at time ``t``: (delta = start - end, steps), None
    past the budget or the time limit."""
    n = min(self.h, self.budget - self.started)
    if n <= 0 or t >= self.max_time:
      return None
    self.started += n
    batches = jax.tree.map(lambda *b: jnp.stack(b), *(self.next_batch(w) for _ in range(n)))
    p, self.opt[w], losses = self._run(start, self.opt[w], batches)
    self.losses[w].extend(float(x) for x in losses)
    return _sub(start, p), n


def simulate(mode: str, *, num: int, h: int, params: Any, init_opt: Callable,
             train_step: Callable, next_batch: Callable, budget: int,
             step_seconds: float = 1.0, speeds: list[float] | None = None,
             settings: halos.Settings | None = None,
             outer_tx: optax.GradientTransformation | None = None,
             evaluate: Callable | None = None, eval_every: int = 0,
             max_time: float | None = None) -> Result:
  """Runs ``mode`` (``halos`` | ``async`` | ``sync``) with ``num`` workers of ``h`` inner
  steps a phase from ``params``. ``train_step(params, opt, batch) -> (params, opt, loss, ok)``;
  ``next_batch(w)``; ``budget``: inner steps of all workers together. ``outer_tx``: the GPS's
  optimizer for ``async`` / ``sync`` (``halos`` takes both tiers' from ``settings``).
  ``evaluate(params) -> dict`` at every ``eval_every`` inner steps of all workers and at the end.
  ``max_time``: no phase starts at or after this simulated time (with ``budget`` large: the
  runs compare at equal time, not equal tokens)."""
  if mode not in halos.MODES:
    raise ValueError(f"mode={mode!r}: expected one of {halos.MODES}")
  speeds = list(speeds or [1.0] * num)
  wan = settings.wan_seconds if settings is not None else 0.0
  workers = _Workers(num, params, init_opt, train_step, next_batch, budget, h, max_time)
  duration = lambda w, n: n * step_seconds / speeds[w]
  evals, done_steps, next_eval, messages = [], 0, eval_every or budget + 1, 0
  gtx = settings.global_tx() if mode == "halos" else outer_tx
  apply = jax.jit(functools.partial(halos.global_apply, gtx))

  def maybe_eval(t, gps, force=False):
    nonlocal next_eval
    if evaluate is not None and (force or done_steps >= next_eval):
      evals.append({"time": t, "steps": done_steps, **evaluate(gps)})
      while next_eval <= done_steps:
        next_eval += eval_every or budget + 1

  gps = params
  if mode == "sync":
    gps_opt, t, end = gtx.init(params), 0.0, 0.0
    while True:
      out = [workers.phase(w, gps, t) for w in range(num)]
      if any(o is None for o in out):
        break
      mean = jax.tree.map(lambda *d: sum(d) / num, *(d for d, _ in out))
      gps, gps_opt = apply(gps, gps_opt, mean)
      end = t + max(duration(w, n) for w, (_, n) in enumerate(out)) + wan  # the mean arrived
      t = end + wan  # the new params back at every worker
      messages += 2 * num
      done_steps += sum(n for _, n in out)
      maybe_eval(end, gps)
    maybe_eval(end, gps, force=not evals or evals[-1]["steps"] != done_steps)
    return Result(gps, workers.losses, evals, end, messages, workers.started)

  heap, seq = [], itertools.count()
  push = lambda t, kind, data: heapq.heappush(heap, (t, next(seq), kind, data))
  gps_opt = gtx.init(params)
  end = 0.0  # when the GPS last applied an update

  def arrive(t, delta, n, reply):
    """A pseudo-gradient holding n inner steps reaches the GPS at t: applied, evaluated when
    due, and the new params sent back over the WAN (``reply``, arriving at t + wan)."""
    nonlocal gps, gps_opt, end, done_steps, messages
    gps, gps_opt = apply(gps, gps_opt, delta)
    end = t
    done_steps += n
    maybe_eval(t, gps)
    push(t + wan, *reply(gps))
    messages += 1

  def start(w, from_params, t):
    out = workers.phase(w, from_params, t)
    if out is not None:
      push(t + duration(w, out[1]), "done", (w, *out))

  if mode == "async":
    for w in range(num):
      start(w, gps, 0.0)
    while heap:
      t, _, kind, data = heapq.heappop(heap)
      if kind == "done":  # the worker's pseudo-gradient crosses the WAN
        push(t + wan, "arrive", data)
        messages += 1
      elif kind == "arrive":  # applied on arrival; the params go back to the worker
        w, delta, n = data
        arrive(t, delta, n, lambda g, w=w: ("restart", (w, g)))
      else:
        start(data[0], data[1], t)
    maybe_eval(end, gps, force=not evals or evals[-1]["steps"] != done_steps)
    return Result(gps, workers.losses, evals, end, messages, workers.started)

  # HALoS
  s = settings
  per = num // s.regions
  local = s.local_tx()
  regions = [halos.region_init(local, params) for _ in range(s.regions)]
  region_step = jax.jit(functools.partial(halos.region_apply, local))
  merge = jax.jit(halos.region_merge, static_argnums=2)
  since = [0] * s.regions  # worker updates since the region's last merge
  pending = [0] * s.regions  # inner steps the region holds that have not gone to the GPS
  for w in range(num):
    start(w, regions[w // per].params, 0.0)
  t = 0.0
  while heap:
    t, ready = heap[0][0], []
    while heap and heap[0][0] <= t:
      _, _, kind, data = heapq.heappop(heap)
      if kind == "done":  # a worker's pseudo-gradient at its LPS (no WAN)
        w, delta, n = data
        r = w // per
        regions[r] = region_step(regions[r], delta)
        since[r] += 1
        pending[r] += n
        ready.append(w)
        if since[r] == s.k:  # the region's progress to the GPS; the LPS goes on meanwhile
          push(t + wan, "gps", (r, halos.region_outgoing(regions[r]), pending[r]))
          pending[r] = 0
          messages += 1
      elif kind == "gps":  # the region's progress applied; the params go back to its LPS
        r, delta, n = data
        arrive(t, delta, n, lambda g, r=r: ("merge", (r, g)))
      else:  # the GPS's params at the LPS
        r, theta = data
        regions[r] = merge(regions[r], theta, s.alpha)
        since[r] = 0
    for w in ready:
      start(w, regions[w // per].params, t)
  for r in range(s.regions):  # the final flush: what each LPS holds that the GPS has not
    if since[r]:
      gps, gps_opt = apply(gps, gps_opt, halos.region_outgoing(regions[r]))
      done_steps += pending[r]
      messages += 1
  if any(since):  # sent when the last phase ended
    end = max(end, t + wan)
  maybe_eval(end, gps, force=not evals or evals[-1]["steps"] != done_steps)
  return Result(gps, workers.losses, evals, end, messages, workers.started)


def run(config, mode: str, evaluate_every: int | None = None,
        max_time: float | None = None) -> Result:
  """``simulate`` on the transformer LM of ``config``: ``islands.num`` workers of
  ``outer.sync_every`` steps, ``data.batch_size`` rows each (worker w reads partition w), the
  inner optimizer and learning-rate schedule of ``config.inner``, ``islands.num x total_steps``
  inner steps in all (``max_time``: as many as start before that simulated time), evaluated
  every ``eval_every`` steps of one worker's worth; timing from
  ``islands.step_seconds`` (0: 1 s) and ``islands.speed``; HALoS from ``outer.halos_*``;
  ``async`` and ``sync`` take the GPS's optimizer from ``config.outer`` (Delayed Nesterov with
  ``outer.delay_every``, 0 = M; DiLoCo's Nesterov)."""
  # pylint: disable=g-import-not-at-top  (the LM's pieces only for an LM run)
  from jax.sharding import NamedSharding, PartitionSpec as P
  from fedjax_lm import data as data_lib, input as input_lib, mesh as mesh_lib
  from fedjax_lm import model as model_lib, outer, steps, train as train_lib
  from fedjax_lm.decoupled import island as island_lib
  from fedjax_lm.outer import delayed
  num, total = int(config.islands.num), int(config.total_steps)
  settings = halos.Settings.from_config(config.outer)
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  graphdef, _ = model_lib.build(model_cfg)
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tokenizer = data_lib.get_tokenizer(config.data.tokenizer)
  params = model_lib.init_params(model_cfg, jax.random.key(int(config.seed)))
  tx = steps.inner_optimizer(config.inner, total,
                             muon_dims=steps.muon_dimensions(model_lib.logical_axes(model_cfg)))
  train_step = jax.jit(steps.make_train_step(functools.partial(steps.mean_loss, graphdef), tx))
  feeds = [input_lib.TrainBatches(config.data, mesh, num_islands=1, seed=int(config.seed),
                                  tokenizer=tokenizer, part=(w, num)) for w in range(num)]
  next_batch = lambda w: jax.tree.map(lambda x: x[0], next(feeds[w]))
  evaluator = train_lib.Evaluator(config, mesh, graphdef, jax.tree.map(
      lambda _: NamedSharding(mesh, P()), params), tokenizer)
  hp = outer.resolved_hparams(config.outer)
  if mode == "async":
    outer_tx = delayed.delayed_nesterov(hp["learning_rate"], hp.get("momentum", 0.0),
                                        int(config.outer.delay_every) or num)
  else:
    outer_tx = optax.sgd(hp["learning_rate"], hp.get("momentum", 0.0) or None, nesterov=True)
  every = int(config.eval_every) * num if evaluate_every is None else evaluate_every
  speeds = island_lib.speeds(config)[:num]
  return simulate(mode, num=num, h=int(config.outer.sync_every), params=params,
                  init_opt=tx.init, train_step=train_step, next_batch=next_batch,
                  budget=num * total if max_time is None else 10**12, step_seconds=float(config.islands.step_seconds) or 1.0,
                  speeds=speeds, settings=settings, outer_tx=outer_tx,
                  evaluate=lambda p: {"eval_loss": evaluator(p)["eval_loss"]},
                  eval_every=every, max_time=max_time)
