"""Training loop: config -> mesh -> algorithm -> data -> (resume) -> steps, evals, checkpoints.

Every process runs exactly the same jitted computations in the same order (the collectives of
a multi-process run must match); only process 0 writes metrics. Inside the loop nothing goes
device -> host implicitly (a transfer guard enforces it); losses are fetched explicitly at log
steps only.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lm import cpu
from fedjax_lm import checkpoint as ckpt_lib
from fedjax_lm import config_lib
from fedjax_lm import data as data_lib
from fedjax_lm import faults
from fedjax_lm import health
from fedjax_lm import input as input_lib
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import model as model_lib
from fedjax_lm import outer
from fedjax_lm import steps


def _fetch(x: jax.Array) -> np.ndarray:
  """Explicit host copy of a replicated (possibly multi-process) array."""
  return np.asarray(jax.device_get(x.addressable_data(0)))


class Evaluator:
  """Validation loss of a params pytree, in nats per text byte (and per token)."""

  def __init__(self, config, mesh, graphdef, params_sharding, tokenizer):
    rows = int(config.eval_batch_size)
    self.batches = input_lib.eval_batches(config.data, mesh, tokenizer=tokenizer, rows=rows,
                                          max_batches=int(config.eval_batches))
    replicated = NamedSharding(mesh, P())
    batch_sharding = self.batches[0]["inputs"].sharding if self.batches else None
    token_bytes = jax.device_put(jnp.asarray(tokenizer.token_bytes(), jnp.float32), replicated)
    step = steps.make_eval_step(graphdef, token_bytes)
    self._step = cpu.jit_step(step, mesh, in_shardings=(params_sharding, batch_sharding),
                              out_shardings=replicated)

  def __call__(self, params) -> dict[str, float]:
    total = None
    for batch in self.batches:
      out = self._step(params, batch)
      total = out if total is None else total + out
    nll, tokens, nbytes = (float(v) for v in _fetch(total))
    per_byte = nll / max(nbytes, 1.0)
    return {"eval_loss": per_byte, "eval_perplexity": float(np.exp(per_byte)),
            "eval_loss_per_token": nll / max(tokens, 1.0), "eval_tokens": int(tokens)}


def _check_health(writer, max_failures: int, name: str, island_ok: np.ndarray | None,
                  done: int, failures_in_a_row) -> int:
  """Warns naming the step and island of every skipped non-finite step in ``island_ok``
  (``[steps, M]``, the steps up to ``done``); raises :class:`health.NonFiniteError` once
  nothing healthy was applied ``max_failures`` syncs (DDP: steps) in a row. Returns the count."""
  bad = [] if island_ok is None else list(zip(*np.nonzero(~island_ok.astype(bool))))
  first = done - (0 if island_ok is None else len(island_ok)) + 1
  for row, island in bad:
    writer.print(f"[fedjax_lm] warning: non-finite loss or gradient on island {island} at "
                 f"step {first + row}: " + ("step skipped" if name == "ddp" else
                 "step skipped; the island is left out of its next sync and restarts from "
                 "the global params"))
  if int(failures_in_a_row) >= max_failures:
    what = "steps" if name == "ddp" else "syncs"
    raise health.NonFiniteError(
        f"nothing finite to apply for {int(failures_in_a_row)} {what} in a row (step {done}, "
        f"islands.max_nonfinite={max_failures}); stopping with the last checkpoint intact")
  return len(bad)


class _Run(NamedTuple):
  """What the loop of one :func:`train` call works with (built once, before the first step)."""
  config: Any
  workdir: str
  alg: Any  # engine.Algorithm
  mesh: Any
  batches: input_lib.TrainBatches
  evaluate: Evaluator
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  preemption: ckpt_lib.PreemptionWatch
  layout: dict
  tokens_per_step: int


def _restore_or_init(alg, checkpointer, batches, layout, seed: int) -> tuple[int, Any]:
  """(start step, state): the latest restorable checkpoint's (the data position too), or
  step 0 and a fresh init."""
  key = jax.random.key(seed)
  if checkpointer.latest_step() is not None:
    abstract = ckpt_lib.abstract_like(jax.eval_shape(alg.init, key), alg.state_shardings)
    start, state = checkpointer.restore_latest(abstract, batches, layout, alg.clock_state)
    if start is None:
      raise RuntimeError(f"no checkpoint in {checkpointer.directory} could be restored (each "
                         "was moved aside to corrupt_checkpoints/); use another --workdir")
    return start, state
  return 0, alg.init(key)


def _announce(run: _Run, abstract_params, start: int) -> None:
  """The run's first lines: what trains where, and any outer hparams set for another
  optimizer."""
  alg, config = run.alg, run.config
  run.writer.print(
      f"[fedjax_lm] {alg.name}: {alg.num_islands} island(s), H={alg.sync_every or '-'}, "
      f"{model_lib.count_params(abstract_params) / 1e6:.2f}M params, mesh {dict(run.mesh.shape)} "
      f"on {jax.device_count()} devices / {jax.process_count()} processes, "
      f"{run.tokens_per_step} tokens/step, " +
      (f"resumed at step {start}" if start else "fresh start"))
  if config.algorithm == "islands" and outer.ignored_hparams(config.outer):
    run.writer.print(f"[fedjax_lm] note: outer {outer.ignored_hparams(config.outer)} were set "
                     f"for outer.hparams_for={config.outer.hparams_for!r}, not used by "
                     f"outer.optimizer={config.outer.optimizer!r}: its defaults "
                     f"{outer.resolved_hparams(config.outer)} apply")


def _record(run: _Run, state, pending, pending_ok, check_health, replicate, done: int,
            since: tuple[float, int]) -> dict[str, Any]:
  """The metrics record of a log step: the mean losses of the steps since the last one (each
  skipped non-finite step warned about), bytes sent, and throughput since ``since``
  (time, step)."""
  alg = run.alg
  island_loss = np.stack([_fetch(replicate(x)) for x in pending]).mean(axis=0)
  island_ok = np.stack([_fetch(replicate(x)) for x in pending_ok])
  nonfinite = check_health(island_ok, done, _fetch(alg.failures_in_a_row(state)))
  now = time.time()
  return {"step": done, "tokens": done * run.tokens_per_step,
          "train_loss": float(np.nanmean(island_loss)) if nonfinite else
                        float(island_loss.mean()),
          "island_loss": [float(x) for x in island_loss],
          "island_bytes": alg.island_bytes(done),
          "island_peak_bytes": alg.island_peak_bytes(done),
          "island_control_bytes": alg.island_control_bytes(done),
          "nonfinite": nonfinite,
          "tokens_per_sec": (done - since[1]) * run.tokens_per_step / max(now - since[0], 1e-9)}


def _checkpoint(run: _Run, state, done: int, check_health):
  """Saves after ``done`` steps with in-flight host exchanges landed (the returned state);
  stops first if nothing healthy was applied too many syncs in a row."""
  state = run.alg.settle(state)
  check_health(None, done, _fetch(run.alg.failures_in_a_row(state)))
  run.checkpointer.save(done, state, run.batches, force=True, layout=run.layout,
                        clock=run.alg.clock_state(done))
  return state


def _loop(run: _Run, state, start: int) -> tuple[dict[str, Any], int, bool]:
  """Steps ``start`` .. ``total_steps`` (or to a preemption): inner steps, syncs, logs, evals,
  checkpoints and the configured faults. Returns (last record, steps done, preempted)."""
  config, alg = run.config, run.alg
  total = int(config.total_steps)
  plan, role = faults.Plan.from_config(config), f"process/{jax.process_index()}"
  replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(run.mesh, P()))
  pending: list[jax.Array] = []
  pending_ok: list[jax.Array] = []
  check_health = functools.partial(_check_health, run.writer, int(config.islands.max_nonfinite),
                                   alg.name)
  record: dict[str, Any] = {}
  since, preempted, done = (time.time(), start), False, start
  with jax.transfer_guard_device_to_host("disallow"):
    for step in range(start, total):
      batch = next(run.batches)
      if bad := plan.nonfinite_islands(step + 1):  # faults.nonfinite: a bad batch
        batch = health.poison(batch, np.isin(np.arange(alg.num_islands), bad))
      state, step_metrics = alg.inner_step(state, batch)
      done = step + 1
      state = alg.sync(state, done)
      pending.append(step_metrics["island_loss"])
      pending_ok.append(step_metrics["island_ok"])
      run.writer.step()
      is_eval = done % config.eval_every == 0 or done == total
      if done % config.log_every == 0 or is_eval:
        record = _record(run, state, pending, pending_ok, check_health, replicate, done, since)
        if is_eval:  # the global model with every exchange sent so far applied
          state = alg.settle(state)
          record.update(run.evaluate(alg.eval_params(state)))
        run.writer.write(record)
        pending, pending_ok, since = [], [], (time.time(), done)
      preempted = run.preemption.reached(done)
      if done % config.checkpoint_every == 0 or done == total or preempted:
        state = _checkpoint(run, state, done, check_health)
      # faults.kill / faults.mtbf_steps: SIGKILL once the checkpoints started are written
      plan.maybe_kill(role, done, run.workdir, before=run.checkpointer.wait)
      if preempted and done < total:
        break
  return record, done, preempted


def train(config, workdir: str, devices=None, outer_tx=None) -> dict[str, Any]:
  """Runs (or resumes) training as configured; returns the last metrics record.
  ``devices`` defaults to all devices of the job; ``outer_tx`` (any optax transform) replaces
  the outer optimizer named by ``config.outer``."""
  config_lib.validate(config)
  if int(config.outer.halos_regions):
    raise ValueError(f"outer.halos_regions={config.outer.halos_regions}: HALoS's tiers are "
                     "syncer processes (--config.launch.mode=decoupled) or a timing model "
                     "(`python -m experiments.halos --config ...`), not the mesh-axis loop")
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  tokenizer = data_lib.get_tokenizer(config.data.tokenizer)
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}, "
                     f"data.tokenizer={config.data.tokenizer!r})")
  alg = engine.build(config, mesh, model_cfg, outer_tx=outer_tx)
  graphdef, abstract_params = model_lib.build(model_cfg)
  total = int(config.total_steps)
  batches = input_lib.TrainBatches(config.data, mesh, num_islands=alg.num_islands,
                                   tokenizer=tokenizer, seed=int(config.seed))
  evaluate = Evaluator(config, mesh, graphdef, alg.params_sharding, tokenizer)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint_every, config.keep_checkpoints)
  layout = config_lib.layout(config)
  start, state = _restore_or_init(alg, checkpointer, batches, layout, int(config.seed))

  preemption = ckpt_lib.PreemptionWatch()
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0,
                                     total_steps=total, start_step=start)
  run = _Run(config, workdir, alg, mesh, batches, evaluate, checkpointer, writer, preemption,
             layout, int(np.prod(batches.shape)))
  _announce(run, abstract_params, start)
  try:  # on any exit, an error's too, the save in flight is finished and the manager shut
    record, done, preempted = _loop(run, state, start)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    preemption.close()
  if preempted and done < total:
    raise ckpt_lib.Preempted(done)
  return record
