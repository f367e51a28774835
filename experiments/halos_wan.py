"""HALoS's tiers as processes on the WAN testbed, beside flat asynchronous and synchronous
DiLoCo: every role in its own network namespace, only the global syncer's access link slow
(``--wan``, tbf each direction: the WAN between the regions and the global server), the
regions' links to their islands unshaped (the fast regional network).

    sudo python -m experiments.halos_wan --out experiments/results/halos_wan/summary.md

Flat runs (``async``, ``sync``): one syncer behind the slow link and the M islands, each
island's every update (or round) crossing it. ``halos``: the global syncer behind the slow
link, R regional syncers and M islands on unshaped links (``fedjax_lm/decoupled/region.py``);
only each region's push every K arrivals and the global params back cross the WAN. Same
model, data, tokens (M x ``total_steps`` inner steps), inner steps paced to
``islands.step_seconds`` (so compute time is the same on any CPU and under load); reports wall
time, the final eval, the bytes through the slow link, and the time of each eval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments import wan_decoupled
from experiments import wan_net

PORT = wan_decoupled.PORT


def _layout(mode: str, islands: int, regions: int):
  """``hosts -> [(name, argv, identity)]``: the syncer(s) first (namespace 0 is the one
  behind the slow link), then the islands."""
  def layout(hosts):
    gps = f"{hosts[0]}:{PORT}"
    roles = [("syncer", ["--config.launch.role=syncer", f"--config.launch.interface={hosts[0]}",
                         "--config.launch.region=-1"], "syncer")]
    common = [f"--config.launch.syncer={gps}", f"--config.islands.num={islands}"]
    if mode == "halos":
      lps = [f"{hosts[1 + r]}:{PORT}" for r in range(regions)]
      common += [f"--config.outer.halos_regions={regions}", "--config.outer.policy=async",
                 f"--config.launch.regions={','.join(lps)}"]
      roles += [(f"region_{r}", ["--config.launch.role=syncer", f"--config.launch.region={r}",
                                 f"--config.launch.interface={hosts[1 + r]}"], "syncer")
                for r in range(regions)]
    else:
      common += ["--config.outer.halos_regions=0", f"--config.outer.policy={mode}"]
    roles += [(f"island_{k}", ["--config.launch.role=island", f"--config.launch.island={k}"],
               f"island{k}") for k in range(islands)]
    return [(name, [*common, *argv], who) for name, argv, who in roles]
  return layout


def run(mode: str, args) -> dict:
  regions = args.regions if mode == "halos" else 0
  servers = 1 + regions
  roles = servers + args.islands
  rates = [args.wan] + [None] * (roles - 1)
  workdir = os.path.join(args.workdir, mode)
  record = wan_decoupled.run_roles(args.config, args.set, _layout(mode, args.islands, args.regions),
                                   roles, rates, servers, args.islands, workdir, args.timeout,
                                   args.jax_cache, args.plaintext)
  from fedjax_lm import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  evals = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  starts = [r["time"] for k in range(args.islands) for r in metrics_lib.read_jsonl(
      os.path.join(workdir, "islands", str(k), "metrics.jsonl"))[:1]]
  first = min(starts)
  slow = record["link"]["syncer"]
  return {"mode": mode, "wall_s": record["wall_s"], "wan_bytes": slow["tx_bytes"] + slow["rx_bytes"],
          "evals": [(e["step"], e["time"] - first, e["eval_loss"]) for e in evals],
          "final": evals[-1]["eval_loss"], "train_s": max(e["time"] for e in evals) - first,
          "tbf_drops": record["tbf_drops"]}


def _table(rows: list[dict], args) -> str:
  sync = next((r for r in rows if r["mode"] == "sync"), rows[0])
  out = [f"M = {args.islands} islands, R = {args.regions} regions (HALoS), global syncer's link "
         f"{args.wan} each direction, the rest unshaped; settings: {' '.join(args.set)}", "",
         "| run | first step to final eval s | ÷ sync | final eval loss | ÷ sync | "
         "bytes through the slow link | ÷ sync | evals (step: s, loss) |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    evals = "; ".join(f"{s}: {t:.0f} s, {loss:.4f}" for s, t, loss in r["evals"])
    out.append(f"| {r['mode']} | {r['train_s']:.1f} | {r['train_s'] / sync['train_s']:.3f} | "
               f"{r['final']:.4f} | {r['final'] / sync['final']:.4f} | {r['wan_bytes']:,} | "
               f"{r['wan_bytes'] / sync['wan_bytes']:.3f} | {evals} |")
  return "\n".join(out)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/shakespeare_halos.py")
  parser.add_argument("--modes", nargs="+", default=["sync", "async", "halos"])
  parser.add_argument("--islands", type=int, default=4)
  parser.add_argument("--regions", type=int, default=2)
  parser.add_argument("--wan", default="10mbit")
  parser.add_argument("--set", nargs="*", default=[
      "outer.halos_k=4", "outer.sync_every=8", "total_steps=48", "eval_every=16",
      "islands.step_seconds=1.0", "islands.speed=1,1,1,1", "data.batch_size=2",
      "eval_batches=4", "log_every=1", "checkpoint_every=100000", "mesh.island=1",
      "mesh.data=1", "launch.heartbeat_seconds=60", "outer.dynamic_local_steps=False"])
  parser.add_argument("--workdir", default="runs/halos_wan")
  parser.add_argument("--jax_cache", default="runs/halos_wan/jax_cache")
  parser.add_argument("--timeout", type=float, default=1800)
  parser.add_argument("--plaintext", action="store_true", help="no TLS (the HMAC tokens only)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  wan_net.require_root()
  from fedjax_lm.data import shakespeare  # pylint: disable=g-import-not-at-top
  shakespeare.prepare_shakespeare(None)
  rows = []
  for mode in args.modes:
    rows.append(run(mode, args))
    print(json.dumps(rows[-1]), flush=True)
  table = _table(rows, args)
  print(table)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(f"Regenerate: `sudo python -m experiments.halos_wan {' '.join(argv)}`\n\n{table}\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
