"""Projected wall time over a slow link between islands, from measured step times and bytes.

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

# Paper scales (Streaming DiLoCo's compute-utilisation simulation: bf16 payload; the step
# times below are our assumption for that table, not verified against the paper here).
PAPER_SCALES = ((1e9, 0.1), (10e9, 0.8), (100e9, 4.9))  # (params, seconds per step)
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


def paper_table(latency_s: float = 0.0, H: int = 100, P: int = 8, tau: int = 5,
                bits: int = 4) -> list[dict]:
  """Bandwidth (Gbit/s) for each CU target at the paper scales: DDP (bf16 gradients,
  all-reduce under the backward pass), DiLoCo (bf16, H, no overlap) and Streaming DiLoCo (P
  fragments, ``bits``-bit values, tau steps of overlap)."""
  rows = []
  for n, t in PAPER_SCALES:
    for name, payload, h, p, window in (
        ("DDP", 2 * n, 1, 1, 2 / 3), ("DiLoCo", 2 * n, H, 1, 0.0),
        (f"Streaming DiLoCo (P={P}, tau={tau}, {bits}-bit)", n * bits / 8, H, P, tau)):
      rows.append({"params": n, "step_s": t, "method": name,
                   "gbps": [bandwidth_for_cu(cu, t, payload, latency_s, h, p, window)
                            for cu in CU_TARGETS]})
  return rows


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
