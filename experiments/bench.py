"""Benchmarks: ``python -m experiments.bench --suite step|quick|full|gpu [--out DIR]``.

``quick`` / ``full``: methods table, sweeps, projected wall time over a slow link
(``experiments/suites.py``, ``suite_report.py``, ``projection.py``); ``quick`` fits about
15 minutes on 2 cores, ``full`` (the config's own model size) takes hours. ``gpu``: tokens/s
and MFU of the inner step (``experiments/gpu_bench.py``; a tiny model on CPU).

``step``: the jitted inner step (and one outer sync) of a config on a fixed batch, for a ladder
of model / runtime variants from the old defaults to the new ones and a few alternatives, on two
paths: every island simulated in one process on all cores (the sweep / notebook path), and one
island pinned to one core with single-threaded XLA (what each process does on the
one-process-per-core multi-process path). Each measurement runs in a fresh process (XLA reads
its flags once), variants interleaved over ``--rounds`` to spread machine noise. Reports
tokens/s, achieved FLOP/s (``model.train_flops_per_token``), the same-run matmul peak (f32 and
bf16: the best over a few shapes; and the 2048^2 square) and a per-op breakdown of the default
step from a profiler trace.

Writes ``DIR/summary.md`` and ``DIR/results.jsonl`` (raw rows with git commit, jax version,
device kind, XLA flags and config overrides). The parent process never imports jax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ONE_VMAP = {"islands.simulated_groups": 1}  # the M islands as one vmap (before per-core groups)
AUTODIFF = {"model.hand_backward": False}  # autodiff's backward order (before hand_backward)
OLD = {"model.scan_layers": True, "model.attention": "einsum", "model.attention_block": 0,
       **ONE_VMAP}
UNROLLED = {"model.scan_layers": False, "model.attention": "einsum", "model.attention_block": 0,
            **ONE_VMAP}
NONE, XLA, ALL = (), ("xla",), ("xla", "malloc")  # fedjax_lm's runtime defaults that are on
# (name, overrides, runtime defaults: "xla" = its XLA:CPU flags, "malloc" = its glibc tunables)
STEP_VARIANTS = [
    ("before: scanned layers, einsum attention, YNNPACK dots", OLD, NONE),
    ("+ unrolled layers", UNROLLED, NONE),
    ("+ XLA's own dots (no YNNPACK fusions)", UNROLLED, XLA),
    ("+ fused QKV and gate-up (stacked backward), head-major attention, 1/sqrt(Dh) in W_q, "
     "softmax divided after PV", {"model.attention_block": 0, **ONE_VMAP, **AUTODIFF}, XLA),
    ("+ causal query blocks of 128", {**ONE_VMAP, **AUTODIFF}, XLA),
    ("+ huge pages for XLA's per-step temporaries (glibc.malloc.hugetlb=1)",
     {**ONE_VMAP, **AUTODIFF}, ALL),
    ("+ simulated islands in per-core groups (islands.simulated_groups)", AUTODIFF, ALL),
    ("+ QKV projected token-major, weight gradients as x^T @ dy, SwiGLU's backward written out "
     "(model.hand_backward) = **default**", {}, ALL),
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


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _worker(spec: dict, defaults: tuple[str, ...] = ALL) -> dict:
  import fedjax_lm  # pylint: disable=g-import-not-at-top  (no jax: env helpers only)
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env["FEDJAX_LM_XLA_DEFAULTS"] = "1" if "xla" in defaults else "0"
  env["FEDJAX_LM_MALLOC_DEFAULTS"] = "1" if "malloc" in defaults else "0"
  tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":")
              if t and t.split("=")[0] not in {d.split("=")[0] for d in fedjax_lm.GLIBC_TUNABLES}]
  env = fedjax_lm.malloc_env({**env, "GLIBC_TUNABLES": ":".join(tunables)})
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.step_bench", json.dumps(spec)],
                        capture_output=True, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    sys.exit(f"error: bench worker failed for {spec}:\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def run_step_suite(args) -> list[dict]:
  rows, samples = [], {}
  peaks = {path: [] for path in PATHS}
  for rnd in range(args.rounds):
    for path, (_, one_core) in PATHS.items():  # once per round: the machine's speed drifts
      peaks[path].append(_worker({"kind": "peak", "one_core": one_core}))
    for name, overrides, defaults in STEP_VARIANTS:
      for path, (path_over, one_core) in PATHS.items():
        spec = {"kind": "step", "config": args.config, "overrides": {**path_over, **overrides},
                "one_core": one_core, "steps": args.steps, "repeats": 3,
                "profile": name == DEFAULT and rnd == args.rounds - 1}
        out = _worker(spec, defaults)
        print(f"[round {rnd + 1}] {path:18s} {out['step_s'] * 1e3:7.0f} ms/step  {name}",
              flush=True)
        samples.setdefault((name, path), []).append(out)
  commit = _git_commit()
  for (name, path), outs in samples.items():
    last = outs[-1]
    step_s = statistics.median(s for o in outs for s in o["step_s_all"])
    peak = {k: max(p[k] for p in peaks[path]) for k in ("peak_f32", "peak_f32_2048", "peak_bf16")}
    peak["peak_f32_shape"] = max(peaks[path], key=lambda p: p["peak_f32"])["peak_f32_shape"]
    achieved = last["flops_per_token"] * last["tokens_per_step"] / step_s
    row = {"suite": "step", "variant": name, "path": path, "config": args.config,
           "overrides": {**PATHS[path][0], **dict(next(v[1] for v in STEP_VARIANTS
                                                       if v[0] == name))},
           "runtime_defaults": list(next(v[2] for v in STEP_VARIANTS if v[0] == name)),
           "git_commit": commit, "jax": last["jax"], "device": last["device"],
           "cores": last["cores"], "xla_flags": last["xla_flags"],
           "glibc_tunables": last.get("glibc_tunables", ""), "step_s": step_s,
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


def step_summary(rows: list[dict], command: str) -> str:
  first = rows[0]
  lines = [
      "# Step bench: the jitted inner step, old and new defaults side by side", "",
      f"Regenerate: `{command}`", "",
      f"git `{first['git_commit']}`, jax {first['jax']}, device `{first['device']}`, "
      f"config `{first['config']}` ({first['params']:,} params, "
      f"{first['flops_per_token'] / 1e6:.2f} MFLOP per training token by "
      "`model.train_flops_per_token`: 6N + 12·L·T·H·Dh, PaLM's convention).", "",
      "Paths: **simulated** = every island of the config in one process on all cores (the "
      "sweep / notebook path); **1 island / 1 core** = one island's step pinned to one core "
      "with single-threaded XLA (what each process of the one-process-per-core multi-process "
      "path runs). Peak = the best FLOP/s of a jitted f32 matmul on the same cores over "
      "`step_bench.PEAK_SHAPES` (squares 512–2048² and tall-skinny projection shapes), "
      "measured once per round, best round; ÷ 2048² is the ratio to the 2048² square alone "
      "(the issue's original yardstick, which single-threaded XLA runs far below the best).",
      "",
      "| variant | path | ms/step | tokens/s | × before | GFLOP/s | ÷ f32 peak | ÷ 2048² "
      "| page faults / step | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  before = {r["path"]: r for r in rows if r["variant"] == STEP_VARIANTS[0][0]}
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


def run_train_suite(args, out: str, start: float, command: str) -> None:
  from experiments import suite_jobs, suite_report  # pylint: disable=g-import-not-at-top
  res = suite_jobs.run_suite(args.suite, out, workers=args.workers,
                             methods_only=args.methods_only, hours=args.hours)
  first = res["methods"][0][1]
  info = {"suite": args.suite, "git_commit": _git_commit(), "jax": first["jax"],
          "device": first["device"], "wall_s": time.time() - start,
          "methods_only": args.methods_only}
  suite_report.write(res, out, info, command, args.gbps, args.latency_ms / 1e3)
  print(f"wrote {out}/summary.md, results.jsonl and plots in {time.time() - start:.0f} s")


def run_gpu_suite(args, out: str, command: str) -> None:
  from experiments import gpu_bench  # pylint: disable=g-import-not-at-top
  row = {**gpu_bench.measure(args.size, args.peak_tflops), "git_commit": _git_commit()}
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.write(json.dumps(row) + "\n")
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(gpu_bench.summary(row, command))
  print(f"{row['size']} on {row['device']}: {row['tokens_per_s']:,.0f} tokens/s, "
        f"MFU {row['mfu']:.1%} of {row['peak_flops'] / 1e12:.2f} TFLOP/s ({row['peak_source']})")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", choices=["step", "quick", "full", "smoke", "gpu"],
                      default="step")
  parser.add_argument("--config", default="configs/shakespeare_diloco.py")
  parser.add_argument("--out", default=None, help="default experiments/results/<suite>")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat (3 repeats)")
  parser.add_argument("--workers", type=int, default=2, help="sweep worker processes")
  parser.add_argument("--methods_only", action="store_true",
                      help="quick / full: the methods table, goals and projections, no sweeps")
  parser.add_argument("--hours", type=float, default=None,
                      help="quick / full: stop training after this long, then time and report "
                      "what is done (run again to continue)")
  parser.add_argument("--gbps", type=float, default=1.0, help="projected link, Gbit/s")
  parser.add_argument("--latency_ms", type=float, default=50.0, help="projected link latency")
  parser.add_argument("--peak_tflops", type=float, default=None, help="gpu: device peak")
  parser.add_argument("--size", choices=["350m", "tiny"], default=None, help="gpu: model")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.config):
    sys.exit(f"error: --config {args.config}: no such file")
  out = args.out or os.path.join("experiments", "results", args.suite)
  os.makedirs(out, exist_ok=True)
  start = time.time()
  command = "python -m experiments.bench " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.suite in ("quick", "full", "smoke"):
    run_train_suite(args, out, start, command.strip())
    return
  if args.suite == "gpu":
    run_gpu_suite(args, out, command.strip())
    return
  rows = run_step_suite(args)
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(step_summary(rows, command.strip()))
  print(f"wrote {out}/summary.md and results.jsonl in {time.time() - start:.0f} s")


if __name__ == "__main__":
  import fedjax_lm  # pylint: disable=g-import-not-at-top
  fedjax_lm.reexec_with_malloc_defaults()
  main()
