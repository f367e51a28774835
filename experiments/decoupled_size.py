"""A decoupled run at a real model size beside the mesh-axis run of the same config: per-step
losses compared, each role's peak host memory sampled.

    python -m experiments.decoupled_size --config configs/c4_150m.py --shards 2 --fragments 2 \
        --out experiments/results/decoupled_size

Runs the config's model (float32, Shakespeare bytes, batch 1 x 128) with M islands, H inner
steps, P fragments for ``--steps`` steps twice: ``launch.mode=local`` (the mesh-axis mode, one
process, one emulated device per island) and ``launch.mode=decoupled`` (M island jobs and an
S-shard syncer). Every 1 s it reads each process's ``VmHWM`` from /proc (role from its command
line), and reports: the largest relative difference of the islands' per-step losses, the rounds
each syncer shard closed and whether any closed without an island, each role's peak RSS against
the goals (island: its device state + one payload; the shards together: 3 x params x 4 bytes).

What an island's device holds is measured, not estimated: ``reference`` is the same island's
training in one process with no link (``launch.mode=local``, one island on one device, its batch
and programs): its params, optimizer state, global copy, XLA's step temporaries and the runtime.
A decoupled island's host memory beyond it is the link's. Peaks are reported twice: over the whole
run (``VmHWM``) and over the training steps (``VmRSS`` sampled each second until every island
logged step ``steps - 1``: no final checkpoint, final eval or launch in it). Each role's VmRSS
samples over time go to ``OUT/rss_trace.json`` (``--sample_s`` apart).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overrides(args, mode: str) -> list[str]:
  islands = 1 if mode == "reference" else args.islands
  mode = "local" if mode == "reference" else mode
  common = {"launch.mode": mode, "algorithm": "islands", "islands.num": islands,
            "outer.sync_every": args.h,
            "outer.fragments": args.fragments, "total_steps": args.steps,
            "eval_every": args.steps, "log_every": 1, "eval_batches": 1, "eval_batch_size": 1,
            "checkpoint_every": args.steps, "inner.warmup_steps": 1, "mesh.island": 1,
            "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "launch.processes": 1,
            "data.name": "shakespeare", "data.tokenizer": "byte", "data.data_dir": args.data_dir,
            "data.seq_len": 128, "data.batch_size": 1, "data.append_eos": False,
            "model.compute_dtype": "float32"}
  if mode == "local":  # (the eval batch is split over the emulated island devices)
    common["eval_batch_size"] = islands
  if mode == "decoupled":
    common.update({"launch.heartbeat_seconds": 60, "launch.syncer_shards": args.shards})
  return [f"--config.{k}={v}" for k, v in {**common, **dict(
      kv.split("=", 1) for kv in args.set)}.items()]


def _role(pid: int) -> str | None:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmd = f.read().replace(b"\0", b" ").decode()
  except OSError:
    return None
  if "experiments.train" not in cmd:
    return None
  role = re.search(r"launch\.role=(\w+)", cmd)
  if not role:
    return "main"
  if role.group(1) == "island":
    return "island_" + re.search(r"launch\.island=(\d+)", cmd).group(1)
  region = re.search(r"launch\.region=(\d+)", cmd)  # HALoS: a regional syncer
  if region:
    return "region_" + region.group(1)
  shard = re.search(r"launch\.syncer_shard=(\d+)", cmd)
  return "syncer_" + (shard.group(1) if shard else "0")


def _memory(pid: int) -> tuple[int, int]:
  """(VmHWM, VmRSS) of a process in bytes; zeros once it is gone."""
  out = {}
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("VmHWM:", "VmRSS:")):
          out[line[:5]] = int(line.split()[1]) * 1024
  except OSError:
    pass
  return out.get("VmHWM", 0), out.get("VmRSS", 0)


def _logged(workdir: str, mode: str, m: int) -> int:
  """Steps every island has logged so far."""
  paths = ([os.path.join(workdir, "metrics.jsonl")] if mode != "decoupled" else
           [os.path.join(workdir, "islands", str(k), "metrics.jsonl") for k in range(m)])
  counts = []
  for path in paths:
    try:
      with open(path, "rb") as f:
        counts.append(f.read().count(b"\n"))
    except OSError:
      counts.append(0)
  return min(counts)


def _run(args, mode: str, workdir: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  env = {**os.environ, "FEDJAX_LM_TCMALLOC": os.environ.get("FEDJAX_LM_TCMALLOC", "0")}
  with open(os.path.join(workdir, "run.log"), "wb") as log:
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config", args.config,
                             "--workdir", workdir, *_overrides(args, mode)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[str, int] = {}
    training: dict[str, int] = {}  # peak VmRSS while the islands run steps 1 .. steps - 1
    trace: dict[str, list] = {}  # role -> [[seconds since launch, VmRSS], ...]
    began = time.time()
    islands = 1 if mode == "reference" else args.islands
    while proc.poll() is None:
      in_steps = _logged(workdir, mode, islands) < args.steps - 1
      for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        role = _role(pid)
        if role and (role != "main" or pid == proc.pid):
          hwm, rss = _memory(pid)
          peaks[role] = max(peaks.get(role, 0), hwm)
          trace.setdefault(role, []).append([round(time.time() - began, 1), rss])
          if in_steps:
            training[role] = max(training.get(role, 0), rss)
      time.sleep(args.sample_s)
  if proc.returncode:
    raise RuntimeError(f"{mode} run failed ({proc.returncode}): see {workdir}/run.log")
  return {"peaks": peaks, "training_peaks": training, "seconds": time.time() - began,
          "trace": trace}


def _losses(workdir: str, mode: str, m: int) -> np.ndarray:
  if mode != "decoupled":
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(l) for l in f if l.strip()]
    return np.array([r["island_loss"] for r in rows if "island_loss" in r], dtype=np.float64)
  cols = []
  for k in range(m):
    by_step = {}
    with open(os.path.join(workdir, "islands", str(k), "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        r = json.loads(line)
        by_step[r["step"]] = r["island_loss"]
    cols.append([by_step[s] for s in sorted(by_step)])
  return np.array(cols, dtype=np.float64).T


def _events(workdir: str) -> list[dict]:
  out = []
  for path in glob.glob(os.path.join(workdir, "**", "events.jsonl"), recursive=True):
    with open(path, encoding="utf-8") as f:
      out += [json.loads(l) for l in f if l.strip()]
  return out


def _state_bytes(args) -> dict:
  """Params, one island's device state and one payload, from the engine's abstract state."""
  import jax  # pylint: disable=import-outside-toplevel
  from fedjax_lm import config_lib, engine, mesh as mesh_lib, model as model_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lm.decoupled import syncer as syncer_lib  # pylint: disable=import-outside-toplevel
  from experiments.bench import scale  # pylint: disable=import-outside-toplevel
  c = config_lib.load_file(os.path.join(ROOT, args.config))
  c.unlock()
  config_lib.override(c, {a[len("--config."):].split("=", 1)[0]: scale.parse_value(
      a.split("=", 1)[1]) for a in _overrides(args, "none")})
  one = syncer_lib.island_config(c)
  mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1},
                            jax.devices()[:1])
  eng = engine.build(one, mesh, model_lib.ModelConfig.from_config(c.model))
  state = jax.eval_shape(eng.init, jax.random.key(0))
  size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  params = sum(x.size for x in jax.tree.leaves(state.server.params))
  return {"params": params, "island_state": size(state), "payload": size(state.server.params)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/c4_150m.py")
  parser.add_argument("--islands", type=int, default=2)
  parser.add_argument("--shards", type=int, default=2)
  parser.add_argument("--fragments", type=int, default=2)
  parser.add_argument("--h", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE config overrides")
  parser.add_argument("--data_dir", default="runs/decoupled_size/tfds")
  parser.add_argument("--workdir", default="runs/decoupled_size")
  parser.add_argument("--only", nargs="*", choices=["local", "decoupled", "reference"],
                      default=None, help="runs to make (default: all three)")
  parser.add_argument("--sample_s", type=float, default=1.0,
                      help="seconds between samples of each process's memory")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  sizes = _state_bytes(args)
  runs = {}
  for mode in ("local", "decoupled", "reference"):
    if not args.only or mode in args.only:
      runs[mode] = _run(args, mode, os.path.join(args.workdir, mode))
  result = {"args": vars(args), **sizes, "runs": runs}
  if "decoupled" in runs and "reference" in runs:  # the link's host memory beyond the device's
    for key in ("peaks", "training_peaks"):
      ref = runs["reference"][key]["main"]
      result[f"island_beyond_reference_{key}"] = {
          r: v - ref for r, v in runs["decoupled"][key].items() if r.startswith("island")}
  if "local" in runs and "decoupled" in runs:
    a, b = (_losses(os.path.join(args.workdir, m), m, args.islands) for m in ("local",
                                                                               "decoupled"))
    result["max_rel_loss_diff"] = float(np.max(np.abs(a - b) / np.abs(a)))
    result["steps_compared"] = int(min(len(a), len(b)))
  events = _events(os.path.join(args.workdir, "decoupled"))
  result["rounds_without"] = [e for e in events if e["event"] == "round_closed_without"]
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  result["commit"], result["date"] = commit, time.strftime("%Y-%m-%d")
  traces = {mode: run.pop("trace") for mode, run in runs.items()}
  print(json.dumps(result, indent=1))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "rss_trace.json"), "w", encoding="utf-8") as f:
      json.dump(traces, f)


if __name__ == "__main__":
  main()
