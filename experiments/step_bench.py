"""One measurement of the step bench, run in its own process (XLA reads its flags once).

``python -m experiments.step_bench '<json spec>'`` prints one JSON line. Spec keys:
``kind`` (``step`` | ``peak``), ``config`` (path), ``overrides`` ({dotted key: value}),
``one_core`` (pin to one core, single-threaded XLA: the per-process view of the one
process-per-core path), ``steps``, ``repeats``, ``profile`` (add a per-op breakdown).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time


def _pin_one_core() -> None:
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
  """Best-of FLOP/s of one jitted n x n matmul on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.dtype(dtype_name))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best, start = float("inf"), time.perf_counter()
  while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def _load_config(path: str, overrides: dict):
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_file(path)
  with config.unlocked():
    config_lib.override(config, overrides)
  return config


def _categorise(name: str, shape: str, op: str, seq_len: int) -> str:
  if op in ("dot", "convolution") or name.startswith(("dot", "ynn_fusion", "convolution")):
    return "matmul"
  if "reduce" in name:
    return "reduction"
  dims = re.findall(r"\d+", shape.split("{")[0])
  if len(dims) >= 4 and dims[-1] == str(seq_len):  # [..., queries, keys]: scores / probs
    return "attention scores elementwise"
  if name.startswith(("copy", "transpose")) or "transpose" in name:
    return "copy / transpose"
  return "elementwise"


def breakdown(run_steps, hlo_text: str, steps: int, seq_len: int) -> dict:
  """Per-category and top-fusion device time per step from a JAX profiler trace of
  ``run_steps()`` (XLA:CPU op events; mapped to the compiled HLO by instruction name)."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      run_steps()
    path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith(("Thunk", "$", "Threadpool", "Pjit", "end:")):
      per_op[name] += e.get("dur", 0) / 1e3 / steps
  declared = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
      r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+) ([\w-]+)\(", hlo_text, re.M)}
  per_op = collections.Counter({k: v for k, v in per_op.items() if k in declared})
  cats = collections.Counter()
  for name, ms in per_op.items():
    cats[_categorise(name, *declared[name], seq_len)] += ms
  top = [{"op": n, "ms": round(ms, 2), "shape": declared[n][0]} for n, ms in per_op.most_common(8)]
  return {"op_ms": round(sum(per_op.values()), 1),
          "categories": {k: round(v, 1) for k, v in cats.most_common()}, "top_ops": top}


def step(spec: dict) -> dict:
  """Median seconds per jitted inner step (and one outer sync) on a fixed random batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from fedjax_lm import islands, mesh as mesh_lib, model as model_lib

  config = _load_config(spec["config"], spec.get("overrides", {}))
  mesh = mesh_lib.make_mesh(dict(config.mesh), jax.devices()[:1])
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  alg = islands.build(config, mesh, model_cfg)
  state = alg.init(jax.random.key(0))
  m, b, t = int(config.islands.num), int(config.data.batch_size), int(config.data.seq_len)
  rows = np.random.default_rng(0).integers(0, 256, (m, b, t + 1)).astype(np.int32)
  batch = jax.device_put({"inputs": rows[..., :-1], "targets": rows[..., 1:],
                          "mask": np.ones((m, b, t), np.float32)},
                         NamedSharding(mesh, mesh_lib.batch_spec()))
  start = time.perf_counter()
  state, metrics = alg.inner_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start

  def run(n):
    nonlocal state, metrics
    for _ in range(n):
      state, metrics = alg.inner_step(state, batch)
    jax.block_until_ready(metrics)

  run(1)
  times = []
  for _ in range(int(spec.get("repeats", 3))):
    start = time.perf_counter()
    run(int(spec.get("steps", 5)))
    times.append((time.perf_counter() - start) / int(spec.get("steps", 5)))
  out = {"step_s": statistics.median(times), "step_s_all": times, "compile_s": compile_s,
         "tokens_per_step": m * b * t,
         "loss": float(np.mean(jax.device_get(metrics["island_loss"]))),
         "flops_per_token": model_lib.train_flops_per_token(model_cfg, t),
         "params": model_lib.count_params(jax.eval_shape(alg.eval_params, state))}
  if alg.schedule is not None:  # one full outer sync (every fragment sent and merged)
    every = alg.sync_every
    state = alg.sync(state, every)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(3):
      state = alg.sync(state, every)
    jax.block_until_ready(state)
    out["sync_s"] = (time.perf_counter() - start) / 3
  if spec.get("profile"):
    keys = alg.inner_keys
    hlo = alg.programs["inner"].lower({k: state[k] for k in keys}, batch).compile().as_text()
    out["breakdown"] = breakdown(lambda: run(3), hlo, 3, t)
  return out


def main(spec: dict) -> dict:
  if spec.get("one_core"):
    _pin_one_core()
  import fedjax_lm  # pylint: disable=g-import-not-at-top,unused-import  (its XLA flags first)
  import jax  # pylint: disable=g-import-not-at-top
  info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "cores": len(os.sched_getaffinity(0))}
  if spec["kind"] == "peak":
    return {**info, "peak_f32": matmul_peak("float32"), "peak_bf16": matmul_peak("bfloat16")}
  return {**info, **step(spec)}


if __name__ == "__main__":
  spec_arg = json.loads(sys.argv[1])
  if spec_arg.pop("xla_defaults", True) is False:
    os.environ["FEDJAX_LM_XLA_DEFAULTS"] = "0"
  print("RESULT " + json.dumps(main(spec_arg)))
