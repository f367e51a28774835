"""Tables and plot of ``experiments.wan``'s sweep: results.jsonl, summary.md, wan.png.

``summary.md`` is generated up to the ``<!-- reading -->`` marker; what follows the marker in
an existing file (the written reading of the results) is kept.
"""

from __future__ import annotations

import json
import os

MARKER = "<!-- reading -->"


def _mb(n) -> str:
  return "-" if n is None else f"{n / 1e6:,.2f}"


def _s(x, fmt="{:.1f}") -> str:
  return "-" if x is None else fmt.format(x)


def _time_table(rows: list[dict], bandwidths: list[str], main: tuple[str, ...]) -> list[str]:
  lines = ["| link | method | steps | final eval loss | first eval <= DDP's final loss | "
           "training time to it (s) | speed-up vs DDP | wall time to it, incl. startup and "
           "evals (s) | median step (s) | blocked in syncs (s) | foreign CPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for bw in bandwidths:
    ddp = next(r for r in rows if r["bandwidth"] == bw and r["method"] == "ddp")
    for r in rows:
      if r["bandwidth"] != bw or r["method"] not in main:
        continue
      if r["target_step"]:
        hit = next(e for e in r["evals"] if e["step"] == r["target_step"])
        reached = f"step {r['target_step']} ({hit['eval_loss']:.4f})"
        speed = f"{ddp['train_s_to_target'] / r['train_s_to_target']:.2f}x"
        to_target, wall = _s(r["train_s_to_target"]), _s(r["wall_s_to_target"])
      else:
        reached = (f"not reached in {r['steps']} steps (best {r['best_eval_loss']:.4f} = "
                   f"{r['best_eval_loss'] / r['target']:.3f} x target)")
        speed = f"< {ddp['train_s_to_target'] / r['train_s']:.2f}x"
        to_target, wall = f"> {r['train_s']:.1f}", f"> {r['wall_s']:.1f}"
      lines.append(
          f"| {bw} | {r['label']} | {r['steps']} | {r['final_eval_loss']:.4f} | {reached} | "
          f"{to_target} | {speed} | {wall} | {r['median_step_s']:.3f} | "
          f"{_s(r['blocked_in_syncs_s'])} | {_s(r['foreign_cpu_share'], '{:.0%}')} |")
  return lines


def _bytes_table(rows: list[dict], bandwidths: list[str]) -> list[str]:
  lines = ["| link | method | island_bytes (MB) | link tx, island 0 / 1 (MB) | link rx, island "
           "0 / 1 (MB) | link tx / island_bytes | packets sent, island 0 | tbf drops |",
           "|---|---|---|---|---|---|---|---|"]
  for bw in bandwidths:
    for r in rows:
      if r["bandwidth"] == bw:
        ratio = r["link_over_island_bytes"]
        lines.append(
            f"| {bw} | {r['label']} | {_mb(r['island_bytes'])} | "
            f"{' / '.join(_mb(x) for x in r['link_tx_bytes'])} | "
            f"{' / '.join(_mb(x) for x in r['link_rx_bytes'])} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {r['link_packets'][0]:,} | "
            f"{r['tbf_drops']:,} |")
  return lines


def _overlap_table(rows: list[dict], bw: str, pairs) -> list[str]:
  lines = ["| method | final eval loss | blocked in syncs (s) | per 100 steps (s) | "
           "median step (s) | compute step (s) | training time (s) |",
           "|---|---|---|---|---|---|---|"]
  for key in pairs:
    r = next((r for r in rows if r["bandwidth"] == bw and r["method"] == key), None)
    if r:
      lines.append(f"| {r['label']} | {r['final_eval_loss']:.4f} | "
                   f"{_s(r['blocked_in_syncs_s'], '{:.2f}')} | "
                   f"{_s(r['blocked_per_100_steps_s'], '{:.2f}')} | {r['median_step_s']:.3f} | "
                   f"{_s(r['compute_step_s'], '{:.3f}')} | {r['train_s']:.1f} |")
  return lines


def plot(rows: list[dict], bandwidths: list[str], main: tuple[str, ...], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(bandwidths), figsize=(5 * len(bandwidths), 4), sharey=True)
  for ax, bw in zip(axes if len(bandwidths) > 1 else [axes], bandwidths):
    for r in rows:
      if r["bandwidth"] == bw and r["method"] in main:
        ax.plot([e["train_s"] for e in r["evals"]], [e["eval_loss"] for e in r["evals"]],
                marker="o", ms=3, label=r["label"])
    target = next(r["target"] for r in rows if r["bandwidth"] == bw)
    ax.axhline(target, color="gray", ls="--", lw=1, label="DDP's final loss (target)")
    ax.set_ylim(target - 0.3, target + 1.0)
    ax.set_title(f"link {bw} (tbf, each direction)")
    ax.set_xlabel("training time (s; compilation and evals excluded)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  (axes[0] if len(bandwidths) > 1 else axes).set_ylabel("eval loss (nats/byte)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(rows: list[dict], out: str, *, command: str, setup: str, bandwidths: list[str],
          queue_ms: int, latency_note: str, main=("ddp", "diloco", "streaming"),
          overlap=("streaming_tau0", "streaming", "diloco_host", "diloco_tau5")) -> str:
  """Writes the three files under ``out``; returns the tables as Markdown."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  plot(rows, bandwidths, main, os.path.join(out, "wan.png"))
  tables = "\n".join([
      "## Time to DDP's loss", "",
      *_time_table(rows, bandwidths, main), "",
      "## Bytes on the link vs island_bytes", "",
      *_bytes_table(rows, bandwidths), "",
      f"## Overlap at {bandwidths[-1]}: time blocked in syncs", "",
      *_overlap_table(rows, bandwidths[-1], overlap)])
  head = "\n".join([
      "# WAN testbed: measured time to loss over a shaped link", "",
      f"Regenerate (as root): `{command}`", "", setup, "",
      f"Links: every island's veth access link shaped by `tc tbf` to the rate shown, in each "
      f"direction (queue <= {queue_ms} ms, MTU 1500, one packet per GSO segment); "
      f"{latency_note}. "
      "Training time = the sum of per-step wall times logged by the training loop "
      "(`log_every=1`; evaluation, process startup and the final checkpoint excluded; step 1, "
      "which compiles, counted as a median step, and each step of the first sync round, which "
      "traces and compiles the sync programs, as a typical sync step of the later rounds). "
      "Wall time = seconds from launching the "
      "processes until the record appeared (startup, compilation and every eval so far "
      "included). Blocked in syncs = the excess over a compute-only step of the steps at and "
      "right after a sync event, from the second sync round on (DDP: every step, against "
      "DiLoCo's compute-only step at the same bandwidth). Foreign CPU = share of the 2 cores "
      "used by other processes on the machine during the run.", "", tables, ""])
  path = os.path.join(out, "summary.md")
  reading = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if MARKER in old:
      reading = old[old.index(MARKER) + len(MARKER):]
  with open(path, "w") as f:
    f.write(head + "\n" + MARKER + (reading or "\n"))
  return tables
