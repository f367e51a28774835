"""The decoupled syncer at model size, against synthetic islands: memory against M, round time
against S shards, and a shard killed mid-run.

    python -m experiments.syncer_bench --config configs/c4_150m.py --islands 2 4 8 \
        --shards 1 --set model.num_layers=1 --out experiments/results/syncer/memory_m
    python -m experiments.syncer_bench --config configs/c4_150m.py --islands 4 \
        --shards 1 2 4 --out experiments/results/syncer/shards_s

Each point starts S syncer shard processes (``experiments.train --config.launch.role=syncer``,
``launch.syncer_shards=S``) for a sync-policy run of the config's model with
``outer.fragments`` = F (default 4, float32 payloads, H = ``--h``), and M synthetic islands as
threads of this process. Each island joins every shard, then at each send step sends each due
fragment's payload to its shard (one pseudo-gradient in the encode program's exact layout,
N(0, 1e-4) values shared by every island, so this process holds one) and waits for the
round's mean; a barrier starts every island's sends together, as a synchronous round does. No
island trains: what is timed is the channel and the syncer's own work (decode, validate,
running sum, outer step, checkpoint, the final eval). Per point: the median and max round
time (first send of the step to the last island holding every mean of that step), each
shard's peak RSS (``VmHWM``, sampled from /proc every 0.5 s and read at exit) and their sum
÷ (params × 4 bytes). ``--kill S@R`` SIGKILLs shard S after R of its rounds (its
``faults.kill``) and restarts it: the rounds of its fragments wait, the others' do not.
Every process shares this machine's cores: compare points within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SECRET = "s" * 64


def _status(pid: int, field: str) -> int:
  try:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _overrides(args, m: int, s: int) -> dict:
  return {"launch.mode": "decoupled", "algorithm": "islands", "islands.num": m,
          "outer.fragments": args.fragments, "outer.sync_every": args.h,
          "outer.optimizer": "diloco", "outer.compression": "none",
          "total_steps": args.steps, "eval_every": args.steps, "eval_batches": 1,
          "eval_batch_size": 1, "log_every": 1, "checkpoint_every": args.steps,
          "mesh.island": 1, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
          "launch.processes": 1, "launch.heartbeat_seconds": 120,
          "launch.join_grace_seconds": 600.0, "launch.syncer_shards": s,
          "data.name": "shakespeare", "data.tokenizer": "byte", "data.data_dir": args.data_dir,
          "data.seq_len": 128, "data.batch_size": 1, "data.append_eos": False,
          "model.compute_dtype": "float32", **dict(kv.split("=", 1) for kv in args.set)}


def _config(args, m: int, s: int):
  """The config's file with the bench's overrides (and ``--set``), validated."""
  from fedjax_lm import config_lib  # pylint: disable=import-outside-toplevel
  from experiments.bench import scale  # pylint: disable=import-outside-toplevel
  c = config_lib.load_file(os.path.join(ROOT, args.config))
  c.unlock()
  config_lib.override(c, {k: scale.parse_value(v) if isinstance(v, str) else v
                          for k, v in _overrides(args, m, s).items()})
  c.launch.role, c.launch.syncer = "", ""
  config_lib.validate(c)
  return c


class Layout:
  """What a synthetic island needs: the schedule, the fingerprint and job id, one payload per
  fragment in the encode program's layout (the last leaf: the weight)."""

  def __init__(self, config, seed: int = 0):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from fedjax_lm import engine, mesh as mesh_lib, model as model_lib  # pylint: disable=import-outside-toplevel
    from fedjax_lm.decoupled import channel, syncer as syncer_lib  # pylint: disable=import-outside-toplevel
    mesh = mesh_lib.make_mesh({"island": 1, "data": 1, "fsdp": 1, "tensor": 1},
                              jax.devices()[:1])
    model_cfg = model_lib.ModelConfig.from_config(config.model)
    eng = engine.build(syncer_lib.single_island_config(config), mesh, model_cfg)
    _, abstract = model_lib.build(model_cfg)
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    self.bulk_min_bytes = int(config.launch.bulk_min_bytes)  # (-1 with --set: gRPC only)
    self.fingerprint = syncer_lib.fingerprint(config, abstract)
    self.job = channel.job_id(self.fingerprint)
    self.schedule = eng.clock.schedule
    state = jax.eval_shape(eng.init, jax.random.key(0))
    self.server_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.server))
    rng = np.random.default_rng(seed)
    self.payloads = []
    for p in range(eng.spec.frags.num):
      sent = jax.eval_shape(eng.programs.encode[p], state.islands, state.server,
                            jax.ShapeDtypeStruct((), jnp.int32),
                            jax.ShapeDtypeStruct((1,), jnp.bool_))[1]
      leaves = jax.tree.leaves(sent)
      arrays = [(rng.standard_normal(x.shape, dtype=np.float32) * 1e-4).astype(x.dtype)
                for x in leaves[:-1]]
      self.payloads.append(arrays + [np.ones(leaves[-1].shape, leaves[-1].dtype)])


