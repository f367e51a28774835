"""Projected wall time over a slow link between islands, from measured step times and bytes.

Used by the ``quick`` / ``full`` suites' report (:mod:`experiments.bench.report`);
``python -m experiments.bench.projection [OUT]`` writes our bandwidth-for-utilisation model beside
Streaming DiLoCo's Table 4 (default ``experiments/results/projection/paper_table4.md``).

The model (one island per site, all islands identical, the link the only shared resource):

* ``comm(S) = L + 8 S / B``: a payload of S bytes per island over a link of B bit/s and
  latency L (the payload convention of ``island_bytes``; a ring all-reduce over M islands
  moves 2(M-1)/M of it, 1 for M = 2).
* **DDP** pays an all-reduce of the gradient (S = 4N) every step:
  ``t = t_c + comm(S)``; with overlap the all-reduce runs under the backward pass (taken as
  2/3 of the step): ``t = t_c + max(0, comm(S) - 2/3 t_c)``.
* **DiLoCo / FedAvg** pay one exchange of the pseudo-gradient every H steps:
  ``t_round = H t_c + t_outer + comm(S)``; with overlap (eager updates / a one-round delayed
  outer step) the exchange runs under the next H inner steps:
  ``t_round = H t_c + t_outer + max(0, comm(S) - H t_c)``.
* **Streaming DiLoCo** sends P fragments of S/P, each every H steps, each overlapped with tau
  inner steps: ``t_round = H t_c + t_outer + P max(0, comm(S/P) - tau t_c)`` (``overlap`` uses
  the whole H/P gap between fragment sends as the window).
* ``t_c``: the measured compute time of one island's inner step (``islands.num=1`` with the
  island's batch, on one device); ``t_outer``: the measured outer sync of the M simulated
  islands (encode + exchange + outer step + merge, all on one device) / M.

Time to a loss = (inner steps to reach it, linearly interpolated on the eval curve) x time per
step; "not reached" when the curve never gets there within the run's tokens.

Compute utilisation ``CU = compute / wall``; the bandwidth needed for a CU target is the
closed form of ``exposed comm per event <= compute per event x (1/CU - 1)``:
``B = 8 s / (window + slack - L)`` (infinite when ``window + slack <= L``).
"""

from __future__ import annotations

import math

# Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512), Table 4: Gbit/s to reach each
# compute utilisation, from the paper's per-layer DAG simulator. (params, layers, seconds per
# step: Kaplan FLOPs at 60% MFU); H = 100; fragments of 3 layers; overlap tau = 1 step.
PAPER_SCALES = ((1e9, 24, 0.1), (10e9, 48, 0.8), (100e9, 108, 4.9))
PAPER_TABLE4 = {  # (params, method) -> Gbit/s at CU_TARGETS, as printed
    (1e9, "Data-Parallel"): (86.8, 152.6, 184.2, 222.3, 569.0),
    (1e9, "DiLoCo"): (1.4, 6.2, 13.3, 23.3, 86.8),
    (1e9, "Streaming DiLoCo"): (1.4, 5.2, 9.1, 16.0, 28.1),
    (1e9, "+ overlapped com."): (1.4, 4.3, 6.2, 9.1, 11.0),
    (1e9, "+ overlapped FP4 com."): (0.4, 0.9, 1.7, 2.0, 3.0),
    (10e9, "Data-Parallel"): (104.8, 222.3, 222.3, 268.3, 471.5),
    (10e9, "DiLoCo"): (1.7, 7.5, 16.0, 33.9, 104.8),
    (10e9, "Streaming DiLoCo"): (1.7, 5.2, 9.1, 13.3, 19.3),
    (10e9, "+ overlapped com."): (1.7, 3.6, 5.2, 6.2, 7.5),
    (10e9, "+ overlapped FP4 com."): (0.4, 0.9, 1.4, 1.4, 1.7),
    (100e9, "Data-Parallel"): (184.2, 323.8, 390.7, 390.7, 471.5),
    (100e9, "DiLoCo"): (3.0, 11.0, 23.3, 49.4, 184.2),
    (100e9, "Streaming DiLoCo"): (2.4, 6.2, 9.1, 11.0, 19.3),
    (100e9, "+ overlapped com."): (1.7, 3.6, 4.3, 5.2, 5.2),
    (100e9, "+ overlapped FP4 com."): (0.5, 0.9, 1.1, 1.1, 1.4),
}
PAPER_GRID_STEP = 1.21  # the paper's bandwidths are points of a log grid ~21% apart
CU_TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)


def comm_s(payload_bytes: float, gbps: float, latency_s: float) -> float:
  """Seconds to send ``payload_bytes`` over ``gbps`` Gbit/s with ``latency_s``."""
  return latency_s + payload_bytes * 8 / (gbps * 1e9)


def step_time(kind: str, t_c: float, payload: float, gbps: float, latency_s: float,
              overlap: bool, H: int = 1, t_outer: float = 0.0, P: int = 1, tau: int = 0) -> float:
  """Mean wall seconds per inner step (``kind``: ddp | diloco | streaming)."""
  if kind == "ddp":
    c = comm_s(payload, gbps, latency_s)
    return t_c + (max(0.0, c - 2 / 3 * t_c) if overlap else c)
  if kind == "diloco" or P == 1:
    c = comm_s(payload, gbps, latency_s)
    exposed = max(0.0, c - H * t_c) if overlap else c
    return (H * t_c + t_outer + exposed) / H
  c = comm_s(payload / P, gbps, latency_s)
  window = (H / P if overlap else tau) * t_c
  return (H * t_c + t_outer + P * max(0.0, c - window)) / H


