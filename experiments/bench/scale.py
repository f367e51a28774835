"""Real size on an emulated CPU mesh: compile, memory per device, the island HLO check, bytes,
a short training run, the input pipeline's rate, and the WAN testbed's link ratio.

Each command emulates ``--devices N`` CPU devices in this one process
(``--xla_force_host_platform_device_count``) and takes a config file plus ``--set key=value``
overrides (the same keys as ``--config.key=value`` of ``experiments.train``):

  # compile only (abstract state, nothing allocated): the cluster layout of c4_150m
  python -m experiments.bench.scale compile --config configs/c4_150m.py --devices 32
  # ~20 steps with one outer sync on 2 islands x fsdp 4 x tensor 2 = 16 devices
  python -m experiments.bench.scale run --config configs/c4_150m.py --devices 16 \\
      --set mesh.data=1 mesh.fsdp=4 mesh.tensor=2 data.batch_size=4 data.seq_len=256 \\
      outer.sync_every=10 total_steps=20 inner.warmup_steps=2 \\
      data.name=local_c4 data.data_dir=/tmp/scale/tfds \\
      data.tokenizer=sentencepiece:/tmp/scale/c4_32k.model
  # tokens/s of the input pipeline (SentencePiece + grain) against one H100 island's need
  python -m experiments.bench.scale pipeline --config configs/c4_150m.py --set ...
  # the WAN testbed's link rate at c4_150m's DDP link/compute ratio on 2 x 8 H100
  python -m experiments.bench.scale wan_ratio
  # item 5's table from testbed runs (experiments.wan single runs) in --run_dir
  python -m experiments.bench.scale wan_table --run_dir runs/scale_wan
  # the tables of experiments/results/scale/summary.md from the JSON files there
  python -m experiments.bench.scale report

``--json FILE`` writes the result. In-process CPU collectives of many devices deadlock when
several programs are in flight at once (measured: 16 devices, two programs queued), so ``run``
blocks on every program before dispatching the next one; that changes no numerics.

Memory: XLA's ``compiled.memory_analysis()`` of each program (per device: arguments, outputs,
aliased (donated) bytes, temporaries), beside an analytic estimate from the state's exact
shard shapes (params, gradients, AdamW moments, global params + outer momentum) plus
activations by Korthikanti et al. 2022 (no recomputation) and the float32 logits. The model
keeps the residual stream's rows split over the island's ``data x fsdp`` devices
(``fedjax_lm.mesh.activation_rows``; the report's "residual rows sharded" column). The CPU
compiler's buffer assignment is not a GPU's or a TPU's (other fusions, no rematerialisation
pass under memory pressure): read the measured figure as the program's own footprint at this
sharding, not as an HBM reading.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

H100_PEAK_BF16 = 989e12  # FLOP/s, dense, SXM


def _set_devices(n: int) -> None:
  """N emulated CPU devices; must run before jax is imported."""
  if "jax" in sys.modules:
    import jax  # pylint: disable=g-import-not-at-top
    if len(jax.devices()) < n:
      raise RuntimeError(f"jax already started with {len(jax.devices())} devices; need {n}")
    return
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def load_config(path: str, overrides: dict[str, Any] | list[str] | None = None):
  """``get_config()`` of ``path`` with dotted overrides (``["a.b=1", ...]`` or a dict)."""
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  if isinstance(overrides, (list, tuple)):
    overrides = dict(kv.split("=", 1) for kv in overrides)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
  c = config_lib.load_file(path)
  c.unlock()
  config_lib.override(c, overrides or {})
  c.launch.mode = "none"
  config_lib.validate(c)
  return c


def build(config, devices=None):
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lm import engine, mesh as mesh_lib, model as model_lib  # pylint: disable=g-import-not-at-top
  devices = list(jax.devices() if devices is None else devices)
  n = math.prod(mesh_lib.mesh_shape(dict(config.mesh), len(devices)))
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices[:n])
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  return mesh, model_cfg, engine.build(config, mesh, model_cfg)


# ------------------------------------------------------------------------ memory, analytic


def _shard_bytes(abstract, shardings) -> int:
  """Bytes of ``abstract``'s leaves on the mesh's first device under ``shardings``."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    dev = next(iter(s.mesh.devices.flat))
    shape = s.shard_shape(a.shape) if dev in s.device_set else (0,)
    total += math.prod(shape) * a.dtype.itemsize
  return int(total)