def _island(k: int, layout: Layout, addresses: list[str], steps: int, barrier, times: dict,
            errors: list) -> None:
  from fedjax_lm import wire  # pylint: disable=import-outside-toplevel
  from fedjax_lm.decoupled import channel, remote  # pylint: disable=import-outside-toplevel
  who = f"island/{k}"
  key = wire.derive(_SECRET.encode(), who)
  clients = [channel.Client(a, key, who, layout.job, give_up_s=900.0,
                            bulk_min_bytes=layout.bulk_min_bytes) for a in addresses]
  limit = layout.server_bytes + 4096
  stop = threading.Event()

  def heartbeat():
    while not stop.wait(5.0):
      for c in clients:
        try:
          c.call("Heartbeat", "heartbeat", {"island": k}, deadline=5.0)
        except Exception:  # pylint: disable=broad-except
          pass
  try:
    for c in clients:  # (the reply: the shard's state, dropped at once)
      c.call("Join", "join", {"island": k, "fingerprint": layout.fingerprint}, reply="joined",
             reply_limit=limit)
    threading.Thread(target=heartbeat, daemon=True).start()
    applied: dict[int, int] = {}
    for step in range(1, steps + 1):
      due = sorted(layout.schedule.sends(step))
      if not due:
        continue
      barrier.wait()
      began = time.time()
      for p in due:
        c = clients[p % len(clients)]
        c.call("Send", "send", {"island": k, "fragment": p, "step": step, "data": ""},
               layout.payloads[p])
      for p in due:
        c = clients[p % len(clients)]
        while True:
          kind, meta, _ = c.call("Receive", "receive", {
              "island": k, "fragment": p, "step": step, "applied": applied.get(p, 0)},
                                 reply=(remote.MEAN, remote.STATE, "pending", "resend"),
                                 reply_limit=limit)
          if kind == "resend":
            c.call("Send", "send", {"island": k, "fragment": p, "step": step, "data": ""},
                   layout.payloads[p])
          elif kind != "pending":
            break
        applied[p] = step if kind == remote.MEAN else applied.get(p, 0)
      times.setdefault(step, []).append((began, time.time()))
    for c in clients:
      c.call("Leave", "leave", {"island": k})
  except Exception as e:  # pylint: disable=broad-except
    errors.append(f"island {k}: {type(e).__name__}: {e}")
    barrier.abort()
  finally:
    stop.set()
    for c in clients:
      c.close()


