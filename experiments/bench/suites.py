"""The ``quick`` / ``full`` bench suites: a methods table and sweeps on Shakespeare.

Every run is ``configs/shakespeare_diloco.py`` (its defaults: inner AdamW, outer optimizer and
H) with the M islands simulated on one device (island axis 1, the fast path: the same numerics
as one island per device, no collectives), resized per suite and overridden per run. All runs of
a suite see the same tokens: global batch ``rows`` x ``seq_len`` per step (``rows / M`` per
island), ``steps`` steps. ``quick`` uses a 2-layer d=64 model on 64-byte rows; ``full`` the
config's own model and rows.

Worker side: ``train_run`` (one sweep run), ``method_train`` / ``methods_timing`` (a methods-table
row: the training run; the jitted inner step timed against the plain data-parallel step of the
same model and per-device batch, one outer sync, the outer state's bytes per device) and
``layout_bytes``; ``python -m experiments.bench.suites '<json spec>'`` runs one worker. The parent
side (planning the runs as jobs, running them, resuming) is :mod:`experiments.bench.jobs`, the
report :mod:`experiments.bench.report`; the command is ``python -m experiments.bench --suite
quick|full``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

from experiments.bench import memory
from experiments.bench import step

BASE = "configs/shakespeare_diloco.py"
SIMULATED = {"mesh.island": 1, "mesh.data": 1, "launch.mode": "none", "launch.processes": 1,
             "checkpoint_every": 10**9}
RESUMABLE = ("full",)  # suites whose runs checkpoint at every eval and resume when re-run
# The full suite's sweeps, most telling first: the goals' spread, then H, outer lr, M, ...
FULL_ORDER = ("seed", "H", "outer_lr", "M", "momentum", "inner_lr", "partition", "codec")
PATH = "simulated (island axis 1)"
# The quick suite's model (also ``gpu``'s ``tiny``).
TINY = {"model.num_layers": 2, "model.embed_dim": 64, "model.num_heads": 2,
        "model.num_kv_heads": 2, "model.head_dim": 32, "model.mlp_dim": 192,
        "model.max_len": 64, "data.seq_len": 64}
SUITES = {
    # rows: global rows per step; P: Streaming fragments (divides the layer count)
    "smoke": dict(steps=8, eval_every=4, rows=4, eval_batches=1, model=TINY, P=2, H=4,
                  lrs=(0.7,), Hs=(4,), Ms=(1, 2), inner_lrs=(), momenta=(), codecs=(),
                  partitions=(), mh=((2, 4),), h_lrs=(0.7,), seeds=()),
    "quick": dict(steps=300, eval_every=50, rows=16, eval_batches=2, model=TINY, P=2, H=50,
                  lrs=(0.1, 0.3, 0.7, 1.0), Hs=(1, 10, 50, 150), Ms=(1, 2, 4, 8),
                  inner_lrs=(1e-3, 3e-3, 1e-2, 2e-2), momenta=(0.0, 0.5, 0.8, 0.9, 0.95),
                  codecs=("bf16", "int4", "topk"), partitions=("by_play", "by_genre"),
                  mh=((2, 10), (2, 50), (1, 10), (4, 10)), h_lrs=(0.3, 0.7), seeds=(1, 2)),
    "full": dict(steps=1000, eval_every=100, rows=32, eval_batches=8, model={}, P=4, H=50,
                 lrs=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0), Hs=(1, 5, 10, 25, 50, 100, 250),
                 Ms=(1, 2, 4, 8), inner_lrs=(1e-3, 2e-3, 3e-3, 6e-3, 1e-2),
                 momenta=(0.0, 0.5, 0.8, 0.9, 0.95), codecs=("bf16", "int8", "int4", "topk"),
                 partitions=("by_play", "by_genre"),
                 mh=((2, 10), (2, 25), (2, 50), (1, 10), (1, 50), (4, 10), (8, 10)),
                 h_lrs=(0.3, 0.5, 0.7), seeds=(1, 2)),
}


def suite_overrides(suite: str, run: dict) -> dict:
  """Dotted overrides of ``BASE`` for one run of ``suite`` (``run``: dotted overrides; the
  per-island batch is ``rows / islands.num`` unless the run sets it)."""
  s = SUITES[suite]
  m = int(run.get("islands.num", 2))
  out = {**SIMULATED, **s["model"], "total_steps": s["steps"], "eval_every": s["eval_every"],
         "log_every": s["eval_every"], "eval_batches": s["eval_batches"],
         "data.batch_size": max(s["rows"] // m, 1)}
  out.update(run)
  return out


def _key(run: dict, suite: str = "quick") -> str:
  """The run's identity: the resolved values of the fields that define it (so a run with a
  value equal to a default is the same run, and a changed default is a new one)."""
  from fedjax_lm import outer  # pylint: disable=g-import-not-at-top
  c = _config(suite_overrides(suite, run))
  out = {"algorithm": c.algorithm, "M": int(c.islands.num), "rows": int(c.data.batch_size),
         "steps": int(c.total_steps), "partition": c.data.partition,
         "inner": [c.inner.optimizer, float(c.inner.learning_rate), int(c.inner.warmup_steps)],
         "model": dict(c.model), "seq": int(c.data.seq_len)}
  if int(c.seed) != 0:  # seed 0 keeps the keys of the runs recorded before seeds were swept
    out["seed"] = int(c.seed)
  if c.algorithm == "islands":
    out["outer"] = {**{k: c.outer[k] for k in (
        "optimizer", "sync_every", "fragments", "overlap", "mixing", "eager", "compression",
        "error_feedback", "topk_bits", "reset_inner_opt_state")},
                    **outer.resolved_hparams(c.outer)}
    # The later methods' keys only where they are in use (absent otherwise: the keys recorded
    # before them stay)
    if c.outer.gossip != "none":
      out["outer"].update(gossip=c.outer.gossip, gossip_gamma=c.outer.gossip_gamma)
    if c.outer.compression == "demo":
      out["outer"].update({k: c.outer[k] for k in (
          "demo_chunk", "demo_topk", "demo_2d", "demo_sign")})
      if c.outer.demo_aggregate != "mean":  # (keys recorded before it stay)
        out["outer"]["demo_aggregate"] = c.outer.demo_aggregate
    if c.outer.desloc_mu_every or c.outer.desloc_nu_every:
      out["outer"].update({k: int(c.outer[k]) for k in ("desloc_mu_every", "desloc_nu_every")})
    if c.outer.optimizer == "heloco":
      out["outer"].update({f"heloco_{k}": float(c.outer[f"heloco_{k}"]) for k in (
          "c_ok", "k_s", "beta_max", "k_d", "kappa", "eps")})
    if c.outer.delay != "none":
      out["outer"]["delay"] = c.outer.delay
  return json.dumps(out, sort_keys=True)


def methods(suite: str) -> list[tuple[str, dict]]:
  """(name, dotted overrides) of the methods table; the first is DDP."""
  s = SUITES[suite]
  h, p = s["H"], s["P"]
  stream = {"outer.sync_every": h, "outer.fragments": p, "outer.overlap": 2,
            "outer.mixing": 0.5}
  rows = [
      ("DDP (M=2)", {"algorithm": "ddp"}),
      (f"FedAvg (M=2, H={h})", {"outer.optimizer": "fedavg", "outer.sync_every": h}),
      (f"DiLoCo (M=2, H={h}), paper outer 0.7 / 0.9",
       {"outer.sync_every": h, "outer.learning_rate": 0.7, "outer.momentum": 0.9}),
      (f"DiLoCo (M=2, H={h}), config defaults", {"outer.sync_every": h}),
      ("DiLoCo (M=2), config defaults (its H)", {}),
      ("DDP (M=1)", {"algorithm": "ddp", "islands.num": 1}),
      ("DiLoCo (M=1), config defaults", {"islands.num": 1}),
      (f"Streaming (P={p}, tau=2, alpha=0.5), f32", stream),
      (f"Streaming (P={p}) + int4", {**stream, "outer.compression": "int4"}),
      # configs/shakespeare_demo.py's method: every step, Psyche's compressor (outer.demo_*
      # defaults: 64 x 64 DCT tiles, top-8, 1-bit signs), momentum 0.999, sign-SGD
      ("DeMo (M=2, H=1, DCT 64x64 top-8 1-bit, beta 0.999), sign-SGD lr 3e-3",
       {"inner.optimizer": "sgd", "inner.learning_rate": 1.0, "outer.sync_every": 1,
        "outer.optimizer": "sign_sgd", "outer.learning_rate": 3e-3, "outer.momentum": None,
        "outer.hparams_for": "sign_sgd", "outer.compression": "demo",
        "outer.error_feedback": 0.999}),
      # configs/shakespeare_noloco.py's method: one random peer per sync, no all-reduce
      (f"NoLoCo (M=4, H={h}, one random peer), heavy-ball 0.7 / 0.5",
       {"islands.num": 4, "outer.sync_every": h, "outer.gossip": "noloco",
        "outer.optimizer": "sgd", "outer.learning_rate": 0.7, "outer.momentum": 0.5,
        "outer.hparams_for": "sgd"}),
      # NoLoCo's baseline: the same islands and outer step with the all-reduce (DiLoCo with
      # heavy-ball momentum; NoLoCo with M=2 is this)
      (f"DiLoCo (M=4, H={h}), heavy-ball 0.7 / 0.5",
       {"islands.num": 4, "outer.sync_every": h, "outer.optimizer": "sgd",
        "outer.learning_rate": 0.7, "outer.momentum": 0.5, "outer.hparams_for": "sgd"}),
  ]
  # DES-LOC at the paper's ratios K_u = 3H, K_v = 6H (configs/shakespeare_desloc.py). At H=50
  # K_v = 300 averages nu 3 times in 1,000 steps but never in 300, so the quick suite (and
  # smoke) run H=10, K_u=30, K_v=60: mu averaged 9 times, nu 4 times in 300 steps; its
  # DiLoCo baseline is the same H.
  hd = h if suite == "full" else 10
  rows.append((f"DES-LOC (M=2, H={hd}, K_u={3 * hd}, K_v={6 * hd})",
               {"outer.sync_every": hd, "outer.desloc_mu_every": 3 * hd,
                "outer.desloc_nu_every": 6 * hd}))
  if hd != h:
    rows.append((f"DiLoCo (M=2, H={hd}), config defaults", {"outer.sync_every": hd}))
  # HeLoCo (outer.optimizer=heloco) corrects the stale mean of the one-round-late outer step
  # (outer.delay=naive, Kale et al.) before the config's Nesterov 0.7 / 0.5; beside it the
  # plain delayed DiLoCo it corrects
  rows.append((f"Delayed DiLoCo (M=2, H={h}, naive delay), config defaults",
               {"outer.delay": "naive"}))
  rows.append((f"HeLoCo (M=2, H={h}, naive delay), Nesterov 0.7 / 0.5",
               {"outer.delay": "naive", "outer.optimizer": "heloco",
                "outer.hparams_for": "heloco"}))
  if suite == "full":
    rows.append(("SparseLoCo (H=15, top-k 2-bit, EF 0.95)",
                 {"outer.optimizer": "fedavg", "outer.sync_every": 15,
                  "outer.compression": "topk", "outer.error_feedback": 0.95}))
  if suite == "smoke":
    rows = [rows[0], rows[3]]
  return rows


# The sweeps vary one knob around the DiLoCo paper's outer optimizer (Nesterov 0.7 / 0.9), not
# around the config's tuned defaults, so each sweep reads against the paper's setting; the
# ``seed`` sweep repeats the goals' rows (the config's defaults) to measure their spread.
PAPER_OUTER = {"outer.learning_rate": 0.7, "outer.momentum": 0.9}


def sweeps(suite: str) -> list[tuple[str, str, object, dict]]:
  """(sweep, series, x, dotted overrides) of every sweep point (DiLoCo's around
  ``PAPER_OUTER``)."""
  return [(sweep, series, x, over if sweep == "seed" else {**PAPER_OUTER, **over})
          for sweep, series, x, over in _sweep_points(suite)]


def config_outer() -> dict:
  """The config's own outer lr and momentum, as overrides (they win over ``PAPER_OUTER``)."""
  c = _config({})
  return {"outer.learning_rate": float(c.outer.learning_rate),
          "outer.momentum": float(c.outer.momentum)}


