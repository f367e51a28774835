"""Islands in their own network namespaces over a rate-limited link: measured time-to-loss.

One run (as root):

  python -m experiments.wan --config configs/shakespeare_diloco.py --bandwidth 20mbit \
      --workdir runs/wan/x --config.mesh.data=1 --config.launch.processes=2

The sweep (DDP, DiLoCo and Streaming DiLoCo at each bandwidth; table, jsonl and plot):

  python -m experiments.wan --sweep --out experiments/results/wan

Does the exchange really overlap compute? Streaming DiLoCo with tau = 0 against tau >= 1, the
exchange as an XLA collective and on a host thread, each run timed with the link shaped to
``--rate`` and unshaped (the difference: the communication the run did not hide):

  python -m experiments.wan --overlap_study --out experiments/results/overlap/summary.md

Each run builds a fresh testbed (``experiments/wan_net.py``: a namespace per island, a hub
bridge, every island's access link shaped by ``tc tbf`` to ``--bandwidth`` in each direction)
and starts the job's processes itself, as a plain scheduler would (``launch.mode=cluster``):
island k's processes inside island k's namespace, the ``jax.distributed`` coordinator in
island 0's at 198.18.0.1. Processes of one island talk over their namespace's loopback; gloo
collectives, the coordinator's gRPC and the host transport between islands cross the shaped
links. There is no netem here: no propagation delay, latency comes only from queueing.
Everything the testbed created is removed when the run ends, fails, is interrupted, or its
launcher is SIGKILLed.

Per run (``DIR/wan.json``, ``DIR/metrics.jsonl``): the wall time of every step (with
``log_every=1``, from ``tokens_per_sec``: the loop's own timing, evaluation excluded), when
each record appeared (wall time since launch: startup, compilation and evaluation included),
the bytes that crossed every island's link (veth counters) next to ``island_bytes``, and the
packets the shaper dropped.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import wan_net
from experiments.bench import suites
from fedjax_lm import config_lib
from fedjax_lm import fragments
from fedjax_lm import launch
from fedjax_lm import metrics as metrics_lib
from fedjax_lm import wire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COORDINATOR_PORT = 12355

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_diloco.py",
                                          "Config of a single run.")
_BANDWIDTH = flags.DEFINE_string("bandwidth", "20mbit",
                                 "tc rate of every island's link, each direction; 'none': "
                                 "unshaped.")
_QUEUE_MS = flags.DEFINE_integer("queue_ms", 100, "Longest queueing delay of a shaped hop "
                                 "(tbf latency; a full queue drops); --overlap_study: 2000 "
                                 "unless given.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/wan/run", "Run directory (replaced); "
                                "--overlap_study: parent of its runs (default runs/overlap).")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds before a run is stopped as failed.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run the sweep (each finished run is reused).")
_BANDWIDTHS = flags.DEFINE_list("bandwidths", ["1000mbit", "100mbit", "20mbit"],
                                "Sweep bandwidths, fastest first.")
_DDP_STEPS = flags.DEFINE_integer("ddp_steps", 100, "DDP's steps: its final eval loss is "
                                  "the target.")
_ISLANDS_STEPS = flags.DEFINE_integer("islands_steps", 250, "Step budget of the islands runs.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 25, "Eval interval of the sweep's runs.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", "runs/wan", "Parent directory of sweep runs.")
_OUT = flags.DEFINE_string("out", "experiments/results/wan", "Sweep results directory; "
                           "--overlap_study: also write its table to this file (default: "
                           "only print it).")
_OVERLAP = flags.DEFINE_list("overlap_methods", ["streaming_tau0"], "Extra runs at the lowest "
                             "bandwidth, run last (also: diloco_host, diloco_tau5).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the sweep's report.")
_JAX_CACHE = flags.DEFINE_string("jax_cache", "runs/wan/jax_cache", "Persistent compilation "
                                 "cache of the runs ('': none); saves compiling again. "
                                 "--overlap_study: none unless given (the free and the shaped "
                                 "run of a pair both compile).")
# --overlap_study (formerly experiments.overlap)
_OVERLAP_STUDY = flags.DEFINE_bool("overlap_study", False, "Time tau=0 against --overlap, "
                                   "transport xla and host, each run with the link shaped to "
                                   "--rate and unshaped; print the table (and write --out).")
_RATE = flags.DEFINE_string("rate", "8mbit", "--overlap_study: tc rate of the shaped link.")
_STEPS = flags.DEFINE_integer("steps", 60, "--overlap_study: inner steps per run.")
_TAU = flags.DEFINE_integer("overlap", 4, "--overlap_study: tau of the overlapped runs.")
_COMPRESSION = flags.DEFINE_string("compression", "none",
                                   "--overlap_study: outer.compression of every run.")

_DILOCO, _STREAM = "configs/shakespeare_diloco.py", "configs/shakespeare_streaming.py"
_PAPER = suites.PAPER_OUTER  # the outer optimizer the committed results were run with
# key: (label, config, overrides); one process per island (2 cores), the islands' link shaped.
METHODS = {
    "ddp": ("DDP", "configs/shakespeare_ddp.py", {}),
    "diloco": ("DiLoCo (H=50)", _DILOCO, _PAPER),
    "streaming": ("Streaming DiLoCo (P=4, tau=5, 4-bit, host)", _STREAM,
                  {"outer.transport": "host"}),
    "streaming_tau0": ("Streaming DiLoCo, tau=0 (no overlap)", _STREAM,
                       {"outer.transport": "host", "outer.overlap": 0}),
    # float32 syncs (1.6 s at 20 Mbit/s), overlapped or not; 150 steps: 3 syncs.
    "diloco_host": ("DiLoCo (H=50), host, tau=0, 150 steps", _DILOCO,
                    {**_PAPER, "outer.transport": "host", "total_steps": 150}),
    "diloco_tau5": ("DiLoCo (H=50), host, tau=5, 150 steps", _DILOCO,
                    {**_PAPER, "outer.transport": "host", "outer.overlap": 5,
                     "total_steps": 150}),
}
SWEEP_METHODS = ("ddp", "diloco", "streaming")
# Batch 4 x 256 per island (not the config's 16) and 4 eval batches: the sweep fits ~30 min
# on 2 cores; the model, and so every exchanged byte, is the config's.
COMMON = {"mesh.island": 2, "mesh.data": 1, "launch.processes": 2, "log_every": 1,
          "checkpoint_every": 100_000, "data.batch_size": 4, "eval_batches": 4}
LATENCY_NOTE = ("no netem in this kernel: no propagation delay; latency comes only from "
                "queueing in tbf")


def _job_env(bed: wan_net.Testbed, process: int, num: int, island: int,
             cache: str, secret: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != launch.ENV_COORDINATOR}
  env.setdefault(wire.ENV_SECRET, secret)  # the host link authenticates the job's processes
  env.update({"JAX_COORDINATOR_ADDRESS": f"{bed.address(0)}:{COORDINATOR_PORT}",
              launch.ENV_NUM_PROCESSES: str(num), launch.ENV_PROCESS_ID: str(process),
              "FEDJAX_LM_TRANSPORT_HOST": bed.address(island), "JAX_PLATFORMS": "cpu",
              "PYTHONUNBUFFERED": "1", "XLA_FLAGS": (
                  "--xla_cpu_multi_thread_eigen=false" if num >= (os.cpu_count() or 1) else "")})
  if cache:
    env.update({"JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  return env


def _tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def run(config, config_path: str, args: list[str], bandwidth: str, workdir: str,
        queue_ms: int = 100, timeout: float = 1800, cache: str = "") -> dict:
  """Runs one training job across a fresh testbed; returns its record (also ``DIR/wan.json``).
  ``args``: ``--config.key=value`` flags for ``experiments.train``; ``config``: the resolved
  config (for the mesh); ``cache``: JAX's compilation cache dir."""
  wan_net.require_root()
  islands, num = int(config.mesh.island), int(config.launch.processes)
  if islands < 2 or num % islands:
    raise ValueError(f"mesh.island={islands}, launch.processes={num}: need >= 2 islands and "
                     "the same number of processes on each")
  workdir = os.path.abspath(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.join(workdir, "logs"))
  cmd = [sys.executable, "-m", "experiments.train", "--config", config_path, "--workdir",
         workdir, *args, "--config.launch.mode=cluster"]
  rate = None if bandwidth == "none" else bandwidth
  print(f"[wan] {islands} islands x {num // islands} process(es), link: "
        f"{f'tbf {rate} each direction, queue <= {queue_ms} ms' if rate else 'unshaped'}; "
        f"{LATENCY_NOTE}", flush=True)
  cache = os.path.abspath(cache) if cache else ""
  with wan_net.Testbed(islands, rate, queue_ms) as bed:
    before, procs, logs = bed.counters(), [], []
    cpu_before, start = _cpu_seconds(), time.time()
    secret = wire.new_secret()
    try:
      for i in range(num):
        island = i // (num // islands)
        logs.append(open(os.path.join(workdir, "console.log" if i == 0 else
                                      f"logs/process_{i}.log"), "wb"))
        procs.append(subprocess.Popen(
            bed.exec_argv(island, cmd), cwd=ROOT, env=_job_env(bed, i, num, island, cache, secret),
            stdout=logs[-1], stderr=subprocess.STDOUT, preexec_fn=launch.die_with_parent))
      stamps = _watch(procs, workdir, start, timeout)
    finally:
      for p in procs:
        if p.poll() is None:
          os.killpg(p.pid, signal.SIGKILL)
          p.wait()
      for f in logs:
        f.close()
    wall = time.time() - start
    after, drops = bed.counters(), bed.qdisc_drops()
    busy, ours = (a - b for a, b in zip(_cpu_seconds(), cpu_before))
  link = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
  record = {"bandwidth": bandwidth, "queue_ms": queue_ms, "config": config_path, "args": args,
            "islands": islands, "processes": num, "wall_s": wall, "link": link,
            "tbf_drops": drops, "stamps": stamps,
            "foreign_cpu_share": max(0.0, busy - ours) / wall / (os.cpu_count() or 1)}
  with open(os.path.join(workdir, "wan.json"), "w") as f:
    json.dump(record, f)
  return record