def analytic_memory(config, mesh, model_cfg, eng) -> dict:
  """Per-device bytes by component (one device of island 0), from shapes and shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  state = jax.eval_shape(eng.init, jax.random.key(0))
  sh = eng.state_shardings
  ddp = config.algorithm == "ddp"
  if ddp:
    params = _shard_bytes(state.params, sh.params)
    inner_opt = _shard_bytes(state.opt_state, sh.opt_state)
    outer = 0
  else:
    params = _shard_bytes(state.islands.params, sh.islands.params)
    inner_opt = _shard_bytes(state.islands.opt_state, sh.islands.opt_state)
    outer = (_shard_bytes(state.server.params, sh.server.params) +
             _shard_bytes(state.server.outer, sh.server.outer))
  grads = params  # float32, sharded like the params
  # Activations kept for the backward pass, per device: Korthikanti et al. 2022 (Eq. 2, no
  # recomputation, tensor parallel t, 2-byte activations): per layer s*b*h*(10 + 24/t) +
  # 5*a*s^2*b/t bytes; our MLP is SwiGLU with F = mlp_dim (their 24 assumes F = 4h: scaled).
  t_axis = mesh.shape["tensor"]
  rows = int(config.data.batch_size) // (mesh.shape["data"] * mesh.shape["fsdp"])
  rows *= int(config.islands.num) // mesh.shape["island"]  # islands per island shard
  s, h, a = int(config.data.seq_len), model_cfg.embed_dim, model_cfg.num_heads
  act_bytes = 2 if model_cfg.compute_dtype == "bfloat16" else 4
  mlp_scale = (3 * model_cfg.mlp_dim) / (2 * 4 * h)  # SwiGLU: 3 F-wide tensors vs 2 x 4h
  per_layer = (s * rows * h * (10 + (8 + 16 * mlp_scale) / t_axis) * act_bytes / 2 +
               5 * a * s * s * rows / t_axis * act_bytes / 2)
  activations = per_layer * model_cfg.num_layers
  # Logits in float32 [rows, s, vocab / t], plus the softmax cotangent of the same size.
  logits = 2 * rows * s * model_cfg.vocab_size // t_axis * 4
  total = params + grads + inner_opt + outer + activations + logits
  return {"params": params, "grads": grads, "inner_opt_state": inner_opt,
          "global_params_and_outer_state": outer, "activations": int(activations),
          "logits": int(logits), "total": int(total), "rows_per_device": rows}


# ------------------------------------------------------------------------ compile + HLO


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "s64": 8, "f64": 8}


def largest_buffers(hlo_text: str, k: int = 10) -> list[str]:
  """The ``k`` largest distinct array shapes an HLO module defines (what to look at first
  when its temporaries are large), with the op that makes each."""
  import re  # pylint: disable=g-import-not-at-top
  seen, rows = set(), []
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%\S+\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w-]+)\(", line)
    if not m or m.group(1) not in _BYTES:
      continue
    shape = f"{m.group(1)}[{m.group(2)}]"
    if shape in seen:
      continue
    seen.add(shape)
    n = math.prod(int(d) for d in m.group(2).split(",") if d) * _BYTES[m.group(1)]
    rows.append((n, f"{n / 2**30:.2f} GiB {shape} {m.group(3)}"))
  return [r for _, r in sorted(rows, reverse=True)[:k]]


def abstract_inputs(config, eng):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_lm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  state = ckpt_lib.abstract_like(jax.eval_shape(eng.init, jax.random.key(0)),
                                 eng.state_shardings)
  m, b, t = int(config.islands.num), int(config.data.batch_size), int(config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct((m, b, t), jnp.float32 if k == "mask" else jnp.int32)
           for k in ("inputs", "targets", "mask")}
  return state, batch


def _compile_programs(lowered: dict, n: int, per_island: int, hlo_dir: str | None) -> tuple:
  """Compiles each lowered program: ({name: compile seconds, memory, collectives}, the inner
  step's collectives, the other programs')."""
  from fedjax_lm import hlo  # pylint: disable=g-import-not-at-top
  programs, inner, outer = {}, [], []
  for name, low in lowered.items():
    t0 = time.perf_counter()
    compiled = low.compile()
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    colls = hlo.collectives(text, n)
    (inner if name == "inner" else outer).extend(colls)
    programs[name] = {"compile_s": round(seconds, 2), "memory": _memory(compiled),
                      "collectives": len(colls),
                      "cross_island": len(hlo.cross_island(colls, per_island))}
    if name == "inner":
      programs[name]["largest_buffers"] = largest_buffers(text)
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, name.replace("/", "_") + ".hlo.txt"), "w") as f:
        f.write(text)
  return programs, inner, outer


def compile_report(config, devices=None, hlo_dir: str | None = None) -> dict:
  """Lowers and compiles every program of ``config`` on abstract inputs: compile seconds,
  XLA's memory analysis per program, the island HLO check and the bytes per sync."""
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_lm import hlo, model as model_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  mesh, model_cfg, eng = build(config, devices)
  state, batch = abstract_inputs(config, eng)
  t_build = time.perf_counter() - t0
  n = mesh.devices.size
  per_island = n // mesh.shape["island"]
  t0 = time.perf_counter()
  if config.algorithm == "ddp":
    lowered = {"inner": eng.lower(state, batch)["inner"]} if hasattr(eng, "lower") else {}
  else:
    lowered = eng.lower(state, batch)
  t_lower = time.perf_counter() - t0
  programs, inner, outer = _compile_programs(lowered, n, per_island, hlo_dir)
  abstract_params = (state.server.params if config.algorithm == "islands" else state.params)
  n_params = model_lib.count_params(abstract_params)
  out = {
      "config": _config_summary(config, mesh, model_cfg, n_params),
      "build_s": round(t_build, 2), "lower_s": round(t_lower, 2),
      "compile_s_total": round(sum(p["compile_s"] for p in programs.values()), 2),
      "programs": programs,
      "analytic_memory": analytic_memory(config, mesh, model_cfg, eng),
      "params": n_params,
      # What every checkpoint writes (the whole state: each island's params and AdamW
      # moments, the global params and outer momentum, float32).
      "checkpoint_bytes": sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state)),
      "inner_collectives": len(inner),
      "inner_cross_island": [f"{c.op} {c.result_bytes} B" for c in
                             hlo.cross_island(inner, per_island)],
  }
  if config.algorithm == "islands":
    control = eng.control_bytes_per_send * int(config.islands.num) // mesh.shape["island"]
    wire = expected_wire_bytes(state.server.params, eng.state_shardings.server.params,
                               per_island)
    out.update({
        "hlo_expected_payload_bytes": wire + control,
        "duplicate_bytes": wire - int(eng.bytes_per_sync),
        "bytes_per_sync": int(eng.bytes_per_sync),
        "params_x_4": 4 * n_params,
        "hlo_outer_payload_bytes": hlo.island_payload_bytes(outer, per_island),
        "control_bytes": control,
        "island_bytes_at_total": eng.island_bytes(int(config.total_steps)),
    })
  return out


