"""``summary.md``, ``results.jsonl`` and PNG plots of a ``quick`` / ``full`` suite (``write``),
and the table of ``python -m experiments.compare`` (``compare_table``)."""

from __future__ import annotations

import json
import os

from experiments.bench import projection

MB = 1e6


def _kind(over: dict) -> str:
  if over.get("algorithm") == "ddp":
    return "ddp"
  return "streaming" if int(over.get("outer.fragments", 1)) > 1 else "diloco"


def method_links(rows: list[tuple[str, dict]]) -> list[dict]:
  """What the projection needs of each methods-table row."""
  out = []
  for name, r in rows:
    over = r["overrides"]
    m = int(over.get("islands.num", 2))
    steps = int(over["total_steps"])
    kind = _kind(over)
    h = int(over.get("outer.sync_every", 50)) if kind != "ddp" else 1
    p = int(over.get("outer.fragments", 1))
    payload = r["island_bytes"] / steps if kind == "ddp" else r["island_peak_bytes"] * p
    out.append({"name": name, "kind": kind, "t_c": r["step_s"], "payload": payload, "H": h,
                "t_outer": (r.get("sync_s") or 0.0) / m, "P": p,
                "tau": int(over.get("outer.overlap", 0)), "eval_steps": r["eval_steps"],
                "eval_losses": r["eval_losses"], "M": m})
  return out


def _fmt_t(t):
  if t is None:
    return "not reached"
  return f"{t:.1f} s" if t < 600 else f"{t / 3600:.2f} h"


def _ratio(a, b):
  return "—" if a is None or not b else f"{a / b:.1f}×"


def methods_table(res: dict) -> tuple[list[str], dict]:
  rows = res["methods"]
  ddp = rows[0][1]
  ddp1 = next((r for n, r in rows if n.startswith("DDP (M=1)")), ddp)
  lines = ["| method | eval loss | ÷ DDP | island_bytes | peak / sync | bytes ÷ DDP | "
           "one island's step ms | throughput ÷ plain DP | M-island step ms (simulated) | "
           "outer sync ms | sync share at its H | "
           "at H=50 | outer state / device (simulated) | (2 islands × 2 devices) | "
           "÷ (param bytes / devices per island) | peak RSS MB |", "|" + "---|" * 16]
  facts = {}
  for name, r in rows:
    over = r["overrides"]
    ref = ddp1 if int(over.get("islands.num", 2)) == 1 else ddp
    is_ddp = over.get("algorithm") == "ddp"
    h = int(over.get("outer.sync_every", 50))
    sync = r.get("sync_s") or 0.0
    lay = res["layout"].get(r["key"], {})
    sim = r["sim_step_s"]
    share_h = sync / (h * sim + sync) if sync else None
    share50 = sync / (50 * sim + sync) if sync else None
    thr = r["dp_step_s"] / r["step_s"] if r.get("dp_step_s") else None
    rel = (lay.get("outer_state_bytes", 0) /
           (lay["param_bytes"] / lay["devices_per_island"]) if lay and not is_ddp else None)
    lines.append(
        f"| {name} | {r['eval_loss']:.4f} | {r['eval_loss'] / ref['eval_loss']:.4f} | "
        f"{r['island_bytes']:,.0f} | {r['island_peak_bytes']:,} | "
        f"{r['island_bytes'] / ddp['island_bytes']:.4f} | {r['step_s'] * 1e3:.2f} | "
        f"{'1 (is plain DP)' if thr is None else f'{thr:.3f}'} | {sim * 1e3:.1f} | "
        + ("— | — | — | — | — | — |" if is_ddp else
           f"{sync * 1e3:.1f} | {share_h:.2%} | {share50:.2%} | "
           f"{r['outer_state_bytes']:,} | {lay.get('outer_state_bytes', 0):,} | {rel:.2f} |")
        + f" {r['peak_rss_bytes'] / MB:.0f} |")
    facts[name] = {"loss_ratio": r["eval_loss"] / ref["eval_loss"],
                   "bytes_ratio": r["island_bytes"] / ddp["island_bytes"], "H": h,
                   "throughput": thr, "share50": share50,
                   "outer_rel": rel, "ddp": is_ddp}
  return lines, facts


