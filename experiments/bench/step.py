"""The step bench: the jitted inner step (and one outer sync) of a config on a fixed batch.

``python -m experiments.bench --suite step [--config C --rounds 2 --steps 4 --out DIR]`` runs
the suite (``run_suite``, ``summary``): a ladder of model / runtime variants from the old
defaults to the new ones and a few alternatives, on two paths: every island simulated in one
process on all cores (the sweep / notebook path), and one island pinned to one core with
single-threaded XLA (what each process does on the one-process-per-core multi-process path).
Each measurement runs in a fresh process (XLA reads its flags once), variants interleaved over
``--rounds`` to spread machine noise. Reports tokens/s, achieved FLOP/s
(``model.train_flops_per_token``), the same-run matmul peak (f32 and bf16: the best over a few
shapes; and the 2048^2 square) and a per-op breakdown of the default step from a profiler
trace. Writes ``DIR/summary.md`` and ``DIR/results.jsonl`` (raw rows with git commit, jax
version, device kind, XLA flags and config overrides). The suite's process never imports jax.

One measurement, run in its own process: ``python -m experiments.bench.step '<json spec>'``
prints one JSON line. Spec keys:
``kind`` (``step`` | ``peak``), ``config`` (path), ``overrides`` ({dotted key: value}),
``one_core`` (pin to one core, single-threaded XLA: the per-process view of the one
process-per-core path), ``steps``, ``repeats``, ``profile`` (add a per-op breakdown).
``Stepper`` and ``step`` are also the timing of the other suites (``suites``, ``gpu``) and of
the studies ``experiments/studies/torch_peer`` and ``xla_ab``. The ladder's recorded runs, one
directory per machine, and what they answer: ``experiments/studies/step_ladder/``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.bench import git_commit
from experiments.bench import machine


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


def load_config(path: str, overrides: dict):
  """The config file ``path`` with dotted ``overrides`` applied."""
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
    from fedjax_lm import engine, mesh as mesh_lib, model as model_lib
    config = load_config(spec["config"], spec.get("overrides", {}))
    devices = max(1, math.prod(int(v) for v in config.mesh.values()))  # -1: one device
    mesh = mesh_lib.make_mesh(dict(config.mesh), jax.devices()[:devices])
    self.model_cfg = model_lib.ModelConfig.from_config(config.model)
    self.alg = engine.build(config, mesh, self.model_cfg)
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
    if not self.alg.sync_every:
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
    hlo = s.alg.lower(s.state, s.batch)["inner"].compile().as_text()
    out["breakdown"] = breakdown(lambda: s.run(3), hlo, 3, s.seq_len)
  return out


# ------------------------------------------------------------------ the suite (parent side)

ONE_VMAP = {"islands.simulated_groups": 1}  # the M islands as one vmap (before per-core groups)
AUTODIFF = {"model.hand_backward": False}  # autodiff's backward order (before hand_backward)
OLD = {"model.scan_layers": True, "model.attention": "einsum", "model.attention_block": 0,
       **ONE_VMAP}
UNROLLED = {"model.scan_layers": False, "model.attention": "einsum", "model.attention_block": 0,
            **ONE_VMAP}
# fedjax_lm's runtime defaults that are on: "xla" = its XLA:CPU flags, "malloc" = its glibc
# tunables, "compile" = its XLA:CPU compile options (fedjax_lm.cpu), "heap" = its glibc
# tunables for a process pinned to one core (cpu.ONE_CORE_TUNABLES; 1-core path only),
# "tcmalloc" = TCMalloc preloaded where the system has it (cpu.malloc_env)
NONE, XLA, MALLOC = (), ("xla",), ("xla", "malloc")
COMPILE, HEAP = ("xla", "malloc", "compile"), ("xla", "malloc", "compile", "heap")
ALL = (*HEAP, "tcmalloc")
# The simulated islands as per-core vmapped groups on one device (the default until the
# simulated path emulated a CPU device per core, cpu.island_devices)
GROUPS = {"islands.simulated_groups": len(os.sched_getaffinity(0))
          if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1}
# (name, overrides, runtime defaults)
STEP_VARIANTS = [
    ("before: scanned layers, einsum attention, YNNPACK dots", OLD, NONE),
    ("+ unrolled layers", UNROLLED, NONE),
    ("+ XLA's own dots (no YNNPACK fusions)", UNROLLED, XLA),
    ("+ fused QKV and gate-up (stacked backward), head-major attention, 1/sqrt(Dh) in W_q, "
     "softmax divided after PV", {"model.attention_block": 0, **ONE_VMAP, **AUTODIFF}, XLA),
    ("+ causal query blocks of 128", {**ONE_VMAP, **AUTODIFF}, XLA),
    ("+ huge pages for XLA's per-step temporaries (glibc.malloc.hugetlb=1)",
     {**ONE_VMAP, **AUTODIFF}, MALLOC),
    ("+ simulated islands in per-core groups (islands.simulated_groups)",
     {**GROUPS, **AUTODIFF}, MALLOC),
    ("+ QKV projected token-major, weight gradients as x^T @ dy, SwiGLU's backward written out "
     "(model.hand_backward)", GROUPS, MALLOC),
    ("+ max without NaN bookkeeping (XLA:CPU compile option xla_cpu_enable_fast_min_max, "
     "fedjax_lm.cpu)", GROUPS, COMPILE),
    ("+ a 1-core process keeps its temporaries in one heap arena (fedjax_lm.ONE_CORE_TUNABLES; "
     "the simulated path is unchanged)", GROUPS, HEAP),
    ("+ TCMalloc, where the system has it (preloaded; fedjax_lm.malloc_env)", GROUPS, ALL),
    ("+ simulated islands on one emulated CPU device per core (cpu.island_devices; the 1-core "
     "path is unchanged) = **default**", {}, ALL),
    ("default, bf16 compute", {"model.compute_dtype": "bfloat16"}, ALL),
    ("default, scanned layers", {"model.scan_layers": True}, ALL),
    ("default, jax.nn.dot_product_attention", {"model.attention": "dot_product"}, ALL),
]
DEFAULT = next(name for name, _, _ in STEP_VARIANTS if "**default**" in name)
PATHS = {  # name -> (overrides, one_core)
    "simulated": ({"mesh.island": 1, "mesh.data": 1, "launch.processes": 1}, False),
    "1 island / 1 core": ({"mesh.island": 1, "mesh.data": 1, "launch.processes": 1,
                           "islands.num": 1}, True),
}


def _measure(spec: dict, defaults: tuple[str, ...] = ALL) -> dict:
  """One measurement in a fresh process (``defaults``: fedjax_lm's runtime defaults on in it)."""
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top  (no jax: env helpers only)
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env["FEDJAX_LM_XLA_DEFAULTS"] = "1" if "xla" in defaults else "0"
  env["FEDJAX_LM_MALLOC_DEFAULTS"] = "1" if "malloc" in defaults else "0"
  env["FEDJAX_LM_COMPILE_DEFAULTS"] = "1" if "compile" in defaults else "0"
  env["FEDJAX_LM_HEAP_DEFAULTS"] = "1" if "heap" in defaults else "0"
  env["FEDJAX_LM_TCMALLOC"] = "1" if "tcmalloc" in defaults else "0"
  env = cpu.without_tcmalloc(env)  # malloc_env below adds it back where asked
  ours = {d.split("=")[0] for d in cpu.GLIBC_TUNABLES + cpu.ONE_CORE_TUNABLES}
  tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":")
              if t and t.split("=")[0] not in ours]
  env = cpu.malloc_env({**env, "GLIBC_TUNABLES": ":".join(tunables)},
                       one_core=bool(spec.get("one_core")))
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.bench.step", json.dumps(spec)],
                        capture_output=True, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    sys.exit(f"error: bench worker failed for {spec}:\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def run_suite(config: str, rounds: int, steps: int, rungs: list[int] | None = None
              ) -> list[dict]:
  """Every variant (or the ``rungs`` of ``STEP_VARIANTS``, by index) on every path, ``rounds``
  times interleaved; one row per (variant, path)."""
  variants = [STEP_VARIANTS[i] for i in rungs] if rungs else STEP_VARIANTS
  rows, samples = [], {}
  peaks = {path: [] for path in PATHS}
  for rnd in range(rounds):
    for path, (_, one_core) in PATHS.items():  # once per round: the machine's speed drifts
      peaks[path].append(_measure({"kind": "peak", "one_core": one_core}))
    for name, overrides, defaults in variants:
      for path, (path_over, one_core) in PATHS.items():
        spec = {"kind": "step", "config": config, "overrides": {**path_over, **overrides},
                "one_core": one_core, "steps": steps, "repeats": 3,
                "profile": name == DEFAULT and rnd == rounds - 1}
        out = _measure(spec, defaults)
        print(f"[round {rnd + 1}] {path:18s} {out['step_s'] * 1e3:7.0f} ms/step  {name}",
              flush=True)
        samples.setdefault((name, path), []).append(out)
  commit = git_commit()
  for (name, path), outs in samples.items():
    last = outs[-1]
    step_s = statistics.median(s for o in outs for s in o["step_s_all"])
    peak = {k: max(p[k] for p in peaks[path]) for k in ("peak_f32", "peak_f32_2048", "peak_bf16")}
    peak["peak_f32_shape"] = max(peaks[path], key=lambda p: p["peak_f32"])["peak_f32_shape"]
    achieved = last["flops_per_token"] * last["tokens_per_step"] / step_s
    row = {"suite": "step", "variant": name, "path": path, "config": config,
           "overrides": {**PATHS[path][0], **dict(next(v[1] for v in STEP_VARIANTS
                                                       if v[0] == name))},
           "runtime_defaults": list(next(v[2] for v in STEP_VARIANTS if v[0] == name)),
           "git_commit": commit, "jax": last["jax"], "device": last["device"],
           "machine": machine.describe(), "cores": last["cores"], "xla_flags": last["xla_flags"],
           "glibc_tunables": last.get("glibc_tunables", ""),
           "ld_preload": last.get("ld_preload", ""), "step_s": step_s,
           "step_s_samples": [s for o in outs for s in o["step_s_all"]],
           "page_faults_per_step": statistics.median(o["page_faults_per_step"] for o in outs),
           "tokens_per_s": last["tokens_per_step"] / step_s, "achieved_flops": achieved,
           **peak, "of_peak_f32": achieved / peak["peak_f32"],
           "of_peak_f32_2048": achieved / peak["peak_f32_2048"], "compile_s": last["compile_s"],
           "loss_after_steps": last["loss"], "params": last["params"],
           "flops_per_token": last["flops_per_token"], "sync_s": last.get("sync_s"),
           "breakdown": next((o["breakdown"] for o in outs if "breakdown" in o), None)}
    rows.append(row)
  return rows