def expected_wire_bytes(abstract, shardings, devices_per_island: int) -> int:
  """What one island's devices put on the island link for one uncompressed sync: each device
  all-reduces its ZeRO shard of every global-params leaf, so a leaf whose shard is replicated
  over k of the island's devices crosses k times. Equals ``bytes_per_sync`` when every leaf is
  split over all in-island devices."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
    total += shard * devices_per_island
  return int(total)


def _config_summary(config, mesh, model_cfg, n_params) -> dict:
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  return {"mesh": {k: int(v) for k, v in mesh.shape.items()},
          "islands": int(config.islands.num), "algorithm": config.algorithm,
          "H": int(config.outer.sync_every), "batch_per_island": int(config.data.batch_size),
          "seq_len": int(config.data.seq_len), "params": n_params,
          "model": {k: getattr(model_cfg, k) for k in
                    ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "vocab_size", "compute_dtype", "scan_layers")},
          "train_flops_per_token": model_lib.train_flops_per_token(model_cfg,
                                                                   int(config.data.seq_len))}


# ------------------------------------------------------------------------ a short run


def _blocking(fn):
  import jax  # pylint: disable=g-import-not-at-top

  def call(*args):
    return jax.block_until_ready(fn(*args))

  call.lower = getattr(fn, "lower", None)
  return call


def make_blocking(eng) -> None:
  """Every program of ``eng`` waits for its result before returning (see the module doc)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  p = eng.programs
  eng.programs = dataclasses.replace(
      p, init=_blocking(p.init), inner=_blocking(p.inner),
      encode=tuple(map(_blocking, p.encode)), receive=tuple(map(_blocking, p.receive)),
      merge=tuple(map(_blocking, p.merge)))