def projection_section(res: dict, gbps: float, latency_s: float) -> tuple[list[str], list]:
  links = method_links(res["methods"])
  target = res["methods"][0][1]["eval_loss"]
  proj = projection.project(links, gbps, latency_s, target)
  ddp_t = proj[0]["no_overlap"]["time_s"]
  ddp_to = proj[0]["overlap"]["time_s"]
  lines = [f"Link {gbps:g} Gbit/s, latency {latency_s * 1e3:g} ms; target = DDP (M=2)'s "
           f"final eval loss {target:.4f}. Model: `experiments/bench/projection.py`.", "",
           "| method | steps to target | s/step, no overlap | time to target | × faster than DDP"
           " | s/step, overlap | time to target | × faster than DDP (overlap) | "
           "compute share (no overlap) |", "|" + "---|" * 9]
  for p, link in zip(proj, links):  # equal quality: DDP's time to this method's final loss
    own = link["eval_losses"][-1]
    d = projection.steps_to_loss(links[0]["eval_steps"], links[0]["eval_losses"], own)
    mine = link["eval_steps"][-1] * p["no_overlap"]["step_s"]
    p["equal_quality"] = {"loss": own, "ddp_time_s": None if d is None else
                          d * proj[0]["no_overlap"]["step_s"], "time_s": mine}
  for p in proj:
    a, b = p["no_overlap"], p["overlap"]
    st = "not reached" if p["steps_to_target"] is None else f"{p['steps_to_target']:.0f}"
    lines.append(f"| {p['name']} | {st} | {a['step_s']:.4f} | {_fmt_t(a['time_s'])} | "
                 f"{_ratio(ddp_t, a['time_s'])} | {b['step_s']:.4f} | {_fmt_t(b['time_s'])} | "
                 f"{_ratio(ddp_to, b['time_s'])} | {a['compute_share']:.1%} |")
  lines += ["", "Equal quality: the time each method takes to its own final loss vs the time DDP "
            "takes to reach that same loss on its curve (no overlap).", "",
            "| method | its final loss | its time | DDP's time to that loss | × faster |",
            "|---|---|---|---|---|"]
  for p in proj:
    q = p["equal_quality"]
    lines.append(f"| {p['name']} | {q['loss']:.4f} | {_fmt_t(q['time_s'])} | "
                 f"{_fmt_t(q['ddp_time_s'])} | {_ratio(q['ddp_time_s'], q['time_s'])} |")
  return lines, proj


def paper_section() -> list[str]:
  """Ours at zero latency, as the paper's simulation (bandwidth only)."""
  return projection.paper_report(0.0).splitlines()


def sweep_tables(res: dict) -> list[str]:
  lines = []
  groups: dict = {}
  for sw, series, x, r in res["sweeps"]:
    if r is not None:
      groups.setdefault(sw, {}).setdefault(series, {})[x] = r["eval_loss"]
  for sw, by_series in groups.items():
    xs = []
    for d in by_series.values():
      xs += [x for x in d if x not in xs]
    lines += [f"#### `{sw}`", "", f"| series | " + " | ".join(str(x) for x in xs) + " |",
              "|" + "---|" * (len(xs) + 1)]
    for series, d in by_series.items():
      lines.append(f"| {series} | " + " | ".join(f"{d[x]:.4f}" if x in d else "" for x in xs)
                   + " |")
    lines.append("")
  return lines


# (method, its baseline) pairs of the seed sweep: ratios are taken seed by seed.
SEED_PAIRS = (("DiLoCo (M=2), config defaults", "DDP (M=2)", 1.02),
              ("DiLoCo (M=1), config defaults", "DDP (M=1)", 1.00))