# (series, overrides) of the ``seed`` sweep: the methods rows that the goals read.
SEED_SERIES = (("DDP (M=2)", {"algorithm": "ddp"}),
               ("DiLoCo (M=2), config defaults", {}),
               ("DDP (M=1)", {"algorithm": "ddp", "islands.num": 1}),
               ("DiLoCo (M=1), config defaults", {"islands.num": 1}))


def _sweep_points(suite: str) -> list[tuple[str, str, object, dict]]:
  s = SUITES[suite]
  out = [("M", "DDP", 2, {"algorithm": "ddp"})]
  for m, h in s["mh"]:  # outer lr for each (M, H)
    for lr in s["lrs"]:
      out.append(("outer_lr", f"M={m}, H={h}", lr, {"islands.num": m, "outer.sync_every": h,
                                                   "outer.learning_rate": lr}))
  for h in s["Hs"]:  # H, FedAvg and DiLoCo at two outer lrs
    out.append(("H", "FedAvg", h, {"outer.optimizer": "fedavg", "outer.sync_every": h}))
    for lr in s["h_lrs"]:
      out.append(("H", f"DiLoCo lr {lr}", h, {"outer.sync_every": h,
                                              "outer.learning_rate": lr}))
  for m in s["Ms"]:  # M at fixed global batch and tokens, the config's outer defaults
    out.append(("M", "DiLoCo (0.7 / 0.9)", m, {"islands.num": m}))
    out.append(("M", "FedAvg", m, {"islands.num": m, "outer.optimizer": "fedavg"}))
  for mu in s["momenta"]:
    out.append(("momentum", "DiLoCo (M=2)", mu, {"outer.momentum": mu}))
  for lr in s["inner_lrs"]:
    out.append(("inner_lr", "DDP", lr, {"algorithm": "ddp", "inner.learning_rate": lr}))
    out.append(("inner_lr", "FedAvg", lr, {"outer.optimizer": "fedavg",
                                           "inner.learning_rate": lr}))
    out.append(("inner_lr", "DiLoCo", lr, {"inner.learning_rate": lr}))
    out.append(("inner_lr", "DiLoCo (config defaults)", lr,
                {"inner.learning_rate": lr, **config_outer()}))
  for part in ("iid", *s["partitions"]):
    for name, over in (("FedAvg", {"outer.optimizer": "fedavg"}), ("DiLoCo", {})):
      out.append(("partition", name, part, {**over, "data.partition": part}))
  for codec in ("none", *s["codecs"]):
    over = {"outer.compression": codec}
    if codec == "topk":
      over.update({"outer.error_feedback": 0.95})
    out.append(("codec", "DiLoCo (M=2)", codec, over if codec != "none" else {}))
  if s["seeds"]:  # seed 0 is the methods row itself
    for seed in (0, *s["seeds"]):
      for series, over in SEED_SERIES:
        out.append(("seed", series, seed, {**over, "seed": seed} if seed else over))
  return out