def steps_to_loss(steps: list, losses: list, target: float) -> float | None:
  """First (interpolated) step where the eval curve reaches ``target``; None if never."""
  prev = None
  for s, l in zip(steps, losses):
    if l <= target:
      if prev is None or prev[1] == l:
        return float(s)
      (s0, l0) = prev
      return s0 + (s - s0) * (l0 - target) / (l0 - l)
    prev = (s, l)
  return None


def bandwidth_for_cu(cu: float, t_c: float, payload: float, latency_s: float, H: int = 1,
                     P: int = 1, window_steps: float = 0.0) -> float:
  """Gbit/s needed for compute utilisation ``cu``: every H / P steps a payload of
  ``payload / P`` goes out, overlapped with ``window_steps`` inner steps."""
  per_event_compute = H / P * t_c
  slack = per_event_compute * (1 / cu - 1)
  room = window_steps * t_c + slack - latency_s
  if room <= 0:
    return math.inf
  return payload / P * 8 / room / 1e9


def paper_table(latency_s: float = 0.0, H: int = 100, tau: int = 1) -> list[dict]:
  """Our closed form at the paper's Table 4 scales, beside the paper's numbers. Payloads are
  bf16 (2 bytes / param; FP4: 0.5). DDP's all-reduce runs under the backward pass (2/3 of
  the step). Streaming: P = layers / 3 fragments; a fragment's exchange also runs under about
  one step besides its tau overlap (the rest of the step that produced it and the next step's
  layers before it, which the paper's per-layer DAG allows), so its window is tau + 1 steps
  (tau = 0 without overlap)."""
  rows = []
  for n, layers, t in PAPER_SCALES:
    p = layers // 3
    for name, payload, h, frags, window in (
        ("Data-Parallel", 2 * n, 1, 1, 2 / 3), ("DiLoCo", 2 * n, H, 1, 0.0),
        ("Streaming DiLoCo", 2 * n, H, p, 1.0), ("+ overlapped com.", 2 * n, H, p, tau + 1.0),
        ("+ overlapped FP4 com.", n / 2, H, p, tau + 1.0)):
      ours = [bandwidth_for_cu(cu, t, payload, latency_s, h, frags, window) for cu in CU_TARGETS]
      paper = PAPER_TABLE4[(n, name)]
      rows.append({"params": n, "layers": layers, "step_s": t, "method": name, "P": frags,
                   "gbps": ours, "paper_gbps": list(paper),
                   "ratio": [o / q for o, q in zip(ours, paper)]})
  return rows


def paper_report(latency_s: float = 0.0) -> str:
  """Markdown: our projection vs Streaming DiLoCo's Table 4, cell by cell."""
  rows = paper_table(latency_s)
  ratios = [r for row in rows for r in row["ratio"]]
  near = sum(1 / PAPER_GRID_STEP <= r <= PAPER_GRID_STEP for r in ratios)
  lines = ["| params | step s | method | " + " | ".join(f"{c:.0%} CU: ours / paper" for c in
                                                     CU_TARGETS) + " |",
           "|" + "---|" * (3 + len(CU_TARGETS))]
  for r in rows:
    lines.append(f"| {r['params'] / 1e9:g}B | {r['step_s']:g} | {r['method']} | " + " | ".join(
        ("∞" if g == math.inf else f"{g:,.1f}") + f" / {q:.1f}"
        for g, q in zip(r["gbps"], r["paper_gbps"])) + " |")
  lines += ["", f"{near} of {len(ratios)} cells within one step of the paper's bandwidth grid "
            f"(×{PAPER_GRID_STEP}); ours ÷ paper: median {sorted(ratios)[len(ratios) // 2]:.2f}, "
            f"range {min(ratios):.2f}–{max(ratios):.2f}."]
  return "\n".join(lines) + "\n"


def project(methods: list[dict], gbps: float, latency_s: float, target: float) -> list[dict]:
  """Time to ``target`` loss and per-step time, with and without overlap, for each method row
  (dicts with ``name, kind, t_c, payload, H, t_outer, P, tau, eval_steps, eval_losses``)."""
  out = []
  for m in methods:
    steps = steps_to_loss(m["eval_steps"], m["eval_losses"], target)
    row = {"name": m["name"], "steps_to_target": steps}
    for overlap in (False, True):
      t = step_time(m["kind"], m["t_c"], m["payload"], gbps, latency_s, overlap,
                    m.get("H", 1), m.get("t_outer", 0.0), m.get("P", 1), m.get("tau", 0))
      row["overlap" if overlap else "no_overlap"] = {
          "step_s": t, "time_s": None if steps is None else steps * t,
          "compute_share": m["t_c"] / t}
    out.append(row)
  return out


if __name__ == "__main__":
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = sys.argv[1] if len(sys.argv) > 1 else "experiments/results/projection/paper_table4.md"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write("# Our bandwidth-for-utilisation model vs Streaming DiLoCo's Table 4\n\n"
            "Regenerate: `python -m experiments.bench.projection`. Gbit/s needed to reach each "
            "compute utilisation; ours from `projection.paper_table` (closed form, zero "
            "latency), the paper's as printed.\n\n" + paper_report())
  print(open(out).read())