def _mean_sd(v: list[float]) -> tuple[float, float]:
  mean = sum(v) / len(v)
  return mean, (sum((x - mean) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5


def seed_section(res: dict) -> tuple[list[str], list[str]]:
  """The seed sweep's spread: (table lines, goal lines); both empty without the sweep."""
  by: dict = {}
  for sw, series, x, r in res["sweeps"]:
    if sw == "seed" and r is not None:
      by.setdefault(series, {})[x] = r["eval_loss"]
  if not by:
    return [], []
  lines = ["| series | seeds | mean | sd | min | max |", "|---|---|---|---|---|---|"]
  for series, d in by.items():
    v = list(d.values())
    mean, sd = _mean_sd(v)
    lines.append(f"| {series} | {len(v)} | {mean:.4f} | {sd:.4f} | {min(v):.4f} | "
                 f"{max(v):.4f} |")
  goal_lines = []
  for method, base, bound in SEED_PAIRS:
    seeds = sorted(set(by.get(method, {})) & set(by.get(base, {})))
    if not seeds:
      continue
    ratios = [by[method][k] / by[base][k] for k in seeds]
    mean, sd = _mean_sd(ratios)
    lines.append(f"| {method} ÷ {base}, seed by seed | {len(seeds)} | {mean:.4f} | {sd:.4f} | "
                 f"{min(ratios):.4f} | {max(ratios):.4f} |")
    op = "≤" if bound > 1 else "<"
    ok = mean <= bound if bound > 1 else mean < bound
    goal_lines.append(f"| {method}: loss ÷ {base} {op} {bound:.2f}, mean of {len(seeds)} seeds "
                      f"(range) | {mean:.4f} ({min(ratios):.4f}–{max(ratios):.4f}) | "
                      f"{'**met**' if ok else '**not met**'} |")
  return lines, goal_lines


def tuned_lr_goal(res: dict) -> list[str]:
  """DiLoCo (config defaults) ÷ DDP, each at its best inner lr of the ``inner_lr`` sweep (the
  papers tune the inner lr per method); names a best lr at the grid's edge."""
  pts: dict = {}
  for sw, series, x, r in res["sweeps"]:
    if sw == "inner_lr" and r is not None:
      pts.setdefault(series, {})[x] = r["eval_loss"]
  a, b = pts.get("DiLoCo (config defaults)"), pts.get("DDP")
  if not a or not b:
    return []
  (la, va), (lb, vb) = min(a.items(), key=lambda kv: kv[1]), min(b.items(), key=lambda kv: kv[1])
  edge = [f"{n} at the grid's top" for n, lr, d in (("DiLoCo", la, a), ("DDP", lb, b))
          if lr == max(d)]
  return [f"| DiLoCo (M=2), config defaults: loss ÷ DDP ≤ 1.02, each at its best inner lr "
          f"(DiLoCo {la:g}, DDP {lb:g}{'; ' + ', '.join(edge) if edge else ''}) | {va / vb:.4f} | "
          f"{'**met**' if va / vb <= 1.02 else '**not met**'} |"]


def _save(fig, plt, out: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=110)
  plt.close(fig)
  return name


def _methods_plot(plt, res: dict, out: str) -> str:
  """Every method's eval loss against tokens and against bytes sent per island."""
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, r in res["methods"]:
    a1.plot(r["eval_tokens"], r["eval_losses"], marker="o", ms=3, label=name)
    steps = int(r["overrides"]["total_steps"])
    a2.plot([r["island_bytes"] * s / steps for s in r["eval_steps"]], r["eval_losses"],
            marker="o", ms=3, label=name)
  a1.set(xlabel="tokens", ylabel="eval loss (nats/byte)", title="methods: loss vs tokens")
  a2.set(xlabel="island bytes (approx., linear in steps)", xscale="log",
         title="loss vs bytes sent per island")
  a1.legend(fontsize=6)
  return _save(fig, plt, out, "methods.png")


def _sweep_plots(plt, res: dict, out: str, ddp_loss: float) -> list[str]:
  """One plot per sweep: final eval loss against the swept value, one line per series."""
  groups: dict = {}
  for sw, series, x, r in res["sweeps"]:
    if r is not None:
      groups.setdefault(sw, {}).setdefault(series, []).append((x, r["eval_loss"]))
  names = []
  for sw, by_series in groups.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(isinstance(x, (int, float)) for pts in by_series.values() for x, _ in pts)
    for series, pts in by_series.items():
      if numeric:
        pts = sorted(pts)
      xs = [x if numeric else str(x) for x, _ in pts]
      ax.plot(xs, [l for _, l in pts], marker="o", label=series)
    ax.axhline(ddp_loss, color="k", ls="--", lw=1, label="DDP (M=2)")
    if sw in ("H", "inner_lr") and numeric:
      ax.set_xscale("log")
    ax.set(xlabel=sw, ylabel="final eval loss (nats/byte)", title=f"sweep: {sw}")
    ax.legend(fontsize=7)
    names.append(_save(fig, plt, out, f"sweep_{sw}.png"))
  return names


def _time_to_loss_plot(plt, out: str, proj_links: list[dict], target: float) -> str:
  """Projected time to DDP's final loss against the link's bandwidth, one line per method."""
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  bws = [10 ** (e / 4) for e in range(-12, 9)]
  for link in proj_links:
    ys, xs = [], []
    for b in bws:
      t = projection.project([link], b, 0.05, target)[0]["no_overlap"]["time_s"]
      if t is not None:
        xs.append(b)
        ys.append(t)
    if xs:
      ax.plot(xs, ys, marker=".", label=link["name"])
  ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Gbit/s), latency 50 ms",
         ylabel="projected time to DDP's final loss (s)", title="time to loss vs bandwidth")
  ax.legend(fontsize=6)
  return _save(fig, plt, out, "time_to_loss.png")