# ----------------------------------------------------------------------------- worker side

def _setup_cache(cache_dir: str | None) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _config(overrides: dict):
  return step.load_config(BASE, overrides)


def checkpointed_step(workdir: str) -> int:
  """The last complete checkpoint's step in ``workdir`` (0 if none)."""
  d = os.path.join(workdir, "checkpoints")
  return max((int(n) for n in os.listdir(d) if n.isdigit()), default=0) if os.path.isdir(
      d) else 0


def train_run(suite: str, run: dict, workdir: str, resume: bool = False) -> dict:
  """One training run in this process; its eval curve, bytes and wall time. ``resume``: it
  checkpoints at every eval and continues from ``workdir``'s last checkpoint (exactly: the
  same losses as a run never stopped); its ``run_wall_s`` is then this process's part only."""
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lm import simulate  # pylint: disable=g-import-not-at-top
  over = suite_overrides(suite, run)
  if resume:
    over["checkpoint_every"] = over["eval_every"]
  config = _config(over)
  resumed_at = checkpointed_step(workdir) if resume else 0
  start = time.time()
  records = simulate.run(config, workdir, fresh=not resume)
  wall = time.time() - start
  evals = [r for r in records if "eval_loss" in r]
  last = records[-1]
  return {"suite": suite, "key": _key(run, suite), "run": run, "overrides": over, "path": PATH,
          "eval_steps": [r["step"] for r in evals], "eval_tokens": [r["tokens"] for r in evals],
          "eval_losses": [r["eval_loss"] for r in evals], "eval_loss": last["eval_loss"],
          "tokens": last["tokens"], "island_bytes": last["island_bytes"],
          "island_peak_bytes": last["island_peak_bytes"], "run_wall_s": wall,
          "tokens_per_sec": last["tokens_per_sec"], "resumed_at_step": resumed_at,
          "jax": jax.__version__, "device": jax.devices()[0].device_kind}


