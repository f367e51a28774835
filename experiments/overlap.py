"""Does the exchange really overlap compute? Wall time over an artificially slow link.

  sudo python -m experiments.overlap --out experiments/results/overlap/summary.md

Two processes (one island each, ``configs/shakespeare_streaming.py`` with P fragments) run in a
fresh network namespace whose loopback is shaped by ``tc tbf`` to ``--rate`` (the only link
between the islands: gloo collectives, the jax.distributed coordinator and the host
transport's key-value exchange all cross it). Each run is timed with the link shaped and
unshaped; the difference is the communication the run did *not* hide. Compared: tau = 0 (merge
right after the send) vs tau >= 1, for the exchange as an XLA collective (``transport=xla``)
and on a host thread (``transport=host``). Needs root (``ip netns``, ``tc``); the namespace is
removed afterwards, also on failure.
"""

import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from fedjax_lm import metrics as metrics_lib

_RATE = flags.DEFINE_string("rate", "8mbit", "tc tbf rate of the shaped link.")
_STEPS = flags.DEFINE_integer("steps", 60, "Inner steps per run.")
_OVERLAP = flags.DEFINE_integer("overlap", 4, "tau of the overlapped runs.")
_COMPRESSION = flags.DEFINE_string("compression", "none", "outer.compression of every run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/overlap", "Parent directory of the runs.")
_OUT = flags.DEFINE_string("out", None, "Also write the table here.")


def _sh(*cmd):
  subprocess.run(cmd, check=True, capture_output=True, text=True)


def _run(ns, name, overlap, transport):
  workdir = os.path.join(_WORKDIR.value, name)
  args = [sys.executable, "-m", "experiments.train", "--config",
          "configs/shakespeare_streaming.py", "--workdir", workdir,
          "--config.mesh.island=2", "--config.mesh.data=1", "--config.launch.processes=2",
          f"--config.total_steps={_STEPS.value}", "--config.outer.sync_every=20",
          f"--config.outer.overlap={overlap}", f"--config.outer.transport={transport}",
          f"--config.outer.compression={_COMPRESSION.value}", "--config.log_every=1000",
          f"--config.eval_every={_STEPS.value}", f"--config.checkpoint_every={_STEPS.value}"]
  for attempt in range(3):  # retried if a run fails (counted in the table)
    subprocess.run(["rm", "-rf", workdir], check=True)
    os.makedirs(workdir)
    start = time.time()
    with open(os.path.join(workdir, "console.log"), "w") as log:
      done = subprocess.run(["ip", "netns", "exec", ns, *args], stdout=log, stderr=log)
    wall = time.time() - start
    if done.returncode == 0:
      return wall, metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1], attempt
    print(f"{name}: attempt {attempt + 1} failed (rc {done.returncode}), see {workdir}",
          flush=True)
  raise RuntimeError(f"{name} failed 3 times; see {workdir}/console.log and logs/")


def main(argv):
  del argv
  if os.geteuid() != 0:
    sys.exit("error: experiments.overlap needs root (ip netns, tc); run it with sudo")
  ns = f"fedjax_overlap_{os.getpid()}"
  rows, failed = [], 0
  try:
    _sh("ip", "netns", "add", ns)
    # MTU 1500 as on a WAN: lo's default 64 KiB (GSO) packets exceed the tbf bucket and are
    # dropped for good, which stalls TCP.
    _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "mtu", "1500", "up")
    for overlap, transport in ((0, "xla"), (_OVERLAP.value, "xla"), (0, "host"),
                               (_OVERLAP.value, "host")):
      walls = {}
      for shaped in (False, True):
        if shaped:
          _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf",
              "rate", _RATE.value, "burst", "64kb", "latency", "2s")
        else:
          subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"],
                         capture_output=True)
        name = f"tau{overlap}_{transport}_{'shaped' if shaped else 'free'}"
        walls[shaped], last, retries = _run(ns, name, overlap, transport)
        failed += retries
        print(f"{name}: {walls[shaped]:.1f}s eval {last['eval_loss']:.4f}", flush=True)
      rows.append((overlap, transport, walls[False], walls[True], last))
  finally:
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
  lines = [f"Link: tc tbf {_RATE.value} on the namespace's loopback; {_STEPS.value} steps, "
           f"P=4, H=20 (a fragment sync every 5 steps), compression {_COMPRESSION.value}, "
           f"2 processes (one island each). Failed attempts retried: {failed}.", "",
           "| tau | transport | wall, free link (s) | wall, shaped link (s) | not hidden (s) | "
           "eval loss | island_bytes |", "|---|---|---|---|---|---|---|"]
  for overlap, transport, free, shaped, last in rows:
    lines.append(f"| {overlap} | {transport} | {free:.1f} | {shaped:.1f} | {shaped - free:.1f} | "
                 f"{last['eval_loss']:.4f} | {last['island_bytes']:,} |")
  table = "\n".join(lines)
  print(table)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(f"Regenerate: `python -m experiments.overlap {' '.join(sys.argv[1:])}`\n\n"
              f"{table}\n")


if __name__ == "__main__":
  app.run(main)
