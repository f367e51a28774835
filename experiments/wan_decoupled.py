"""Decoupled islands on the WAN testbed: every syncer shard and every island in its own network
namespace, each behind its own shaped access link (``experiments/wan_net.py``), over mutual TLS
(the job's CA from ``fedjax_lm.decoupled.pki``); time per round against the link model.

    sudo python -m experiments.wan_decoupled --rates none 100mbit 20mbit --shards 1 2 \
        --out experiments/results/wan_decoupled/summary.md

Each role is ``python -m experiments.train --config.launch.mode=decoupled
--config.launch.role=...`` started inside its namespace, as a cluster scheduler would start it
(the syncer shards listen on their namespace's address; the islands reach them over the
bridge). The link model of a sync round (float32 payload of P bytes per island, M islands, S
shards each behind its own link of rate R, tbf in each direction): every island uploads and
downloads P, while shard s's link carries M x P / S each way, so the exchange takes about
``2 M P / (S R)`` on top of the round's compute (H steps, measured on the unshaped run).
``netem`` is not in this kernel: no propagation delay, only tbf's queueing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from experiments import wan_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 47100


def _rate_bits(rate: str) -> float | None:
  if rate == "none":
    return None
  units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
  for unit, scale in units.items():
    if rate.endswith(unit):
      return float(rate[:-len(unit)]) * scale
  raise ValueError(f"--rates: {rate!r} is not none or N(kbit|mbit|gbit)")


def run_one(config: str, sets: list[str], islands: int, shards: int, rate: str, workdir: str,
            timeout: float, cache: str, plaintext: bool = False) -> dict:
  """One decoupled run across a fresh testbed: S syncer shards and M islands, every link at
  ``rate``; returns its record (also ``DIR/wan.json``)."""
  def layout(hosts):
    address = ",".join(f"{h}:{PORT}" for h in hosts[:shards])
    common = [f"--config.launch.syncer={address}", f"--config.islands.num={islands}",
              f"--config.launch.syncer_shards={shards}"]
    return ([(f"syncer_{s}", [*common, "--config.launch.role=syncer",
                              f"--config.launch.syncer_shard={s}",
                              f"--config.launch.interface={hosts[s]}"], "syncer")
             for s in range(shards)] +
            [(f"island_{k}", [*common, "--config.launch.role=island",
                              f"--config.launch.island={k}"], f"island{k}")
             for k in range(islands)])
  record = run_roles(config, sets, layout, shards + islands, [None if rate == "none" else rate]
                     * (shards + islands), shards, islands, workdir, timeout, cache, plaintext)
  record.update(rate=rate, shards=shards)
  with open(os.path.join(workdir, "wan.json"), "w", encoding="utf-8") as f:
    json.dump(record, f)
  return record


def run_roles(config: str, sets: list[str], layout, roles: int, rates: list, servers: int,
              islands: int, workdir: str, timeout: float, cache: str,
              plaintext: bool = False) -> dict:
  """Runs ``layout(hosts) -> [(name, argv, identity)]`` (``roles`` of them, the first
  ``servers`` the syncer processes, which hold the job secret; identity ``syncer`` or
  ``island<k>``: its certificate, and an island's own key) each in its own namespace of a
  fresh testbed whose access link k is shaped to ``rates[k]``; returns the record: wall time,
  each link's byte counters, tbf drops."""
  # pylint: disable=g-import-not-at-top
  from fedjax_lm import cpu, wire
  from fedjax_lm.decoupled import pki
  workdir = os.path.abspath(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.join(workdir, "logs"))
  with wan_net.Testbed(roles, rates, queue_ms=500) as bed:
    hosts = [bed.address(i) for i in range(roles)]
    pki.make(os.path.join(workdir, "pki"), hosts[:servers], islands, 30)
    tls = lambda who: ["--config.launch.plaintext=True"] if plaintext else [
        f"--config.launch.tls_{k}={os.path.join(workdir, 'pki', f)}" for k, f in (
            ("ca", "ca.pem"), ("cert", f"{who}.pem"), ("key", f"{who}.key"))]
    secret = wire.new_secret()
    base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS="")
    if cache:
      base.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(cache),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    base = cpu.process_env(base)
    common = [sys.executable, "-m", "experiments.train", "--config", config, "--workdir",
              workdir, *(f"--config.{kv}" for kv in sets), "--config.launch.mode=decoupled"]
    plan = layout(hosts)
    names = [name for name, _, _ in plan]
    procs, logs = [], []
    before, start = bed.counters(), time.time()
    try:
      for i, (name, argv, who) in enumerate(plan):
        if who == "syncer":
          env = cpu.process_env(dict(base, **{wire.ENV_SECRET: secret}), server=True)
        else:
          env = dict(base, **{wire.ENV_MEMBER_KEY: wire.derive(
              secret.encode(), f"island/{int(who[6:])}").decode()})
        logs.append(open(os.path.join(workdir, "logs", f"{name}.log"), "wb"))
        procs.append(subprocess.Popen(bed.exec_argv(i, [*common, *argv, *tls(who)]), cwd=ROOT,
                                      env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
      while True:
        bad = [(n, p.returncode) for n, p in zip(names, procs) if p.poll() not in (None, 0)]
        if bad or time.time() - start > timeout:
          raise RuntimeError(f"{bad or 'timeout'}; see {workdir}/logs")
        if all(p.poll() == 0 for p in procs):
          break
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      for f in logs:
        f.close()
    wall = time.time() - start
    link = [{k: a[k] - b[k] for k in a} for a, b in zip(bed.counters(), before)]
    drops = bed.qdisc_drops()
  return {"islands": islands, "wall_s": wall, "link": dict(zip(names, link)),
          "tbf_drops": drops, "sets": sets}


def rounds(workdir: str, islands: int, h: int) -> dict:
  """From the islands' per-step records: the median round (H steps) wall time after the
  first two rounds (compiles), and the final eval."""
  # pylint: disable=g-import-not-at-top
  from fedjax_lm import metrics as metrics_lib
  per_island = []
  for k in range(islands):
    recs = metrics_lib.read_jsonl(os.path.join(workdir, "islands", str(k), "metrics.jsonl"))
    ends = {r["step"]: r["time"] for r in recs}
    marks = sorted(s for s in ends if s % h == 0)
    per_island += [ends[b] - ends[a] for a, b in zip(marks, marks[1:])][1:]
  evals = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {"round_s": statistics.median(per_island) if per_island else float("nan"),
          "eval_loss": evals[-1]["eval_loss"] if evals else float("nan")}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/shakespeare_diloco.py")
  parser.add_argument("--islands", type=int, default=2)
  parser.add_argument("--shards", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--rates", nargs="+", default=["none", "100mbit", "20mbit"])
  parser.add_argument("--h", type=int, default=10)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--set", nargs="*", default=["data.batch_size=4", "eval_batches=2",
                                                   "log_every=1", "checkpoint_every=100000",
                                                   "mesh.island=1", "mesh.data=1",
                                                   "launch.heartbeat_seconds=60"])
  parser.add_argument("--workdir", default="runs/wan_decoupled")
  parser.add_argument("--jax_cache", default="runs/wan_decoupled/jax_cache")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--plaintext", action="store_true", help="no TLS (the HMAC tokens only)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  wan_net.require_root()
  from fedjax_lm.data import shakespeare  # pylint: disable=g-import-not-at-top
  shakespeare.prepare_shakespeare(None)  # not inside a timed run
  rows = []
  for shards in args.shards:
    sets = [*args.set, f"outer.sync_every={args.h}", f"total_steps={args.steps}",
            f"eval_every={args.steps}", f"outer.fragments={max(shards, 1)}"]
    for rate in args.rates:
      workdir = os.path.join(args.workdir, f"s{shards}_{rate}")
      rec = run_one(args.config, sets, args.islands, shards, rate, workdir, args.timeout,
                    args.jax_cache, args.plaintext)
      rows.append({**rec, **rounds(workdir, args.islands, args.h)})
      print(json.dumps({k: v for k, v in rows[-1].items() if k != "link"}), flush=True)
  lines = _table(rows, args)
  print(lines)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(f"Regenerate: `sudo python -m experiments.wan_decoupled {' '.join(argv)}`\n\n"
              f"{lines}\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0


def _table(rows: list[dict], args) -> str:
  out = ["| shards S | link (each direction) | median round s | compute (unshaped) s | "
         "exchange s | model 2 M P / (S R) s | bytes up per island per round | eval | "
         "tbf drops |", "|---|---|---|---|---|---|---|---|---|"]
  rounds_n = args.steps // args.h
  for shards in args.shards:
    mine = [r for r in rows if r["shards"] == shards]
    free = next((r for r in mine if r["rate"] == "none"), None)
    for r in mine:
      islands = [v for n, v in r["link"].items() if n.startswith("island")]
      up = statistics.mean(v["tx_bytes"] for v in islands) / rounds_n
      bits = _rate_bits(r["rate"])
      model = 2 * args.islands * up * 8 / (shards * bits) if bits else 0.0
      exchange = r["round_s"] - free["round_s"] if free else float("nan")
      out.append(f"| {shards} | {r['rate']} | {r['round_s']:.2f} | "
                 f"{free['round_s'] if free else float('nan'):.2f} | {exchange:.2f} | "
                 f"{model:.2f} | {up:,.0f} | {r['eval_loss']:.4f} | {r['tbf_drops']} |")
  return "\n".join(out)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