def method_train(suite: str, run: dict, workdir: str, resume: bool = False) -> dict:
  """A methods-table row's training part, with its peak host (and device) memory."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  gc.collect()  # the previous run's arrays go before the peak is reset
  memory.peak_rss_reset()
  row = train_run(suite, run, workdir, resume)
  row["peak_rss_bytes"] = memory.peak_rss_bytes()
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  row["peak_device_bytes"] = (stats or {}).get("peak_bytes_in_use")
  return row


def inner_program(over: dict) -> str:
  """What the inner-step program of a run with (resolved) overrides ``over`` depends on: runs
  that share it run the same compiled step."""
  c = _config(over)
  return json.dumps([c.algorithm, int(c.islands.num), int(c.data.batch_size),
                     dict(c.inner), dict(c.model), int(c.data.seq_len)], sort_keys=True)


def methods_timing(suite: str, runs: list[dict], timing_steps: int = 10, rounds: int = 5,
                   repeats: int = 5) -> list[dict]:
  """The methods-table rows' timing part (on an otherwise idle machine): each run's jitted
  inner step (M islands, one device) and one outer sync; one island's step against the plain
  data-parallel step of the same model and per-device batch (on the real layout each island
  has its own devices), interleaved rounds, median; timed once per distinct one-island program
  (FedAvg, DiLoCo and Streaming islands run the same one); the outer state's bytes per device."""
  import statistics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  stepper = lambda o: step.Stepper({"config": BASE, "overrides": o})
  median_of = lambda s: statistics.median(s.time(timing_steps, repeats))  # of the windows
  pairs, rows = {}, []
  for run in runs:
    over = suite_overrides(suite, run)
    sim = stepper(over)
    row = {"key": _key(run, suite), "sim_step_s": median_of(sim), "sync_s": sim.sync_s(),
           "flops_per_token": model_lib.train_flops_per_token(sim.model_cfg, sim.seq_len),
           "tokens_per_step": sim.tokens_per_step, "dp_step_s": None,
           "step_s": None, **memory.outer_state_bytes(over, jax.devices()[:1])}
    del sim
    if over.get("algorithm") == "ddp":
      row["step_s"] = row["sim_step_s"] / int(over.get("islands.num", 2))
    else:
      one = {**over, "islands.num": 1}
      if inner_program(one) not in pairs:
        own_step, dp_step = stepper(one), stepper({**one, "algorithm": "ddp"})
        own, dp = [], []
        for _ in range(rounds):
          own.append(median_of(own_step))
          dp.append(median_of(dp_step))
        pairs[inner_program(one)] = statistics.median(own), statistics.median(dp)
      row["step_s"], row["dp_step_s"] = pairs[inner_program(one)]
    rows.append(row)
  return rows