def summary(rows: list[dict], command: str) -> str:
  """The suite's ``summary.md``."""
  first = rows[0]
  lines = [
      "# Step bench: the jitted inner step, old and new defaults side by side", "",
      f"Regenerate: `{command}`", "",
      f"git `{first['git_commit']}`, jax {first['jax']}, device `{first['device']}` "
      f"({first.get('machine', 'CPU not recorded')}), "
      f"config `{first['config']}` ({first['params']:,} params, "
      f"{first['flops_per_token'] / 1e6:.2f} MFLOP per training token by "
      "`model.train_flops_per_token`: 6N + 12·L·T·H·Dh, PaLM's convention).", "",
      "Paths: **simulated** = every island of the config in one process on all cores (the "
      "sweep / notebook path); **1 island / 1 core** = one island's step pinned to one core "
      "with single-threaded XLA (what each process of the one-process-per-core multi-process "
      "path runs). Peak = the best FLOP/s of a jitted f32 matmul on the same cores over "
      "`bench.step.PEAK_SHAPES` (squares 512–2048² and tall-skinny projection shapes), "
      "measured once per round, best round; ÷ 2048² is the ratio to the 2048² square alone "
      "(the issue's original yardstick, which single-threaded XLA runs far below the best).",
      "",
      "| variant | path | ms/step | tokens/s | × before | GFLOP/s | ÷ f32 peak | ÷ 2048² "
      "| page faults / step | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  before = {r["path"]: r for r in rows if r["variant"] == first["variant"]}
  for r in rows:
    speedup = before[r["path"]]["step_s"] / r["step_s"]
    lines.append(f"| {r['variant']} | {r['path']} | {r['step_s'] * 1e3:.0f} | "
                 f"{r['tokens_per_s']:,.0f} | {speedup:.2f} | {r['achieved_flops'] / 1e9:.0f} | "
                 f"{r['of_peak_f32']:.0%} | {r['of_peak_f32_2048']:.0%} | "
                 f"{r['page_faults_per_step']:,.0f} | {r['compile_s']:.1f} |")
  lines += ["", "| path | cores | f32 matmul peak GFLOP/s (shape) | f32 2048² | bf16 peak |",
            "|---|---|---|---|---|"]
  for path in PATHS:
    r = before[path]
    lines.append(f"| {path} | {r['cores']} | {r['peak_f32'] / 1e9:.0f} "
                 f"({r['peak_f32_shape']}) | {r['peak_f32_2048'] / 1e9:.0f} | "
                 f"{r['peak_bf16'] / 1e9:.0f} |")
  for r in rows:
    if r["variant"] == DEFAULT and r["sync_s"] is not None and r["path"] == "simulated":
      lines += ["", f"One full outer sync (simulated path, default): {r['sync_s'] * 1e3:.0f} ms "
                f"= {r['sync_s'] / r['step_s']:.3f} inner steps."]
  for r in rows:
    b = r["breakdown"]
    if not b:
      continue
    lines += ["", f"## Where the time goes: default, {r['path']} "
              f"(profiler op time {b['op_ms']:.0f} ms of {r['step_s'] * 1e3:.0f} ms per step)", "",
              "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {v / b['op_ms']:.0%} |" for k, v in b["categories"].items()]
    lines += ["", "| top ops | shape | ms/step |", "|---|---|---|"]
    lines += [f"| `{t['op']}` | `{t['shape']}` | {t['ms']:.1f} |" for t in b["top_ops"]]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------- one measurement (worker side)

def with_island_devices(spec: dict) -> dict:
  """``spec`` as ``experiments.train`` would run it in one process: a simulated path's islands
  on one emulated CPU device per core (``cpu.emulate_island_devices``). Call before JAX starts."""
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  devices = cpu.emulate_island_devices(load_config(spec["config"], spec.get("overrides", {})))
  if devices == 1:
    return spec
  return {**spec, "overrides": {**spec.get("overrides", {}), "mesh.island": devices}}


def main(spec: dict) -> dict:
  """One measurement of ``spec`` in this process (``kind`` step | peak), with its setting."""
  if spec.get("one_core"):
    pin_one_core()
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_xla_defaults()  # before JAX starts (FEDJAX_LM_XLA_DEFAULTS from _measure)
  if spec["kind"] == "step":
    spec = with_island_devices(spec)
  import jax  # pylint: disable=g-import-not-at-top
  info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "ld_preload": os.environ.get("LD_PRELOAD", ""), "cores": len(os.sched_getaffinity(0))}
  if spec["kind"] == "peak":
    f32, bf16 = matmul_peak("float32"), matmul_peak("bfloat16")
    return {**info, "peak_f32": f32["best"], "peak_f32_shape": f32["best_shape"],
            "peak_f32_2048": f32["square_2048"], "peak_bf16": bf16["best"]}
  return {**info, **step(spec)}


if __name__ == "__main__":
  spec_arg = json.loads(sys.argv[1])
  print("RESULT " + json.dumps(main(spec_arg)))