def point(args, m: int, s: int, workdir: str) -> dict:
  """One (M islands, S shards) run: round times, per-shard peak RSS."""
  from fedjax_lm import launch as launch_lib  # pylint: disable=import-outside-toplevel
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  config = _config(args, m, s)
  layout = Layout(config)
  addresses = [f"127.0.0.1:{launch_lib.free_port()}" for _ in range(s)]
  from fedjax_lm import cpu  # pylint: disable=import-outside-toplevel
  env = cpu.process_env({  # as the launcher starts a syncer role
      **os.environ, "FEDJAX_LM_JOB_SECRET": _SECRET, "JAX_PLATFORMS": "cpu",
      "PYTHONUNBUFFERED": "1", "FEDJAX_LM_TCMALLOC": os.environ.get("FEDJAX_LM_TCMALLOC", "0")},
                        server=True)
  kill = dict([args.kill.split("@")]) if args.kill else {}
  argv = [sys.executable, "-m", "experiments.train", "--config", args.config,
          "--workdir", workdir, *(f"--config.{k}={v}" for k, v in _overrides(args, m, s).items()),
          "--config.launch.role=syncer", f"--config.launch.syncer={','.join(addresses)}"]

  def start(shard: int) -> subprocess.Popen:
    extra = [f"--config.faults.kill=syncer/{shard}@{kill[str(shard)]}"] if str(shard) in kill \
        else []
    log = open(os.path.join(workdir, f"syncer_{shard}.log"), "ab")
    return subprocess.Popen([*argv, f"--config.launch.syncer_shard={shard}", *extra], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
  procs = {shard: start(shard) for shard in range(s)}
  peaks = {shard: 0 for shard in range(s)}
  restarts = {shard: 0 for shard in range(s)}
  times: dict[int, list] = {}
  errors: list[str] = []
  timeline: list[list] = []  # [seconds, each shard's VmRSS]
  barrier = threading.Barrier(m)
  threads = [threading.Thread(target=_island, args=(k, layout, addresses, args.steps, barrier,
                                                    times, errors)) for k in range(m)]
  began = time.time()
  for t in threads:
    t.start()
  try:
    while any(t.is_alive() for t in threads) or any(p.poll() is None for p in procs.values()):
      timeline.append([round(time.time() - began, 1)] + [
          _status(proc.pid, "VmRSS") for proc in procs.values()])
      for shard, proc in procs.items():
        peaks[shard] = max(peaks[shard], _status(proc.pid, "VmHWM"))
        if proc.poll() not in (None, 0) and restarts[shard] < 2:
          restarts[shard] += 1
          procs[shard] = start(shard)
      if time.time() - began > args.timeout:
        errors.append(f"timed out after {args.timeout} s")
        break
      time.sleep(0.5)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
  if errors:
    raise RuntimeError("; ".join(errors))
  rounds = {step: max(b for _, b in spans) - min(a for a, _ in spans)
            for step, spans in sorted(times.items())}
  values = list(rounds.values())
  by_shard = {}  # the round times of the steps whose fragments shard s owns
  for step, seconds in rounds.items():
    for shard in {p % s for p in layout.schedule.sends(step)}:
      by_shard.setdefault(shard, []).append(seconds)
  evals = []
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      evals = [json.loads(line) for line in f if line.strip()]
  return {"islands": m, "shards": s, "fragments": args.fragments, "h": args.h,
          "params": layout.params, "payload_bytes": sum(
              sum(a.nbytes for a in pl[:-1]) for pl in layout.payloads),
          "rounds": len(values), "round_s_median": float(np.median(values)),
          "round_s_max": float(np.max(values)), "round_s": rounds,
          "round_s_max_by_shard": {k: float(np.max(v)) for k, v in sorted(by_shard.items())},
          "final_eval": evals[-1]["eval_loss"] if evals else None,
          "shard_peak_rss": [peaks[shard] for shard in range(s)],
          "shards_rss_over_params_x4": sum(peaks.values()) / (4 * layout.params),
          "restarts": restarts, "seconds": time.time() - began, "rss_timeline": timeline,
          "load": os.getloadavg()[0]}


def summary(rows: list[dict], command: str, commit: str) -> str:
  from fedjax_lm import machine  # pylint: disable=import-outside-toplevel
  lines = [f"# Syncer at model size, synthetic islands ({commit}, "
           f"{time.strftime('%Y-%m-%d')}, {machine.describe()})", "", f"`{command}`", "",
           "| islands M | shards S | params | payload / island / step | rounds | round s "
           "(median / max) | max round s of each shard's fragments | shard peak RSS GB | "
           "Σ RSS ÷ (4 × params) | restarts | final eval |",
           "|---:|---:|---:|---:|---:|---|---|---|---:|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['islands']} | {r['shards']} | {r['params'] / 1e6:.1f}M | "
        f"{r['payload_bytes'] / 2**20:.0f} MiB | {r['rounds']} | {r['round_s_median']:.2f} / "
        f"{r['round_s_max']:.2f} | "
        f"{', '.join(f'{v:.1f}' for v in r['round_s_max_by_shard'].values())} | "
        f"{' + '.join(f'{b / 1e9:.2f}' for b in r['shard_peak_rss'])}"
        f" | {r['shards_rss_over_params_x4']:.2f} | "
        f"{sum(r['restarts'].values())} | {'%.6f' % r['final_eval'] if r['final_eval'] else '—'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/c4_150m.py")
  parser.add_argument("--islands", type=int, nargs="+", default=[2])
  parser.add_argument("--shards", type=int, nargs="+", default=[1])
  parser.add_argument("--fragments", type=int, default=4)
  parser.add_argument("--h", type=int, default=1)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE config overrides")
  parser.add_argument("--kill", default="", help="S@R: SIGKILL shard S after R of its rounds")
  parser.add_argument("--data_dir", default="runs/syncer_bench/tfds")
  parser.add_argument("--workdir", default="runs/syncer_bench")
  parser.add_argument("--timeout", type=float, default=3000.0)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  rows = []
  for m in args.islands:
    for s in args.shards:
      row = point(args, m, s, os.path.join(args.workdir, f"m{m}_s{s}"))
      print(json.dumps({k: v for k, v in row.items() if k not in ("round_s", "rss_timeline")}),
            flush=True)
      rows.append(row)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
  commit += "+changes" if dirty else ""
  allocator = f"FEDJAX_LM_TCMALLOC={os.environ.get('FEDJAX_LM_TCMALLOC', '0')}"  # (the shards')
  command = " ".join(filter(None, (allocator, "python -m experiments.syncer_bench",
                                   *(argv or sys.argv[1:]))))
  text = summary(rows, command, commit)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
      f.write(text)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