def method_run(suite: str, run: dict, workdir: str, timing_steps: int = 10, rounds: int = 5,
               repeats: int = 5) -> dict:
  """A whole methods-table row in this process: ``method_train`` then ``methods_timing``."""
  return {**method_train(suite, run, workdir),
          **methods_timing(suite, [run], timing_steps, rounds, repeats)[0]}


def layout_bytes(suite: str, runs: list[dict]) -> list[dict]:
  """Outer-state bytes per device for each run on the config's own layout (its mesh)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  base = config_lib.load_file(BASE)
  mesh = {"mesh.island": int(base.mesh.island), "mesh.data": int(base.mesh.data)}
  out = []
  for run in runs:
    over = suite_overrides(suite, run)
    m = int(over.get("islands.num", base.islands.num))
    lay = {**mesh, "mesh.island": mesh["mesh.island"] if m % mesh["mesh.island"] == 0 else 1}
    need = lay["mesh.island"] * lay["mesh.data"]
    out.append({"key": _key(run, suite), "layout": f"{lay['mesh.island']} island axis x "
                f"{lay['mesh.data']} devices",
                **memory.outer_state_bytes({**over, **lay}, jax.devices()[:need])})
  return out


def _claimed(queue: str, i: int) -> bool:
  """Atomically claims job ``i`` of ``queue`` for this process; False if another has it."""
  try:
    os.close(os.open(f"{queue}.claim{i}", os.O_CREAT | os.O_EXCL))
    return True
  except FileExistsError:
    return False


def worker(spec: dict) -> None:
  """Runs ``spec``, appending JSON rows to ``spec['out']``: kind ``queue`` takes the jobs of
  the file ``spec['jobs']`` (``[{kind, runs}]``, kind ``runs`` | ``method_train``) in order,
  each not already claimed by another worker; ``method_timing``, ``layout`` and ``runs`` (training
  runs outside the suite's grid, one after another) run ``spec['runs']``. With
  ``spec['resume_dir']`` a queue's run lives in ``resume_dir/<hash of its key>``: a run killed
  part-way (a session's end) continues from its last checkpoint when the queue runs again,
  and its directory goes once its row is written."""
  if spec.get("one_core") is not None:
    step.pin_one_core(spec["one_core"])
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_xla_defaults()  # before JAX starts
  _setup_cache(spec.get("cache"))
  suite, workdir = spec["suite"], spec["workdir"]

  def emit(kind, row):
    with open(spec["out"], "a") as f:
      f.write(json.dumps({"kind": kind, **row}) + "\n")

  if spec["kind"] == "layout":
    for row in layout_bytes(suite, spec["runs"]):
      emit("layout", row)
  elif spec["kind"] == "method_timing":
    for row in methods_timing(suite, spec["runs"]):
      emit("method_timing", row)
  elif spec["kind"] == "runs":
    for j, run in enumerate(spec["runs"]):
      emit("runs", train_run(suite, run, os.path.join(workdir, f"run{j}")))
  else:
    with open(spec["jobs"]) as f:
      jobs = json.load(f)
    for i, job in enumerate(jobs):
      if not _claimed(spec["jobs"], i):
        continue
      for j, run in enumerate(job["runs"]):
        resume = spec.get("resume_dir") is not None
        wd = (os.path.join(spec["resume_dir"], hashlib.sha1(
            _key(run, suite).encode()).hexdigest()[:16]) if resume else
              os.path.join(workdir, f"run{i}_{j}"))
        row = (method_train if job["kind"] == "method_train" else train_run)(
            suite, run, wd, resume)
        emit(job["kind"], row)
        if resume:
          shutil.rmtree(wd, ignore_errors=True)
        print(f"[{job['kind']}] {row['eval_loss']:.4f} {row['run_wall_s']:.0f}s {run}",
              flush=True)


if __name__ == "__main__":
  worker(json.loads(sys.argv[1]))
