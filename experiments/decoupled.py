"""Decoupled islands, measured: equivalence, crashes, speeds, elastic join, bytes on the wire.

    python -m experiments.decoupled --out experiments/results/decoupled

Every run is ``experiments.train --config.launch.mode=decoupled`` on the tiny model (the
syncer and each island its own process on this machine), against the mesh-axis mode where a
row compares with it. Writes ``summary.md`` (the tables), ``results.json`` and
``loss_vs_time.png`` (eval loss against wall time for each policy) and ``faults.png`` (the
crash and elastic runs, each leave, rejoin, syncer restore and join marked on its curve).
``--only NAME ...`` runs a subset (``--only plot`` redraws ``faults.png`` from the runs already
in ``--workdir``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from experiments.bench import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"algorithm": "islands", "log_every": 1, "checkpoint_every": 100000,
        "mesh.island": 1, "mesh.data": 1, "launch.processes": 1, "inner.learning_rate": 1e-2}


def _train(workdir: str, overrides: dict, env: dict | None = None,
           config: str = "configs/tiny.py") -> float:
  shutil.rmtree(workdir, ignore_errors=True)
  args = [sys.executable, "-m", "experiments.train", "--config", config,
          "--workdir", workdir, *(f"--config.{k}={v}" for k, v in overrides.items())]
  start = time.time()
  done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                        env={**os.environ, "XLA_FLAGS": "", **(env or {})})
  if done.returncode:
    raise RuntimeError(f"{workdir} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "launched_at"), "w", encoding="utf-8") as f:
    f.write(repr(start))
  return time.time() - start


def _jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _island_losses(workdir: str, k: int) -> list[float]:
  by_step = {r["step"]: r["island_loss"]
             for r in _jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl"))}
  return [by_step[s] for s in sorted(by_step)]


def _evals(workdir: str) -> list[dict]:
  return _jsonl(os.path.join(workdir, "metrics.jsonl"))


def _first_difference(got: np.ndarray, want: np.ndarray) -> tuple[float, int | None]:
  """(max relative difference, first step whose losses differ at all) of [steps, M] losses."""
  rel = np.abs(got - want) / np.abs(want)
  differ = np.flatnonzero(rel.max(axis=1) > 0)
  return float(rel.max()), (int(differ[0]) + 1 if differ.size else None)


def equivalence(base: str, data_dir: str, steps: int) -> list[dict]:
  """Decoupled sync with both islands present against the mesh-axis mode, per-step losses:
  against the islands simulated in one process and against one island per process (the
  decoupled island's own layout). Streaming in float32 beside int4 shows what the quantizer's
  rounding does to a last-bit difference."""
  rows = []
  streaming = {"outer.sync_every": 8, "outer.fragments": 4, "outer.overlap": 2,
               "outer.mixing": 0.5}
  int4 = {**streaming, "outer.compression": "int4", "outer.quant_block": 64,
          "outer.error_feedback": 0.9}
  for name, extra in (("DiLoCo", {"outer.sync_every": 10}),
                      ("Streaming P=4 tau=2 f32", {**streaming, "outer.compression": "none"}),
                      ("Streaming P=4 tau=2 int4 + EF", int4)):
    common = {**TINY, "islands.num": 2, "total_steps": steps, "eval_every": steps,
              "data.data_dir": data_dir, **extra}
    mesh_dir, dec_dir = f"{base}/eq_{len(rows)}_mesh", f"{base}/eq_{len(rows)}_decoupled"
    two_dir = f"{base}/eq_{len(rows)}_mesh_2p"
    _train(mesh_dir, {**common, "launch.mode": "none"})
    _train(two_dir, {**common, "launch.mode": "local", "mesh.island": 2,
                     "launch.processes": 2})
    _train(dec_dir, {**common, "launch.mode": "decoupled"})
    mesh = _jsonl(os.path.join(mesh_dir, "metrics.jsonl"))
    want = np.array([r["island_loss"] for r in mesh])
    two = np.array([r["island_loss"] for r in _jsonl(os.path.join(two_dir, "metrics.jsonl"))])
    got = np.stack([_island_losses(dec_dir, k) for k in range(2)], axis=1)
    diff, first = _first_difference(got, want)
    diff_2p, first_2p = _first_difference(got, two)
    rows.append({"run": name, "steps": steps, "max_rel_diff_loss": diff,
                 "first_differing_step": first, "max_rel_diff_loss_2p": diff_2p,
                 "first_differing_step_2p": first_2p,
                 "eval_mesh": mesh[-1]["eval_loss"], "eval_decoupled": _evals(dec_dir)[-1][
                     "eval_loss"], "bytes_mesh": mesh[-1]["island_bytes"],
                 "bytes_decoupled": _evals(dec_dir)[-1]["island_bytes"]})
  return rows


def _longest_stall(workdir: str, k: int, after: int = 10) -> float:
  """The longest wall-time gap between island k's consecutive steps after step ``after``
  (the first round waits for every island's start-up and compile)."""
  times = [r["time"] for r in _jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl"))
           if r["step"] > after]
  return float(max(np.diff(times))) if len(times) > 1 else 0.0


def _step_times(workdir: str, k: int) -> dict[int, float]:
  return {r["step"]: r["time"]
          for r in _jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl"))}


def _launch_to_first_step(workdir: str, islands: int) -> float:
  """Seconds from the launcher's start to the first step any island logged."""
  with open(os.path.join(workdir, "launched_at"), encoding="utf-8") as f:
    start = float(f.read())
  return min(min(_step_times(workdir, k).values()) for k in range(islands)) - start


def _eval_round_stall(workdir: str, islands, every: int) -> float:
  """The longest gap between step e and e + 1 of the given islands at an eval step e (the
  syncer evaluates the global model there; island steps should not wait for it)."""
  gaps = []
  for k in islands:
    t = _step_times(workdir, k)
    gaps += [t[e + 1] - t[e] for e in t if e % every == 0 and e + 1 in t]
  return float(max(gaps)) if gaps else 0.0


def _rejoined_round_loss(workdir: str, clean: str, k: int, h: int) -> dict:
  """Island k's mean loss over the first whole round after it rejoined, against the
  fault-free run's island k over the same steps."""
  events = _jsonl(os.path.join(workdir, "events.jsonl"))
  rejoin = next((e for e in events if e["event"] == "island_rejoined" and e.get("island") == k),
                None)
  if rejoin is None:
    return {}
  by_step = {}
  for r in _jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl")):  # the restarted process's records are the later ones
    by_step[r["step"]] = (r["time"], r["island_loss"])
  after = sorted(s for s, (t, _) in by_step.items() if t >= rejoin["time"] - 1e-3)
  first = next((s for s in after if (s - 1) % h == 0), None)
  if first is None:
    return {}
  steps = [s for s in range(first, first + h) if s in by_step]
  ref = {r["step"]: r["island_loss"]
         for r in _jsonl(os.path.join(clean, "islands", str(k), "metrics.jsonl"))}
  steps = [s for s in steps if s in ref]
  if not steps:
    return {}
  got = float(np.mean([by_step[s][1] for s in steps]))
  want = float(np.mean([ref[s] for s in steps]))
  return {"rejoin_round": f"{steps[0]}-{steps[-1]}", "rejoin_loss": got,
          "rejoin_loss_ratio": got / want}


def crashes(base: str, data_dir: str, steps: int, config: str = "configs/tiny.py"
            ) -> list[dict]:
  """3 islands, H=10: fault-free, island 2 SIGKILLed at 40% of the run (restarted by the
  launcher, rejoining), the syncer SIGKILLed after 4 rounds. ``config``: the tiny model (with
  the bench's inner lr 1e-2) or another config's model (its own optimizer settings)."""
  h, every = 10, 10
  common = {**(TINY if config == "configs/tiny.py" else
               {k: v for k, v in TINY.items() if k != "inner.learning_rate"}),
            "islands.num": 3, "outer.sync_every": h, "total_steps": steps,
            "eval_every": every, "launch.heartbeat_seconds": 2, "data.data_dir": data_dir,
            "launch.mode": "decoupled", "mesh.fsdp": 1, "mesh.tensor": 1,
            # each island saves its inner optimizer state every round: a restarted one
            # resumes it (and its schedule position) instead of a fresh warm-up
            "checkpoint_every": h}
  train = functools.partial(_train, config=config)
  rows = []
  clean = f"{base}/crash_none"
  wall = train(clean, common)
  ref = _evals(clean)[-1]["eval_loss"]
  rows.append({"run": "fault-free (3 islands)", "config": config, "wall_s": wall, "eval": ref,
               "ratio": 1.0, "stall_s": max(_longest_stall(clean, k) for k in range(3)),
               "first_step_s": _launch_to_first_step(clean, 3),
               "eval_stall_s": _eval_round_stall(clean, range(3), every), "events": ""})
  kill_at = int(0.4 * steps)
  for name, kill in ((f"SIGKILL island 2 at step {kill_at}", f"island/2@{kill_at}"),
                     ("SIGKILL the syncer after 4 rounds", "syncer@4")):
    workdir = f"{base}/crash_{len(rows)}"
    wall = train(workdir, {**common, "faults.kill": kill})
    final = _evals(workdir)[-1]["eval_loss"]
    events = [e for e in _jsonl(os.path.join(workdir, "events.jsonl"))
              if e["event"] not in ("island_joined", "island_finished")]
    roles = json.load(open(os.path.join(workdir, "roles.json"), encoding="utf-8"))
    orphans = [r for r, v in roles.items()
               if subprocess.run(["kill", "-0", str(v["pid"])], capture_output=True).returncode == 0]
    rows.append({"run": name, "config": config, "wall_s": wall, "eval": final,
                 "ratio": final / ref,
                 "stall_s": max(_longest_stall(workdir, k) for k in (0, 1)),
                 "first_step_s": _launch_to_first_step(workdir, 3),
                 "eval_stall_s": _eval_round_stall(workdir, (0, 1), every),
                 **(_rejoined_round_loss(workdir, clean, 2, h) if kill.startswith("island")
                    else {}),
                 "events": ", ".join(f"{e['event']}" + (f" {e['island']}" if "island" in e else "")
                                     for e in events), "orphans": orphans, "workdir": workdir})
  return rows


def heterogeneous(base: str, data_dir: str, steps: int, step_seconds: float,
                  momenta: tuple[float, ...] = (0.9, 0.5)) -> list[dict]:
  """4 islands with speeds 1, 1, 1, 0.25: sync, sync with quorum 3, async (DN + DyLU), at each
  outer momentum in ``momenta`` (0.9: DiLoCo's and the async paper's; 0.5: the best for DiLoCo
  at this scale, see the paper-fidelity table). With ``step_seconds`` > 0 each island's step is
  paced to step_seconds / speed of wall time, so the 5 processes sharing this machine's cores
  run as on their own hardware (their compute must fit in the pace); 0 slows each island's
  measured compute instead. Each row's times are against that momentum's sync run. H=10, not
  8: DyLU gives the slow island floor(H x 0.25), and at H=8 that is exactly 2, so a few ms of
  jitter in its measured step made it 1 in some runs; floor(2.5) = 2 has room either side."""
  common = {**TINY, "islands.num": 4, "outer.sync_every": 10, "total_steps": steps,
            "eval_every": 10, "islands.speed": "1,1,1,0.25", "data.data_dir": data_dir,
            "launch.mode": "decoupled", "launch.heartbeat_seconds": 5,
            "islands.step_seconds": step_seconds}
  policies = {"sync": {}, "sync, quorum 3, timeout 1 s": {"outer.quorum": 3,
                                                         "outer.round_timeout_seconds": 1.0},
              "async (DN + DyLU)": {"outer.policy": "async"}}
  rows, curves = [], {}
  for momentum in momenta:
    group = []
    for name, extra in policies.items():
      label = f"{name}, momentum {momentum}"
      workdir = f"{base}/hetero_{len(rows) + len(group)}"
      wall = _train(workdir, {**common, "outer.momentum": momentum, **extra})
      evals = _evals(workdir)
      t0 = min(r["time"] for r in _jsonl(os.path.join(workdir, "islands", "0",
                                                      "metrics.jsonl")))
      curves[label] = [(r["time"] - t0, r["eval_loss"]) for r in evals]
      row = {"run": name, "momentum": momentum, "step_seconds": step_seconds, "wall_s": wall,
             "final_eval": evals[-1]["eval_loss"], "updates": evals[-1]["rounds"],
             "inner_steps_applied": 4 * steps, "last_eval_s": curves[label][-1][0]}
      if os.path.exists(os.path.join(workdir, "updates.jsonl")):
        row.update(_async_updates(_jsonl(os.path.join(workdir, "updates.jsonl")),
                                  evals[-1]["rounds"]))
      group.append(row)
    target = group[0]["final_eval"]
    for row in group:
      curve = curves[f"{row['run']}, momentum {momentum}"]
      row["final_over_sync"] = row["final_eval"] / target
      for key, bound in (("time_to_sync_loss_s", target), ("time_to_within_2pct_s",
                                                            1.02 * target)):
        reach = [t for t, loss in curve if loss <= bound]
        row[key] = reach[0] if reach else None
    rows += group
  return rows, curves


def _async_updates(updates: list[dict], rounds: int) -> dict:
  """Staleness and dynamic local steps of an async run's updates (``updates.jsonl``), those
  the final eval saw (the first ``rounds``): mean / max staleness, each island's median H
  and the inner steps applied (the run's tokens: islands x total_steps batches)."""
  seen = [u for u in updates if u["version"] <= rounds]
  stale = [u["staleness"] for u in seen]
  islands = sorted({u["island"] for u in seen})
  h = {k: int(np.median([u["local_steps"] for u in seen if u["island"] == k])) for k in islands}
  return {"staleness_mean": float(np.mean(stale)), "staleness_max": int(max(stale)),
          "local_steps": ", ".join(str(h[k]) for k in islands),
          "updates_per_island": ", ".join(str(sum(u["island"] == k for u in seen))
                                          for k in islands),
          "inner_steps_applied": int(sum(u["local_steps"] for u in seen))}


def elastic(base: str, data_dir: str, steps: int) -> list[dict]:
  """2 islands with 2 more joining at 40% of the run, against 4 islands from the start."""
  common = {**TINY, "outer.sync_every": 10, "total_steps": steps, "eval_every": 10,
            "islands.max_num": 4, "data.data_dir": data_dir, "launch.mode": "decoupled"}
  at = int(0.4 * steps)
  rows = []
  for name, extra in (("4 islands from the start", {"islands.num": 4}),
                      (f"2 islands + 2 joining at step {at}",
                       {"islands.num": 2, "launch.join": f"2:{at},3:{at}"})):
    workdir = f"{base}/elastic_{len(rows)}"
    wall = _train(workdir, {**common, **extra, "faults.record_batches": True})
    digests = [r["batch"] for k in range(4)
               for r in _jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl"))]
    joined = {e["island"]: e["step"] for e in _jsonl(os.path.join(workdir, "events.jsonl"))
              if e["event"] == "island_joined"}
    rows.append({"run": name, "wall_s": wall, "final_eval": _evals(workdir)[-1]["eval_loss"],
                 "joined_at": joined, "batches": len(digests),
                 "distinct_batches": len(set(digests))})
  return rows


def wire_bytes(base: str, data_dir: str) -> list[dict]:
  rows = []
  for name, extra in (("float32", {}), ("int4", {"outer.compression": "int4",
                                                 "outer.quant_block": 64})):
    workdir = f"{base}/bytes_{name}"
    _train(workdir, {**TINY, "islands.num": 2, "outer.sync_every": 4, "total_steps": 16,
                     "eval_every": 16, "data.data_dir": data_dir, "launch.mode": "decoupled",
                     **extra})
    last = _jsonl(os.path.join(workdir, "islands", "0", "metrics.jsonl"))[-1]
    rows.append({"payload": name, "island_bytes": last["island_bytes"],
                 "wire_sent_bytes": last["wire_sent_bytes"],
                 "wire_over_payload": last["wire_sent_bytes"] / last["island_bytes"]})
  return rows


def _plot(curves: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curve in curves.items():
    ax.plot(*zip(*curve), marker=".", label=name)
  ax.set_xlabel("wall time (s)")
  ax.set_ylabel("eval loss (nats/byte)")
  ax.set_title("4 islands, speeds 1, 1, 1, 0.25")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


_FAULT_RUNS = (("crash_none", "3 islands, fault-free"), ("crash_1", "SIGKILL island 2"),
               ("crash_2", "SIGKILL the syncer"), ("elastic_0", "4 islands from the start"),
               ("elastic_1", "2 islands + 2 joining"))
_MARKS = {"island_left": ("x", "island left"), "island_rejoined": ("^", "island rejoined"),
          "syncer_restored": ("s", "syncer restored"), "island_joined": ("o", "island joined")}


def _plot_faults(base: str, path: str) -> None:
  """Eval loss vs wall time of the crash and elastic runs in ``base``, each event of the run's
  ``events.jsonl`` (left, rejoined, syncer restored, joined after the start) marked on its
  curve. Nothing is drawn when the runs are not there."""
  runs = [(d, name) for d, name in _FAULT_RUNS if os.path.exists(f"{base}/{d}/events.jsonl")]
  if not runs:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for d, name in runs:
    ax = axes[0] if d.startswith("crash") else axes[1]
    evals = [r for r in _evals(f"{base}/{d}") if "time" in r]
    t0 = min(r["time"] for r in _jsonl(f"{base}/{d}/islands/0/metrics.jsonl"))
    times, losses = [r["time"] - t0 for r in evals], [r["eval_loss"] for r in evals]
    (line,) = ax.plot(times, losses, marker=".", label=name)
    events = _jsonl(f"{base}/{d}/events.jsonl")
    started = min(e["time"] for e in events)
    shown = 0  # staggers the labels of events that land close together
    for e in events:
      if e["event"] not in _MARKS or (e["event"] == "island_joined" and e["time"] - started < 5):
        continue
      x = e["time"] - t0
      y = float(np.interp(x, times, losses))
      marker, what = _MARKS[e["event"]]
      ax.plot([x], [y], marker, color=line.get_color(), ms=9)
      ax.annotate(f"{what}" + (f" {e['island']}" if "island" in e else ""), (x, y),
                  textcoords="offset points", xytext=(4, 6 + 10 * shown), fontsize=7,
                  color=line.get_color())
      shown += 1
  for ax, title in zip(axes, ("crashes (3 islands, H=10)", "elastic join (H=10)")):
    ax.set_xlabel("wall time (s)")
    ax.set_title(title)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("eval loss (nats/byte)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
  def fmt(v):
    if v is None:
      return "—"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 10 or isinstance(v, int):
      return f"{int(v):,}"
    if isinstance(v, float) and 0 < abs(v) < 1e-3:  # e.g. a max rel. diff: not "0.0000"
      return f"{v:.1e}"
    if isinstance(v, float):
      return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)
  return (["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)] +
          ["| " + " | ".join(fmt(r.get(k)) for _, k in cols) + " |" for r in rows])


def summary(results: dict, commit: str) -> str:
  """The tables of ``results.json`` as markdown."""
  out = ["# Decoupled islands, measured", "",
         "Tiny model (`configs/tiny.py`, inner lr 1e-2), every role its own process on one "
         "2-core CPU machine. Regenerate: `python -m experiments.decoupled --out "
         "experiments/results/decoupled` (`--only NAME` for one table; each table names the "
         "commit, date and CPU it was measured at).", ""]
  sections = {
      "equivalence": ("Equivalence with the mesh-axis mode (2 islands, policy sync)", [
          ("run", "run"), ("steps", "steps"),
          ("max rel. diff, per-step losses (islands simulated in 1 process)",
           "max_rel_diff_loss"), ("first step that differs", "first_differing_step"),
          ("max rel. diff (1 island per process)", "max_rel_diff_loss_2p"),
          ("first step that differs", "first_differing_step_2p"),
          ("eval, mesh-axis", "eval_mesh"), ("eval, decoupled", "eval_decoupled"),
          ("island_bytes, mesh-axis", "bytes_mesh"), ("island_bytes, decoupled",
                                                      "bytes_decoupled")]),
      "crashes": ("Crashes (3 islands, H=10, heartbeat 2 s)", [
          ("run", "run"), ("config", "config"), ("wall s", "wall_s"),
          ("launch to first step (s)", "first_step_s"), ("final eval", "eval"),
          ("÷ fault-free", "ratio"), ("longest gap between steps of islands 0, 1 (s)",
                                      "stall_s"),
          ("longest gap at an eval round (s)", "eval_stall_s"),
          ("restarted island's next round", "rejoin_round"),
          ("its loss ÷ fault-free", "rejoin_loss_ratio"), ("events", "events"),
          ("processes left", "orphans")]),
      "heterogeneous": ("Heterogeneous speeds (4 islands, speeds 1, 1, 1, 0.25, H=10)", [
          ("policy", "run"), ("outer momentum", "momentum"),
          ("step paced to (s ÷ speed)", "step_seconds"),
          ("wall s, start-up included", "wall_s"),
          ("final eval (equal tokens)", "final_eval"), ("÷ sync", "final_over_sync"),
          ("last eval at (s)", "last_eval_s"),
          ("time to sync's final eval (s)", "time_to_sync_loss_s"),
          ("time to within 2% of it (s)", "time_to_within_2pct_s"), ("updates", "updates"),
          ("updates per island", "updates_per_island"),
          ("median H per island (DyLU)", "local_steps"),
          ("inner steps applied", "inner_steps_applied"),
          ("staleness mean", "staleness_mean"), ("staleness max", "staleness_max")]),
      "elastic": ("Elastic join (data partitions 4)", [
          ("run", "run"), ("wall s", "wall_s"), ("final eval", "final_eval"),
          ("joined at step", "joined_at"), ("batches read", "batches"),
          ("distinct batches", "distinct_batches")]),
      "bytes": ("Bytes: island_bytes against what the island's client put on the wire", [
          ("payload", "payload"), ("island_bytes (payload)", "island_bytes"),
          ("request bytes sent (headers, heartbeats, join included)", "wire_sent_bytes"),
          ("÷ payload", "wire_over_payload")]),
  }
  for key, (title, cols) in sections.items():
    if key in results:
      meta = results.get("_measured", {}).get(key)
      where = (f"Measured at {meta['commit']}, {meta['date']}, {meta['cpu']}." if meta else
               f"Measured before {commit} (no record of where).")
      out += [f"## {title}", "", where, "", *_table(results[key], cols), ""]
  if "heterogeneous" in results:
    out += ["![loss vs wall time](loss_vs_time.png)", ""]
  if "crashes" in results or "elastic" in results:
    out += ["Crashes and joins, marked on each run's eval curve:", "",
            "![crashes and joins](faults.png)", ""]
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/decoupled")
  parser.add_argument("--workdir", default="runs/decoupled")
  parser.add_argument("--data_dir", default="runs/decoupled/tfds")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--only", nargs="*", default=None)
  parser.add_argument("--crash_config", default="configs/tiny.py",
                      help="crashes: the model's config (e.g. configs/shakespeare_diloco.py "
                      "for the default Shakespeare model)")
  parser.add_argument("--step_seconds", type=float, default=0.2,
                      help="heterogeneous: each island's step paced to this / its speed (0: "
                      "its measured compute slowed instead)")
  args = parser.parse_args(argv)
  sys.path.insert(0, ROOT)
  from fedjax_lm import data  # pylint: disable=g-import-not-at-top
  data.prepare_shakespeare(args.data_dir)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
  todo = args.only or ["equivalence", "crashes", "heterogeneous", "elastic", "bytes"]
  if "equivalence" in todo:
    results["equivalence"] = equivalence(args.workdir, args.data_dir, args.steps)
  if "crashes" in todo:
    results["crashes"] = crashes(args.workdir, args.data_dir, args.steps, args.crash_config)
  if "heterogeneous" in todo:
    results["heterogeneous"], curves = heterogeneous(args.workdir, args.data_dir, args.steps,
                                                     args.step_seconds)
    _plot(curves, os.path.join(args.out, "loss_vs_time.png"))
  if "elastic" in todo:
    results["elastic"] = elastic(args.workdir, args.data_dir, args.steps)
  if "bytes" in todo:
    results["bytes"] = wire_bytes(args.workdir, args.data_dir)
  if {"crashes", "elastic", "plot"} & set(todo):  # "plot": redraw from the runs already there
    _plot_faults(args.workdir, os.path.join(args.out, "faults.png"))
  todo = [key for key in todo if key != "plot"]
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
  for key in todo:
    results.setdefault("_measured", {})[key] = {
        "commit": commit + ("+changes" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
        "cpu": machine.describe()}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(summary(results, commit))
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_defaults()
  main()