def _cpu_seconds() -> tuple[float, float]:
  """(CPU seconds the machine has been busy, CPU seconds of this process's reaped children)."""
  with open("/proc/stat") as f:
    ticks = [int(x) for x in f.readline().split()[1:]]
  children = os.times()
  busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
  return busy, children.children_user + children.children_system


def _watch(procs, workdir: str, start: float, timeout: float) -> dict[int, float]:
  """Waits for the job; returns when each metrics record appeared (s since ``start``)."""
  path, offset, partial, stamps = os.path.join(workdir, "metrics.jsonl"), 0, "", {}
  while True:
    if os.path.exists(path):
      with open(path) as f:
        f.seek(offset)
        chunk = f.read()
        offset = f.tell()
      partial += chunk
      *lines, partial = partial.split("\n")
      now = time.time() - start
      for line in lines:
        if line.strip():
          stamps[json.loads(line)["step"]] = now
    codes = [p.poll() for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if bad:
      i, c = bad[0]
      log = os.path.join(workdir, "console.log" if i == 0 else f"logs/process_{i}.log")
      raise RuntimeError(f"process {i} exited with {c}; last lines of {log}:\n{_tail(log)}")
    if all(c == 0 for c in codes):
      return stamps
    if time.time() - start > timeout:
      raise RuntimeError(f"run did not finish in {timeout:.0f} s; see {workdir}")
    time.sleep(0.05)


def sync_steps(config) -> set[int]:
  """Steps after which a sync stage runs (every step for DDP)."""
  total = int(config.total_steps)
  if config.algorithm == "ddp":
    return set(range(1, total + 1))
  sched = fragments.Schedule(int(config.outer.sync_every), int(config.outer.fragments),
                             int(config.outer.overlap), total)
  return {s for s in range(1, total + 1) if sched.events(s)}


def analyze(record: dict, metrics: list[dict], config, compute_step: float | None = None,
            target: float | None = None) -> dict:
  """Per-step timings, time blocked in syncs, link bytes vs island_bytes, time to ``target``.

  A sync's cost lands on its step or the next one (XLA runs a device's programs in order), so
  the time blocked in syncs is the excess over a compute-only step (``compute_step``, default
  the median of this run's steps away from syncs) of the steps at and right after a sync,
  counted after the first sync round (whose steps also trace and compile the sync programs).
  ``train_s``: the sum of step times, compilation (``compile_s``) taken out."""
  recs = sorted((r for r in metrics if "tokens_per_sec" in r), key=lambda r: r["step"])
  per_step = recs[-1]["tokens"] / recs[-1]["step"]
  dur, prev = {}, 0
  for r in recs:
    dur[r["step"]] = (r["step"] - prev) * per_step / r["tokens_per_sec"]
    prev = r["step"]
  median = statistics.median([d for s, d in dur.items() if s > 1])
  syncs = sync_steps(config)
  near = (syncs | {s + 1 for s in syncs}) & set(dur)
  warm = 1 if config.algorithm == "ddp" else (int(config.outer.sync_every) +
                                               int(config.outer.overlap) + 1)
  steady = [d for s, d in dur.items() if s > 1 and s not in near]
  base = compute_step or (statistics.median(steady) if steady else None)
  every_step = len(dur) == recs[-1]["step"]  # log_every=1: one record per step
  blocked = (sum(dur[s] - base for s in near if s > warm) if base and every_step else None)
  # Compilation: step 1 counts as a median step; a first-round sync step as base plus the mean
  # excess of the later rounds' sync steps.
  later = [s for s in near if s > warm]
  typical = base + blocked / len(later) if base and later and blocked is not None else None
  adjusted = {s: median if s == 1 else typical if (s in near and s <= warm and typical) else d
              for s, d in dur.items()}
  stamps = {int(k): v for k, v in record["stamps"].items()}
  evals, train = [], 0.0
  for r in recs:
    train += adjusted[r["step"]]
    if "eval_loss" in r:
      eval_s = stamps[r["step"]] - stamps.get(r["step"] - 1, 0.0) - dur[r["step"]]
      evals.append({"step": r["step"], "eval_loss": r["eval_loss"], "train_s": train,
                    "wall_s": stamps[r["step"]], "eval_s": eval_s})
  last = recs[-1]
  tx = [l["tx_bytes"] for l in record["link"]]
  hit = next((e for e in evals if target is not None and e["eval_loss"] <= target + 1e-9), None)
  return {
      "steps": last["step"], "final_eval_loss": evals[-1]["eval_loss"],
      "island_bytes": last["island_bytes"], "link_tx_bytes": tx,
      "link_rx_bytes": [l["rx_bytes"] for l in record["link"]],
      "link_packets": [l["tx_packets"] for l in record["link"]],
      "link_over_island_bytes": (sum(tx) / len(tx) / last["island_bytes"]
                                 if last["island_bytes"] else None),
      "tbf_drops": record["tbf_drops"], "foreign_cpu_share": record.get("foreign_cpu_share"),
      "wall_s": record["wall_s"], "train_s": train,
      "eval_total_s": sum(e["eval_s"] for e in evals),
      "startup_s": stamps[recs[0]["step"]] - dur[recs[0]["step"]],
      "first_step_s": dur[recs[0]["step"]], "median_step_s": median,
      "compile_s": sum(dur.values()) - sum(adjusted.values()),
      "compute_step_s": base, "sync_steps": len(syncs), "blocked_from_step": warm + 1,
      "blocked_in_syncs_s": blocked,
      "blocked_per_100_steps_s": blocked and blocked * 100 / max(1, last["step"] - warm),
      "target": target, "target_step": hit and hit["step"],
      "train_s_to_target": hit and hit["train_s"], "wall_s_to_target": hit and hit["wall_s"],
      "best_eval_loss": min(e["eval_loss"] for e in evals), "evals": evals}


def _literal(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def _resolved(config_path: str, overrides: dict):
  config = config_lib.load_file(config_path)
  config.unlock()
  config_lib.override(config, overrides)
  return config


def _sweep_runs() -> list[tuple[str, str, dict, str]]:
  """(run name, method key, overrides, bandwidth) of the sweep, in run order: the lowest
  bandwidth and its overlap runs first."""
  low = _BANDWIDTHS.value[-1]
  plan = [(m, low) for m in (*SWEEP_METHODS, *_OVERLAP.value)]
  plan += [(m, bw) for bw in _BANDWIDTHS.value[-2::-1] for m in SWEEP_METHODS]
  out = []
  for method, bw in plan:
    steps = _DDP_STEPS.value if method == "ddp" else _ISLANDS_STEPS.value
    overrides = {**COMMON, "total_steps": steps, "eval_every": _EVAL_EVERY.value,
                 **METHODS[method][2]}
    out.append((f"{method}_{bw}", method, overrides, bw))
  return out


def sweep(extra: dict) -> None:
  """Runs the sweep's runs not already finished with the same settings, then reports."""
  wan_net.require_root()
  from fedjax_lm.data import shakespeare  # pylint: disable=g-import-not-at-top
  shakespeare.prepare_shakespeare(extra.get("data.data_dir") or None)  # not inside a timed run
  for name, method, overrides, bw in _sweep_runs():
    workdir = os.path.join(_SWEEP_DIR.value, name)
    path, overrides = METHODS[method][1], {**overrides, **extra}
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    try:
      with open(os.path.join(workdir, "wan.json")) as f:
        old = json.load(f)
      if (sorted(old["args"]), old["bandwidth"], old["queue_ms"]) == (
          sorted(args), bw, _QUEUE_MS.value):
        print(f"[wan] {name}: reusing the finished run in {workdir}", flush=True)
        continue
    except (OSError, ValueError, KeyError):
      pass
    print(f"[wan] {name}: {METHODS[method][0]} at {bw}", flush=True)
    rec = run(_resolved(path, overrides), path, args, bw, workdir, _QUEUE_MS.value,
              _TIMEOUT.value, _JAX_CACHE.value)
    print(f"[wan] {name}: {rec['wall_s']:.1f} s, link tx {rec['link'][0]['tx_bytes']:,} B",
          flush=True)
  report(extra)


def report(extra: dict) -> None:
  """Analyzes the sweep's runs; writes results.jsonl, summary.md and wan.png under --out."""
  from experiments import wan_report  # pylint: disable=g-import-not-at-top
  loaded = {}
  for name, method, overrides, bw in _sweep_runs():
    workdir = os.path.join(_SWEEP_DIR.value, name)
    if not os.path.exists(os.path.join(workdir, "wan.json")):
      print(f"[wan] {name}: not run, left out of the report", flush=True)
      continue
    with open(os.path.join(workdir, "wan.json")) as f:
      record = json.load(f)
    metrics = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    loaded[name] = (method, bw, record, metrics, _resolved(METHODS[method][1], overrides))
  rows = []
  bandwidths = [bw for bw in _BANDWIDTHS.value if {f"ddp_{bw}", f"diloco_{bw}"} <= set(loaded)]
  for bw in bandwidths:  # DDP's final loss is the target; DiLoCo's steady step its compute
    diloco = analyze(*loaded[f"diloco_{bw}"][2:])
    ddp = analyze(*loaded[f"ddp_{bw}"][2:], compute_step=diloco["compute_step_s"])
    for name, (method, run_bw, record, metrics, config) in loaded.items():
      if run_bw == bw:
        row = analyze(record, metrics, config, diloco["compute_step_s"] if method == "ddp"
                      else None, target=ddp["final_eval_loss"])
        rows.append({"run": name, "method": method, "label": METHODS[method][0],
                     "bandwidth": bw, **row})
  command = " ".join(["python -m experiments.wan --sweep", *(
      a for a in sys.argv[1:] if a.lstrip("-") not in ("sweep", "report_only"))])
  setup = (f"Setup: `{METHODS['ddp'][1]}`, `{_DILOCO}`, `{_STREAM}` (0.98M parameters: a "
           "float32 sync or gradient is 3.94 MB) on 2 islands x 1 process (one per core), "
           f"overrides {', '.join(f'{k}={v}' for k, v in COMMON.items())}; DDP "
           f"{_DDP_STEPS.value} steps (its final eval loss is the target), the islands "
           f"methods {_ISLANDS_STEPS.value} (cosine schedules over each run's own length); "
           f"eval every {_EVAL_EVERY.value} steps.")
  print(wan_report.write(rows, _OUT.value, command=command, setup=setup,
                         bandwidths=bandwidths, queue_ms=_QUEUE_MS.value,
                         latency_note=LATENCY_NOTE))


def _given(name: str, default):
  """Flag ``name``'s value if the command line set it, else ``default`` (a mode's own)."""
  return flags.FLAGS[name].value if flags.FLAGS[name].present else default


def overlap_study(extra: dict) -> None:
  """``--overlap_study``: ``configs/shakespeare_streaming.py`` (P=4, H=20: a fragment sync
  every 5 steps) on 2 islands x 1 process, tau = 0 (merge right after the send) against tau =
  ``--overlap``, the exchange as an XLA collective (``transport=xla``) and on a host thread
  (``transport=host``). Each run is timed with the islands' link unshaped (``free``) and shaped
  to ``--rate``; the difference is the communication the run did *not* hide. A failed run is
  retried twice (counted in the table). Prints the table; ``--out``: also writes it there."""
  wan_net.require_root()
  from fedjax_lm.data import shakespeare  # pylint: disable=g-import-not-at-top
  shakespeare.prepare_shakespeare(extra.get("data.data_dir") or None)  # not inside a timed run
  parent = _given("workdir", "runs/overlap")
  queue_ms = _given("queue_ms", 2000)  # deep: no drops and retransmits inside the timing
  cache = _given("jax_cache", "")
  steps = _STEPS.value
  base = {"mesh.island": 2, "mesh.data": 1, "launch.processes": 2, "total_steps": steps,
          "outer.sync_every": 20, "outer.compression": _COMPRESSION.value, "log_every": 1000,
          "eval_every": steps, "checkpoint_every": steps}
  rows, failed = [], 0
  for tau, transport in ((0, "xla"), (_TAU.value, "xla"), (0, "host"), (_TAU.value, "host")):
    walls = {}
    for shaped in (False, True):
      name = f"tau{tau}_{transport}_{'shaped' if shaped else 'free'}"
      over = {**base, "outer.overlap": tau, "outer.transport": transport, **extra}
      args = [f"--config.{k}={v}" for k, v in over.items()]
      workdir = os.path.join(parent, name)
      for attempt in range(3):
        try:
          record = run(_resolved(_STREAM, over), _STREAM, args,
                       _RATE.value if shaped else "none", workdir, queue_ms, _TIMEOUT.value,
                       cache)
          break
        except RuntimeError as e:
          if attempt == 2:
            raise RuntimeError(f"{name} failed 3 times; see {workdir}/console.log and "
                               "logs/") from e
          failed += 1
          print(f"{name}: attempt {attempt + 1} failed ({str(e).splitlines()[0]}), see "
                f"{workdir}", flush=True)
      walls[shaped] = record["wall_s"]
      last = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
      print(f"{name}: {walls[shaped]:.1f}s eval {last['eval_loss']:.4f}", flush=True)
    rows.append((tau, transport, walls[False], walls[True], last))
  lines = [f"Link: every island's link shaped by tc tbf to {_RATE.value} in each direction "
           f"(queue <= {queue_ms} ms), or unshaped (free); {steps} steps, P=4, H=20 (a fragment "
           f"sync every 5 steps), compression {_COMPRESSION.value}, 2 processes (one island "
           f"each). Failed attempts retried: {failed}.", "",
           "| tau | transport | wall, free link (s) | wall, shaped link (s) | not hidden (s) | "
           "eval loss | island_bytes |", "|---|---|---|---|---|---|---|"]
  for tau, transport, free, shaped, last in rows:
    lines.append(f"| {tau} | {transport} | {free:.1f} | {shaped:.1f} | {shaped - free:.1f} | "
                 f"{last['eval_loss']:.4f} | {last['island_bytes']:,} |")
  table = "\n".join(lines)
  print(table)
  out = _given("out", None)
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      f.write(f"Regenerate: `python -m experiments.wan {' '.join(sys.argv[1:])}`\n\n"
              f"{table}\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind: the testbed's finally removes it
    signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
  try:
    if _SWEEP.value or _REPORT_ONLY.value or _OVERLAP_STUDY.value:
      extra = {a.split("=", 1)[0][len("--config."):]: _literal(a.split("=", 1)[1])
               for a in sys.argv[1:] if a.startswith("--config.") and "=" in a}
      (overlap_study if _OVERLAP_STUDY.value else report if _REPORT_ONLY.value else sweep)(extra)
      return
    args = [a for a in sys.argv[1:] if a.startswith("--config.")]
    record = run(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]), args,
                 _BANDWIDTH.value, _WORKDIR.value, _QUEUE_MS.value, _TIMEOUT.value,
                 _JAX_CACHE.value)
    metrics = metrics_lib.read_jsonl(os.path.join(_WORKDIR.value, "metrics.jsonl"))
    result = analyze(record, metrics, _CONFIG.value)
    print(json.dumps({k: v for k, v in result.items() if k != "evals"}, indent=1))
  except (RuntimeError, ValueError) as e:  # NotRootError included: one line, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_defaults()
  app.run(main)
