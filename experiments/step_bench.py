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
import resource
import statistics
import sys
import tempfile
import time


def pin_one_core(core: int | None = None) -> None:
  """This process on one core (the lowest by default), XLA single-threaded: call before jax."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0)) if core is None else core})
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


# (m, k, n): squares, and the tall-skinny shapes of a small model's projections, where XLA:CPU
# single-threaded runs faster than on big squares (measured: 82 vs 32 GFLOP/s on one core).
PEAK_SHAPES = ((2048, 2048, 2048), (1024, 1024, 1024), (512, 512, 512), (8192, 128, 128),
               (4096, 128, 768), (768, 4096, 128))


def matmul_flops(dtype_name: str, m: int, k: int, n: int, seconds: float = 1.0) -> float:
  """Best-of FLOP/s of one jitted [m, k] @ [k, n] matmul on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a, b = jnp.ones((m, k), jnp.dtype(dtype_name)), jnp.ones((k, n), jnp.dtype(dtype_name))
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best, start = float("inf"), time.perf_counter()
  while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * m * k * n / best


def matmul_peak(dtype_name: str) -> dict:
  """The device's matmul peak: best FLOP/s over ``PEAK_SHAPES``, and the 2048^2 figure."""
  flops = {shape: matmul_flops(dtype_name, *shape) for shape in PEAK_SHAPES}
  best = max(flops, key=flops.get)
  return {"best": flops[best], "best_shape": "x".join(map(str, best)),
          "square_2048": flops[(2048, 2048, 2048)]}


def _load_config(path: str, overrides: dict):
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_file(path)
  with config.unlocked():
    config_lib.override(config, overrides)
  return config


def _categorise(name: str, shape: str, op: str, seq_len: int) -> str:
  dims = re.findall(r"\d+", shape.split("[", 1)[-1].split("]")[0])  # not the dtype's bits
  if op in ("dot", "convolution") or name.startswith(("dot", "ynn_fusion", "convolution")):
    # [..., heads, queries, keys | Dh]: attention; projections are [(M,) rows, features]
    return "attention matmul" if len(dims) >= 4 else "matmul"
  if "reduce" in name:
    return "reduction"
  if len(dims) >= 3 and dims[-1] == str(seq_len):  # [..., queries, keys]: scores / probs
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


class Stepper:
  """The jitted inner step of ``spec['config']`` (+ ``overrides``) built once on a fixed random
  batch; ``time`` runs windows of steps on it, as often as asked."""

  def __init__(self, spec: dict):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from fedjax_lm import islands, mesh as mesh_lib, model as model_lib
    config = _load_config(spec["config"], spec.get("overrides", {}))
    mesh = mesh_lib.make_mesh(dict(config.mesh), jax.devices()[:1])
    self.model_cfg = model_lib.ModelConfig.from_config(config.model)
    self.alg = islands.build(config, mesh, self.model_cfg)
    self.state = self.alg.init(jax.random.key(0))
    m, b, t = int(config.islands.num), int(config.data.batch_size), int(config.data.seq_len)
    self.tokens_per_step, self.seq_len = m * b * t, t
    rows = np.random.default_rng(0).integers(0, 256, (m, b, t + 1)).astype(np.int32)
    self.batch = jax.device_put({"inputs": rows[..., :-1], "targets": rows[..., 1:],
                                 "mask": np.ones((m, b, t), np.float32)},
                                NamedSharding(mesh, mesh_lib.batch_spec()))
    start = time.perf_counter()
    self.run(1)
    self.compile_s = time.perf_counter() - start
    self.run(1)

  def run(self, n: int) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    for _ in range(n):
      self.state, self.metrics = self.alg.inner_step(self.state, self.batch)
    jax.block_until_ready(self.metrics)

  def time(self, steps: int, repeats: int) -> list[float]:
    """Seconds per step of ``repeats`` windows of ``steps`` steps."""
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      self.run(steps)
      times.append((time.perf_counter() - start) / steps)
    return times

  def sync_s(self) -> float | None:
    """Seconds of one full outer sync (every fragment sent and merged); None for DDP."""
    import jax  # pylint: disable=g-import-not-at-top
    if self.alg.schedule is None:
      return None
    every = self.alg.sync_every
    self.state = self.alg.sync(self.state, every)
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(3):
      self.state = self.alg.sync(self.state, every)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / 3


def step(spec: dict) -> dict:
  """Median seconds per jitted inner step (and one outer sync) on a fixed random batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  s = Stepper(spec)
  time.sleep(max(0.0, spec.get("start_at", 0.0) - time.time()))  # concurrent workers align
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  steps = int(spec.get("steps", 5))
  times = s.time(steps, int(spec.get("repeats", 3)))
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  out = {"step_s": statistics.median(times), "step_s_all": times, "compile_s": s.compile_s,
         "page_faults_per_step": faults / (len(times) * steps),
         "tokens_per_step": s.tokens_per_step,
         "loss": float(np.mean(jax.device_get(s.metrics["island_loss"]))),
         "flops_per_token": model_lib.train_flops_per_token(s.model_cfg, s.seq_len),
         "params": model_lib.count_params(jax.eval_shape(s.alg.eval_params, s.state))}
  if (sync_s := s.sync_s()) is not None:
    out["sync_s"] = sync_s
  if spec.get("profile"):
    keys = s.alg.inner_keys
    hlo = s.alg.programs["inner"].lower({k: s.state[k] for k in keys}, s.batch).compile().as_text()
    out["breakdown"] = breakdown(lambda: s.run(3), hlo, 3, s.seq_len)
  return out


def main(spec: dict) -> dict:
  if spec.get("one_core"):
    pin_one_core()
  import fedjax_lm  # pylint: disable=g-import-not-at-top,unused-import  (its XLA flags first)
  import jax  # pylint: disable=g-import-not-at-top
  info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cores": len(os.sched_getaffinity(0))}
  if spec["kind"] == "peak":
    f32, bf16 = matmul_peak("float32"), matmul_peak("bfloat16")
    return {**info, "peak_f32": f32["best"], "peak_f32_shape": f32["best_shape"],
            "peak_f32_2048": f32["square_2048"], "peak_bf16": bf16["best"]}
  return {**info, **step(spec)}


if __name__ == "__main__":
  spec_arg = json.loads(sys.argv[1])
  print("RESULT " + json.dumps(main(spec_arg)))