def run(config, steps: int | None = None, devices=None, log=print) -> dict:
  """Trains ``config`` for ``steps`` (default ``total_steps``) on real data through the
  training input path (``fedjax_lm.input.TrainBatches``), every program blocking; per step:
  the mean island loss and wall seconds (step 1 includes compiling)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lm import data as data_lib, input as input_lib  # pylint: disable=g-import-not-at-top
  steps = int(steps or config.total_steps)
  mesh, model_cfg, eng = build(config, devices)
  make_blocking(eng)
  tokenizer = data_lib.get_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > model.vocab_size")
  if config.data.name == "local_c4":
    data_lib.prepare_local_c4(config.data.data_dir or None)
  batches = input_lib.TrainBatches(config.data, mesh, num_islands=eng.num_islands,
                                   tokenizer=tokenizer, seed=int(config.seed))
  t0 = time.perf_counter()
  state = eng.init(jax.random.key(int(config.seed)))
  init_s = time.perf_counter() - t0
  records, data_s = [], 0.0
  for step in range(steps):
    t0 = time.perf_counter()
    batch = next(batches)
    jax.block_until_ready(batch)
    t1 = time.perf_counter()
    state, metrics = eng.inner_step(state, batch)
    t2 = time.perf_counter()
    done = step + 1
    state = eng.sync(state, done)
    t3 = time.perf_counter()
    losses = np.asarray(jax.device_get(metrics["island_loss"]))
    rec = {"step": done, "loss": float(losses.mean()),
           "island_loss": [round(float(x), 4) for x in losses],
           "data_s": round(t1 - t0, 3), "inner_s": round(t2 - t1, 2),
           "sync_s": round(t3 - t2, 2),
           "events": [f"{e.kind}/{e.fragment}" for e in eng.clock.events(done)]
                     if config.algorithm == "islands" else [],
           "island_bytes": eng.island_bytes(done)}
    data_s += t1 - t0
    records.append(rec)
    log(json.dumps(rec))
  n_params = sum(int(x.size) for x in jax.tree.leaves(eng.eval_params(state)))
  return {"config": _config_summary(config, mesh, model_cfg, n_params), "init_s": round(init_s, 2),
          "steps": records, "first_step_s": records[0]["inner_s"],
          "steady_step_s": (round(float(np.median([r["inner_s"] for r in records[2:]])), 2)
                            if len(records) > 2 else None),
          "island_bytes": eng.island_bytes(steps),
          "bytes_per_sync": int(getattr(eng, "bytes_per_sync", 0)), "params": n_params,
          "tokens_per_step": int(np.prod(batches.shape))}


# ------------------------------------------------------------------------ input pipeline


def _nonempty(e) -> bool:
  return e["tokens"].size > 0


def train_dataset(config, source, tokenizer, num_threads: int = 0):
  """The IterDataset behind :func:`fedjax_lm.data.make_train_iterator` (one island, iid, one
  shard), rebuilt here so that grain can split it over worker processes (``mp_prefetch``
  slices the source per worker)."""
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lm.data import pipeline  # pylint: disable=g-import-not-at-top
  b, t = int(config.data.batch_size), int(config.data.seq_len)
  chosen = pipeline.partition_indices(source, "iid", 0, 1, int(config.seed))
  seed = int(np.random.SeedSequence(int(config.seed)).generate_state(1)[0])
  ds = (grain.MapDataset.source(chosen).shuffle(seed=seed).repeat()
        .map(pipeline._ReadAndTokenize(source, tokenizer, config.data.text_key,  # pylint: disable=protected-access
                                       bool(config.data.append_eos)))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=64 * max(num_threads, 1)))
        .filter(_nonempty))
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": t + 1})
  return ds.batch(b, drop_remainder=True, batch_fn=pipeline._stack_tokens)  # pylint: disable=protected-access


def pipeline_rate(config, *, batches: int = 20, num_threads: int = 0, workers: int = 0,
                  prefetch: int = 0) -> dict:
  """Tokens/s of one island's training input (read, SentencePiece, pack, batch) on this host:
  ``make_train_iterator`` itself (``num_threads`` read threads, ``prefetch`` batches), or with
  ``workers`` > 0 the same pipeline in grain worker processes (``mp_prefetch``). Also the bare
  SentencePiece rate on one core (encode only, the same documents)."""
  import grain  # pylint: disable=g-import-not-at-top
  from fedjax_lm import data as data_lib  # pylint: disable=g-import-not-at-top
  if config.data.name == "local_c4":
    data_lib.prepare_local_c4(config.data.data_dir or None)
  source = data_lib.get_source(config.data.name, "train", data_dir=config.data.data_dir or None)
  tokenizer = data_lib.get_tokenizer(config.data.tokenizer)
  b, t = int(config.data.batch_size), int(config.data.seq_len)
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's worker options are absl flags
      flags.FLAGS.mark_as_parsed()
    ds = train_dataset(config, source, tokenizer, num_threads)
    it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
  else:
    it = data_lib.make_train_iterator(
        source, tokenizer=tokenizer, seq_len=t, batch_size=b, seed=int(config.seed),
        append_eos=bool(config.data.append_eos), text_key=config.data.text_key,
        num_threads=num_threads, prefetch_batches=prefetch)
  next(it)  # warm-up: workers start, first documents
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - t0
  assert batch["inputs"].shape == (b, t)
  texts = [r[config.data.text_key]
           for r in source.__getitems__(list(range(min(200, len(source)))))]
  t0 = time.perf_counter()
  n_tok = sum(len(tokenizer.encode(x)) for x in texts)
  enc_s = time.perf_counter() - t0
  return {"tokens_per_s": batches * b * t / seconds, "seconds": seconds,
          "tokens": batches * b * t, "num_threads": num_threads, "workers": workers,
          "prefetch": prefetch, "batch": [b, t],
          "sentencepiece_tokens_per_s_one_core": n_tok / enc_s,
          "sentencepiece_bytes_per_s_one_core": sum(len(x) for x in texts) / enc_s,
          "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "load_avg_1min": os.getloadavg()[0]}


def h100_requirement(config, gpus: int = 8, mfu: float = 0.4,
                     peak: float = H100_PEAK_BF16) -> dict:
  """Tokens/s that ``gpus`` H100s training ``config``'s model consume: MFU x peak / FLOPs per
  token (``model.train_flops_per_token``, PaLM's 6N + 12 L T H Dh)."""
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  fpt = model_lib.train_flops_per_token(model_cfg, int(config.data.seq_len))
  per_gpu = mfu * peak / fpt
  return {"flops_per_token": fpt, "mfu": mfu, "peak_flops": peak, "gpus": gpus,
          "tokens_per_s_per_gpu": per_gpu, "tokens_per_s_island": per_gpu * gpus}


# ------------------------------------------------------------------------ WAN ratio


def wan_ratio(config_path: str = "configs/c4_150m.py", *, gpus_per_island: int = 8,
              mfu: float = 0.4, link_bits: float = 1e9, testbed_params: int | None = None,
              testbed_step_s: float | None = None) -> dict:
  """DDP's link time / compute time per step for c4_150m on 2 islands of ``gpus_per_island``
  H100 over ``link_bits``/s, and the testbed link rate that gives the same ratio for a model
  of ``testbed_params`` float32 params stepping in ``testbed_step_s`` seconds."""
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  c = load_config(config_path)
  model_cfg = model_lib.ModelConfig.from_config(c.model)
  _, abstract = model_lib.build(model_cfg)
  n = model_lib.count_params(abstract)
  fpt = model_lib.train_flops_per_token(model_cfg, int(c.data.seq_len))
  tokens = int(c.data.batch_size) * int(c.data.seq_len)  # per island per step
  compute_s = tokens * fpt / (gpus_per_island * mfu * H100_PEAK_BF16)
  grad_bytes = 4 * n  # float32 gradient each island sends per DDP step (island_bytes)
  link_s = grad_bytes * 8 / link_bits
  out = {"params": n, "flops_per_token": fpt, "tokens_per_island_step": tokens,
         "h100_step_s": compute_s, "grad_bytes": grad_bytes, "link_s": link_s,
         "ratio": link_s / compute_s, "mfu": mfu, "gpus_per_island": gpus_per_island,
         "link_bits_per_s": link_bits}
  if testbed_params and testbed_step_s:
    out["testbed_link_bits_per_s"] = 4 * testbed_params * 8 / (out["ratio"] * testbed_step_s)
  return out


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _wan_run(run_dir: str, name: str) -> tuple:
  """One testbed run of ``run_dir``: its ``wan.json`` record, metrics and config."""
  from fedjax_lm import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  d = os.path.join(run_dir, name)
  record = _load(os.path.join(d, "wan.json"))
  metrics = metrics_lib.read_jsonl(os.path.join(d, "metrics.jsonl"))
  overrides = {a.split("=", 1)[0][len("--config."):]: parse_value(a.split("=", 1)[1])
               for a in record["args"]}
  return record, metrics, load_config(record["config"], overrides)


def _curve_steps(run: dict, target: float, projection):
  """Steps to ``target`` on the run's eval curve (interpolated)."""
  return projection.steps_to_loss([e["step"] for e in run["evals"]],
                                  [e["eval_loss"] for e in run["evals"]], target)


def _wan_ddp_row(free: dict, shaped: dict, target: float, t_c: float, bits: float,
                 projection) -> dict:
  """DDP's row: its steps to its own final loss (the unshaped curve) x its shaped step."""
  ddp_steps = _curve_steps(free, target, projection)
  grad = shaped["island_bytes"] / shaped["steps"]
  return {"method": "DDP", "steps_to_target": ddp_steps,
          "time_to_target_s": ddp_steps * shaped["median_step_s"],
          "median_step_s": shaped["median_step_s"],
          "predicted_s": ddp_steps * projection.step_time("ddp", t_c, grad, bits / 1e9, 0.0,
                                                          False),
          "island_bytes_per_step": grad, "foreign_cpu": shaped["foreign_cpu_share"],
          "how": f"{ddp_steps:g} steps (the unshaped run's curve) x its median step "
                 f"over {shaped['steps']} shaped steps"}


def _wan_island_row(run: tuple, label: str, kind: str, target: float, bits: float,
                    projection) -> dict:
  """An islands method's row: the measured training time to the target, and the projection
  of the same steps."""
  from experiments import wan  # pylint: disable=g-import-not-at-top
  rec, met, cfg = run
  r = wan.analyze(rec, met, cfg, target=target)
  steps = _curve_steps(r, target, projection)
  syncs = max(1, int(cfg.total_steps) // int(cfg.outer.sync_every))
  payload = r["island_bytes"] / syncs  # the whole model's payload per round
  reached = r["target_step"]  # the measured time is to this eval; project the same steps
  pred = None if reached is None else reached * projection.step_time(
      kind, r["compute_step_s"], payload, bits / 1e9, 0.0, False, int(cfg.outer.sync_every),
      0.0, int(cfg.outer.fragments), int(cfg.outer.overlap))
  return {"method": label, "steps_to_target": reached, "interpolated_steps_to_target": steps,
          "time_to_target_s": r["train_s_to_target"], "median_step_s": r["median_step_s"],
          "compute_step_s": r["compute_step_s"], "predicted_s": pred,
          "final_eval_loss": r["final_eval_loss"], "island_bytes": r["island_bytes"],
          "blocked_in_syncs_s": r["blocked_in_syncs_s"], "foreign_cpu": r["foreign_cpu_share"],
          "how": f"measured: training time to the first eval <= target (step "
                 f"{reached}; interpolated {steps and round(steps, 1)})"}


def _wan_lines(out: dict, rows: list[dict]) -> list[str]:
  """The testbed table's header line and rows."""
  lines = [f"Link {out['rate']} each direction (tbf); target = DDP's final eval loss "
           f"{out['target_loss']:.4f} (100 steps); testbed compute step t_c = "
           f"{out['t_c_s']:.3f} s (DiLoCo's steps away from syncs; DDP unshaped: "
           f"{out['ddp_unshaped_step_s']:.3f} s); DDP's shaped step "
           f"{rows[0]['median_step_s']:.2f} s: link / compute on the testbed "
           f"= {out['testbed_link_over_compute']:.1f} (c4_150m on 2 x 8 H100 at 1 Gbit/s: 67.2).",
           "", "| method | steps to target | time to target (s) | speed-up vs DDP | projected time "
           "(s) | projected speed-up | median step (s) | foreign CPU | how |",
           "|---|---|---|---|---|---|---|---|---|"]
  def f(x, spec="{:.1f}"):
    return "-" if x is None else spec.format(x)
  for r in rows:
    lines.append(f"| {r['method']} | {f(r['steps_to_target'])} | {f(r['time_to_target_s'])} | "
                 f"{f(r['speedup_vs_ddp'], '{:.1f}x')} | {f(r['predicted_s'])} | "
                 f"{f(r['predicted_speedup'], '{:.1f}x')} | {f(r['median_step_s'], '{:.3f}')} | "
                 f"{f(r['foreign_cpu'], '{:.0%}')} | {r['how']} |")
  return lines


def wan_table(run_dir: str = "runs/scale_wan", out_dir: str = "experiments/results/scale/wan"
              ) -> dict:
  """Item 5's table from the testbed runs of ``run_dir`` (``experiments.wan`` single runs):
  ``ddp_free`` (DDP unshaped, 100 steps: the target loss and its curve), ``ddp_shaped`` (DDP
  for a few steps at the chosen rate: its step time there), ``diloco`` and ``streaming`` (250
  steps at the chosen rate). DDP's time to its own final loss = the steps to reach it x its
  median shaped step (its losses do not depend on the link); the islands' is measured. Beside
  each, ``projection.step_time`` x the steps to the target on the run's own eval curve."""
  from experiments import wan  # pylint: disable=g-import-not-at-top
  from experiments.bench import projection  # pylint: disable=g-import-not-at-top
  free = wan.analyze(*_wan_run(run_dir, "ddp_free"))
  target = free["final_eval_loss"]
  shaped_rec, *shaped_run = _wan_run(run_dir, "ddp_shaped")
  shaped = wan.analyze(shaped_rec, *shaped_run)
  rate = shaped_rec["bandwidth"]
  bits = float(rate.removesuffix("kbit")) * 1e3 if rate.endswith("kbit") else float(
      rate.removesuffix("mbit")) * 1e6
  # The testbed's compute step: DiLoCo's steps away from syncs at this rate (as experiments.wan
  # takes it for DDP); DDP's unshaped step also carries its all-reduce over the free link.
  diloco = _wan_run(run_dir, "diloco")
  t_c = wan.analyze(*diloco)["compute_step_s"]
  rows = [_wan_ddp_row(free, shaped, target, t_c, bits, projection),
          _wan_island_row(diloco, "DiLoCo (H=50)", "diloco", target, bits, projection),
          _wan_island_row(_wan_run(run_dir, "streaming"),
                          "Streaming DiLoCo (P=4, tau=5, 4-bit, host)", "streaming", target,
                          bits, projection)]
  ddp_time, ddp_pred = rows[0]["time_to_target_s"], rows[0]["predicted_s"]
  for r in rows:
    r["speedup_vs_ddp"] = (ddp_time / r["time_to_target_s"]) if r["time_to_target_s"] else None
    r["predicted_speedup"] = (ddp_pred / r["predicted_s"]) if r["predicted_s"] else None
  out = {"rate": rate, "t_c_s": t_c, "ddp_unshaped_step_s": free["median_step_s"],
         "target_loss": target, "grad_bytes": rows[0]["island_bytes_per_step"],
         "testbed_link_over_compute": (shaped["median_step_s"] - t_c) / t_c, "rows": rows}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  lines = _wan_lines(out, rows)
  with open(os.path.join(out_dir, "summary.md"), "w") as fh:
    fh.write("# WAN testbed at c4_150m's DDP link / compute ratio\n\n" + "\n".join(lines) + "\n")
  out["table"] = "\n".join(lines)
  return out


# ------------------------------------------------------------------------ report

MARKER = "<!-- reading -->"
GIB = 2**30


def _gib(n) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def _compile_row(name: str, d: dict) -> str:
  c, inner, mem = d["config"], d["programs"]["inner"], d["analytic_memory"]
  mesh = " x ".join(f"{k} {v}" for k, v in c["mesh"].items())
  peak = max(p["memory"].get("peak", 0) for p in d["programs"].values())
  # fedjax_lm.mesh.activation_rows: the model shards the residual stream's rows over the
  # island's data x fsdp devices, and leaves it alone where those axes have one device.
  split = c["mesh"].get("data", 1) * c["mesh"].get("fsdp", 1)
  rows = f"yes (over {split})" if split > 1 else "no (data x fsdp = 1)"
  return (f"| {name} | {c['params'] / 1e6:.1f}M | {mesh} | {c['batch_per_island']} x "
          f"{c['seq_len']} | {rows} | "
          f"{d['compile_s_total']:.1f} ({inner['compile_s']:.1f}) | {_gib(inner['memory']['peak'])} "
          f"| {_gib(peak)} | {_gib(mem['total'])} | {inner['memory']['temp'] / max(mem['total'] - mem['params'] - mem['inner_opt_state'] - mem['global_params_and_outer_state'], 1):.1f}x |"
          f" {len(d['inner_cross_island'])} of {d['inner_collectives']} |")


def _analytic_row(name: str, d: dict) -> str:
  m = d["analytic_memory"]
  return (f"| {name} | {m['rows_per_device']} | {_gib(m['params'])} | {_gib(m['grads'])} | "
          f"{_gib(m['inner_opt_state'])} | {_gib(m['global_params_and_outer_state'])} | "
          f"{_gib(m['activations'])} | {_gib(m['logits'])} | {_gib(m['total'])} | "
          f"{_gib(d['programs']['inner']['memory']['temp'])} |")


def _bytes_row(name: str, d: dict) -> str:
  return (f"| {name} | {d['params']:,} | {d['params_x_4']:,} | {d['bytes_per_sync']:,} | "
          f"{int(d['hlo_outer_payload_bytes']):,} | {d['control_bytes']} | "
          f"{d.get('duplicate_bytes', '-'):,} | {d['checkpoint_bytes'] / 1e9:.2f} GB |")


def _compile_sections(compiles: dict) -> list[str]:
  """The report's title, compile / memory, analytic memory and bytes-per-sync tables."""
  lines = ["# Real size on an emulated CPU mesh: c4_150m and c4_1b", "",
           "Generated by `python -m experiments.bench.scale report` from the JSON files beside "
           "this one (each holds its command in `argv`); the reading below the marker is "
           "written by hand.", "",
           "## Compile and memory per device (XLA's compiled memory analysis)", "",
           "| run | params | mesh | batch / island | residual rows sharded (data x fsdp) | "
           "compile s, all programs "
           "(inner) | inner step peak GiB / device | largest program peak GiB | analytic GiB "
           "/ device | XLA temp / analytic transient | cross-island collectives in the inner "
           "step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  lines += [_compile_row(k, v) for k, v in compiles.items()]
  lines += ["", "Analytic per-device bytes (exact shard shapes of the state; activations: "
            "Korthikanti et al. 2022 without recomputation, SwiGLU-scaled; float32 logits and "
            "their cotangent), GiB:", "",
            "| run | rows / device | params | grads | AdamW m, v | global params + outer "
            "momentum | activations | logits | total | XLA inner temp |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  lines += [_analytic_row(k, v) for k, v in compiles.items()]
  lines += ["", "## Bytes per sync", "",
            "| run | params | params x 4 | island_bytes per sync | HLO cross-island bytes "
            "per island | of which who-sent weights | of which ZeRO shards replicated over "
            "tensor | checkpoint (whole state) |", "|---|---|---|---|---|---|---|---|"]
  lines += [_bytes_row(k, v) for k, v in compiles.items() if "bytes_per_sync" in v]
  return lines


def _run_section(name: str, d: dict) -> list[str]:
  """One training run's (``run_*.json``) header line and per-step table."""
  r, c = d["run"], d["run"]["config"]
  lines = ["", f"## Training run `{name}`", "",
           f"{c['params'] / 1e6:.1f}M params, mesh {c['mesh']}, {c['islands']} islands, "
           f"batch {c['batch_per_island']} x {c['seq_len']} per island, H={c['H']}; "
           f"init {r['init_s']} s; step 1 {r['first_step_s']} s (programs loaded from "
           f"this invocation's compile cache), median step {r['steady_step_s']} s "
           f"({r['tokens_per_step']} tokens/step); island_bytes after "
           f"{len(r['steps'])} steps: {r['island_bytes']:,}.", "",
           "| step | mean loss | island losses | inner s | sync s | island_bytes |",
           "|---|---|---|---|---|---|"]
  return lines + [
      f"| {s['step']} | {s['loss']:.4f} | {', '.join(f'{x:.4f}' for x in s['island_loss'])}"
      f" | {s['inner_s']} | {s['sync_s']} | {s['island_bytes']:,} |" for s in r["steps"]]


def _pipeline_section(pipes: list[dict]) -> list[str]:
  """The input pipeline's rates (``pipeline_*.json``) against one H100 island's need."""
  h = pipes[0]["h100"]
  lines = ["", "## Input pipeline (one island's iterator, this host)", "",
           f"Need: one 8 x H100 island at c4_150m = MFU x peak / FLOPs per token = "
           f"{h['mfu']} x {h['peak_flops'] / 1e12:.0f} TFLOP/s / "
           f"{h['flops_per_token'] / 1e6:.1f} MFLOP = {h['tokens_per_s_per_gpu']:,.0f} "
           f"tokens/s per GPU, {h['tokens_per_s_island']:,.0f} per island (one host).", "",
           "| setting | tokens/s | SentencePiece alone, one core (tokens/s) | share of one "
           "island's need | load average (2 cores) |", "|---|---|---|---|---|"]
  for d in pipes:
    what = (f"{d['workers']} grain worker processes" if d["workers"] else
            f"make_train_iterator, {d['num_threads']} read threads, prefetch {d['prefetch']}")
    need = d["h100"]["tokens_per_s_island"]
    lines.append(f"| {what} | {d['tokens_per_s']:,.0f} | "
                 f"{d['sentencepiece_tokens_per_s_one_core']:,.0f} | "
                 f"{d['tokens_per_s'] / need:.1%} | {d.get('load_avg_1min', 0):.1f} |")
  return lines


def _wan_ratio_section(w: dict) -> list[str]:
  """The WAN testbed's link / compute ratio (``wan_ratio.json``)."""
  return ["", "## WAN testbed ratio", "",
          f"c4_150m, 2 islands x {w['gpus_per_island']} H100 over "
          f"{w['link_bits_per_s'] / 1e9:g} Gbit/s: DDP sends {w['grad_bytes']:,} B "
          f"(params x 4) per step: {w['link_s']:.2f} s on the link; a step computes "
          f"{w['tokens_per_island_step']:,} tokens x {w['flops_per_token'] / 1e6:.1f} MFLOP "
          f"/ ({w['gpus_per_island']} x {w['mfu']} x 989 TFLOP/s) = "
          f"{w['h100_step_s'] * 1e3:.1f} ms. Link / compute = **{w['ratio']:.1f}**."]


def report(out_dir: str) -> str:
  """Tables from the JSON files in ``out_dir`` (``compile_*.json``, ``run_*.json``,
  ``pipeline_*.json``, ``wan_ratio.json``) into ``summary.md`` above the reading marker."""
  import glob  # pylint: disable=g-import-not-at-top
  def paths(kind):
    return sorted(glob.glob(os.path.join(out_dir, f"{kind}_*.json")))
  lines = _compile_sections({os.path.basename(p)[len("compile_"):-5]: _load(p)
                             for p in paths("compile")})
  for path in paths("run"):
    lines += _run_section(os.path.basename(path), _load(path))
  if pipes := [_load(p) for p in paths("pipeline")]:
    lines += _pipeline_section(pipes)
  if os.path.exists(ratio := os.path.join(out_dir, "wan_ratio.json")):
    lines += _wan_ratio_section(_load(ratio))
  text = "\n".join(lines) + "\n\n"
  path = os.path.join(out_dir, "summary.md")
  reading = ""
  if os.path.exists(path):
    old = open(path).read()
    if MARKER in old:
      reading = old[old.index(MARKER):]
  with open(path, "w") as f:
    f.write(text + (reading or MARKER + "\n"))
  return text


# ------------------------------------------------------------------------ command line


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("command", choices=["compile", "run", "pipeline", "wan_ratio", "wan_table",
                                     "report"])
  p.add_argument("--run_dir", default="runs/scale_wan", help="wan_table: the testbed runs")
  p.add_argument("--wan_out", default="experiments/results/scale/wan",
                 help="wan_table: where its summary.md / results.json go")
  p.add_argument("--out", default="experiments/results/scale", help="report: results dir")
  p.add_argument("--config", default="configs/c4_150m.py")
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
  p.add_argument("--devices", type=int, default=16)
  p.add_argument("--steps", type=int, default=0)
  p.add_argument("--hlo_dir", default=None)
  p.add_argument("--json", default=None, help="write the result here")
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--prefetch", type=int, default=0)
  p.add_argument("--testbed_params", type=int, default=0)
  p.add_argument("--testbed_step_s", type=float, default=0.0)
  p.add_argument("--mfu", type=float, default=0.4)
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="scale_xla_") as cache:
    return _main(args, argv, cache)


def _main(args, argv, cache: str) -> dict:
  if args.command in ("compile", "run"):
    _set_devices(args.devices)
    import jax  # pylint: disable=g-import-not-at-top
    # A cache of this invocation only: the run's programs, compiled once for the HLO check,
    # are loaded from it when the run first calls them (cold compile times stay honest).
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if args.command == "report":
    print(report(args.out))
    return {}
  if args.command == "wan_table":
    out = wan_table(args.run_dir, args.wan_out)
    print(out["table"])
    return out
  if args.command == "wan_ratio":
    out = wan_ratio(args.config, mfu=args.mfu, testbed_params=args.testbed_params or None,
                    testbed_step_s=args.testbed_step_s or None)
  else:
    config = load_config(args.config, args.set)
    if args.command in ("compile", "run"):
      out = {"compile": compile_report(config, hlo_dir=args.hlo_dir)}
      if args.command == "run":
        print(json.dumps(out["compile"], indent=1), flush=True)
        out["run"] = run(config, args.steps or None)
      else:
        out = out["compile"]
    else:
      out = pipeline_rate(config, batches=args.batches, num_threads=args.threads,
                          workers=args.workers, prefetch=args.prefetch)
      out["h100"] = h100_requirement(config, mfu=args.mfu)
  out["argv"] = ["experiments/bench/scale.py", *(sys.argv[1:] if argv is None else argv)]
  text = json.dumps(out, indent=1, default=str)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      f.write(text + "\n")
  print(text)
  return out


if __name__ == "__main__":
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_defaults()
  main()