def plots(res: dict, out: str, proj_links: list[dict]) -> list[str]:
  """Writes the PNGs; returns their file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ddp_loss = res["methods"][0][1]["eval_loss"]
  return [_methods_plot(plt, res, out), *_sweep_plots(plt, res, out, ddp_loss),
          _time_to_loss_plot(plt, out, proj_links, ddp_loss)]


def goals(facts: dict, proj: list) -> list[str]:
  def mark(ok):
    return "**met**" if ok else "**not met**"
  ddp_t = proj[0]["no_overlap"]["time_s"]
  lines = ["| goal | figure | |", "|---|---|---|"]
  for name, f in facts.items():
    if f["ddp"]:
      continue
    if (name.startswith("DiLoCo") or name.startswith("FedAvg")) and "M=1" not in name:
      lines.append(f"| {name}: bytes ÷ DDP = 1/H = {1 / f['H']:.4f} | {f['bytes_ratio']:.4f} | "
                   f"{mark(abs(f['bytes_ratio'] - 1 / f['H']) < 1e-9)} |")
  for name, f in facts.items():
    if name.startswith("DiLoCo (M=2") and "paper" not in name:
      lines.append(f"| {name}: loss ÷ DDP ≤ 1.02 | {f['loss_ratio']:.4f} | "
                   f"{mark(f['loss_ratio'] <= 1.02)} |")
    if name.startswith("DiLoCo (M=1"):
      lines.append(f"| {name}: loss ÷ DDP (M=1) < 1.00 | {f['loss_ratio']:.4f} | "
                   f"{mark(f['loss_ratio'] < 1.0)} |")
  for name, f in facts.items():
    if not f["ddp"]:
      lines.append(f"| {name}: inner-step throughput ÷ plain DP ≥ 0.97 | {f['throughput']:.3f} | "
                   f"{mark(f['throughput'] >= 0.97)} |")
      lines.append(f"| {name}: outer-sync share at H=50 < 1% | {f['share50']:.2%} | "
                   f"{mark(f['share50'] < 0.01)} |")
      lines.append(f"| {name}: outer state ≤ 2 × params ÷ devices per island | "
                   f"{f['outer_rel']:.2f} × | {mark(f['outer_rel'] <= 2.0 + 1e-9)} |")
  for p in proj[1:]:
    t = p["no_overlap"]["time_s"]
    if p["name"].startswith("DiLoCo (M=2"):
      speed = None if t is None or ddp_t is None else ddp_t / t
      lines.append(f"| {p['name']}: ≥ 10× faster to DDP's loss at the link | "
                   f"{'not reached' if speed is None else f'{speed:.1f}×'} | "
                   f"{mark(speed is not None and speed >= 10)} |")
  return lines


def sweeps_done(res: dict) -> list[str]:
  """A line saying how many sweep points are still to run (none if all are done)."""
  todo, points = sum(r is None for *_, r in res["sweeps"]), len(res["sweeps"])
  return [] if not todo else [
      f"**{points - todo} of {points} sweep points done** (the command ran with "
      "`--hours`); the empty cells are the rest. Run the same command again to continue.", ""]


def write(res: dict, out: str, info: dict, command: str, gbps: float, latency_s: float) -> None:
  """Writes summary.md, results.jsonl and the plots under ``out``."""
  rows = [r for _, r in res["methods"]] + [r for *_, r in res["sweeps"] if r is not None]
  info = {**info, "runs_s": sum(r["run_wall_s"] for r in rows),
          "resumed": sum(bool(r.get("resumed_at_step")) for r in rows)}
  table, facts = methods_table(res)
  proj_lines, proj = projection_section(res, gbps, latency_s)
  pngs = plots(res, out, method_links(res["methods"]))
  seed_lines, seed_goals = seed_section(res)
  first = res["methods"][0][1]
  lines = [f"# Bench suite `{info['suite']}`", "", f"Regenerate: `{command}`", "",
           f"git `{info['git_commit']}`, jax {info['jax']}, device `{info['device']}`, "
           f"this invocation {info['wall_s'] / 60:.1f} min (finished runs are reused), "
           f"sum of the runs' own wall times {info['runs_s'] / 60:.1f} min" + (
               f" ({info['resumed']} runs resumed from a checkpoint count only their wall "
               "time after it)" if info["resumed"] else "") + ". Every row: "
           f"path **{first['path']}**, {first['tokens']:,} tokens, "
           f"`{first['overrides']['total_steps']}` steps, seed 0 (the seed sweep repeats the "
           "goals' rows).", "",
           "## Methods", "", *table, "", "## Goals", "", *goals(facts, proj), *seed_goals,
           *tuned_lr_goal(res), "",
           *(["## Spread over seeds (final eval loss)", "", *seed_lines, ""] if seed_lines
             else []),
           "## Projected time to DDP's loss over a slow link", "", *proj_lines, "",
           "## Bandwidth for a compute utilisation at the paper scales: ours vs Streaming DiLoCo "
           "Table 4 (Gbit/s, zero latency as in the paper)", "",
           *paper_section(), "", "## Sweeps (final eval loss, nats/byte)", "",
           *(["Not run (`--methods_only`).", ""] if info.get("methods_only") else
             sweeps_done(res) + sweep_tables(res)), "## Plots", "", *[f"![{p}]({p})" for p in pngs], ""]
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for name, r in res["methods"]:
      f.write(json.dumps({**info, "table": "methods", "name": name, **r,
                          "layout": res["layout"].get(r["key"])}) + "\n")
    for sw, series, x, r in res["sweeps"]:
      if r is not None:
        f.write(json.dumps({**info, "table": f"sweep:{sw}", "series": series, "x": x, **r})
                + "\n")
    for p in proj:
      f.write(json.dumps({**info, "table": "projection", "gbps": gbps, "latency_s": latency_s,
                          **p}) + "\n")


def compare_table(rows: list, curves: dict, run_set: str) -> str:
  """Markdown: final loss and bytes of each (name, last metrics record), then eval curves."""
  # The row the others are compared to: DiLoCo after DDP, or the first; tuning: DDP.
  ref = rows[1] if rows[0][0] == "DDP" and run_set != "tuning" else rows[0]
  ddp_bytes = rows[0][1]["island_bytes"] if rows[0][0] == "DDP" else float("nan")
  ref_loss, ref_bytes, ref_peak = (ref[1]["eval_loss"], ref[1]["island_bytes"],
                                   ref[1].get("island_peak_bytes", 0))
  short = ref[0].split()[0]
  vs_ref = short != "DDP"  # bytes / DDP is already a column
  lines = [f"| method | tokens | eval loss (nats/byte) | loss / {short} | "
           "island_bytes (per island) | bytes / DDP | "
           + (f"bytes: × fewer than {short} | " if vs_ref else "") + "peak bytes per sync | "
           + (f"peak: × lower than {short} |" if vs_ref else "peak / DDP |"),
           "|---|---|---|---|---|---|---|" + ("---|---|" if vs_ref else "---|")]
  ref_peak = ref_peak if vs_ref else rows[0][1].get("island_peak_bytes", 0)
  for name, last in rows:
    b, peak = last["island_bytes"], last.get("island_peak_bytes", 0)
    nothing = "— (none cross)"  # M=1: no island axis to cross
    cells = [name, f"{last['tokens']:,}", f"{last['eval_loss']:.4f}",
             f"{last['eval_loss'] / ref_loss:.4f}", f"{b:,.0f}",
             f"{b / ddp_bytes:.4f}" if ddp_bytes == ddp_bytes and b else
             ("—" if ddp_bytes != ddp_bytes else nothing)]
    if vs_ref:
      cells.append(f"{ref_bytes / b:.2f}" if b else nothing)
    cells.append(f"{peak:,}")
    if vs_ref:
      cells.append(f"{ref_peak / peak:.2f}" if peak else nothing)
    else:
      cells.append(f"{peak / ref_peak:.4f}" if peak and ref_peak else nothing)
    lines.append("| " + " | ".join(cells) + " |")
  steps = sorted({s for c in curves.values() for s in c})
  lines += ["", "Eval loss (nats/byte) at each eval step:", "",
            "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|" + "---|" * len(steps)]
  lines += [f"| {name} | " + " | ".join(f"{c[s]:.4f}" if s in c else "—" for s in steps) + " |"
            for name, c in curves.items()]
  return "\n".join(lines)
