"""The step bench's peer: the same model and inner step in PyTorch, timed beside ours.

``python -m experiments.studies.torch_peer.torch_peer [--rounds 3]`` times, interleaved round
by round (this machine's speed drifts), the inner step of ``configs/shakespeare_diloco.py`` on a
fixed batch:

- **1 island / 1 core**: one process pinned to one core, one thread;
- **M=2, 2 processes × 1 core**: the peer's layout (and our launcher's), one island per
  process, both timed over the same window;
- **M=2, 1 process, 2 cores**: ours with the islands simulated as ``experiments.train`` runs
  them in one process (one emulated CPU device per core, ``cpu.island_devices``); PyTorch with
  2 threads running the two islands one after the other.

Ours runs with fedjax_lm's allocator defaults (TCMalloc preloaded where the system has it);
PyTorch with glibc's malloc as it comes, and, where TCMalloc is installed, with it too.

The PyTorch model is the same function: same parameter shapes, RMSNorm, NeoX-style RoPE,
causal softmax attention (``scaled_dot_product_attention``), SwiGLU, untied unembedding;
AdamW (b1 0.9, b2 0.95, weight decay 0.1) after global-norm clipping at 1.0, eager mode. Each
worker first checks that both frameworks give the same loss on the same parameters and batch
(to 1e-4), so the rows compare one computation. Needs ``torch`` (not a fedjax_lm dependency):
``pip install torch --index-url https://download.pytorch.org/whl/cpu``. Writes
``experiments/studies/torch_peer/torch_peer.md`` (``--breakdown``: ``torch_peer_breakdown.md``,
where the 1-core step's time goes, ours beside PyTorch's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from fedjax_lm import machine

CONFIG = "configs/shakespeare_diloco.py"


def _torch_loss_fn(cfg: dict, w: dict, rows):
  """The model's training loss in PyTorch on the batch ``rows``, a closure over the parameter
  tensors ``w`` (the same function as ours: RMSNorm, NeoX RoPE, causal attention, SwiGLU)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  L, H, Dh = cfg["num_layers"], cfg["num_heads"], cfg["head_dim"]
  tokens = torch.tensor(rows[:, :-1], dtype=torch.long)
  targets = torch.tensor(rows[:, 1:], dtype=torch.long)
  t = tokens.shape[1]
  half = Dh // 2
  freqs = cfg["rope_base"] ** (-torch.arange(half, dtype=torch.float32) / half)
  ang = torch.arange(t, dtype=torch.float32)[:, None] * freqs
  cos, sin = ang.cos()[None, None], ang.sin()[None, None]  # [1, 1, T, half]

  def rms(x, s):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * s

  def rope(x):  # [B, H, T, Dh], halves rotated
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  def loss_fn():
    x = w["embed"][tokens]
    b = x.shape[0]
    for i in range(L):
      h = rms(x, w["attn_norm"][i])
      q, k, v = (torch.einsum("btd,dhk->bhtk", h, w[n][i]) for n in ("wq", "wk", "wv"))
      o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
      x = x + torch.einsum("bhtk,hkd->btd", o, w["wo"][i])
      h = rms(x, w["mlp_norm"][i])
      x = x + (F.silu(h @ w["w_gate"][i]) * (h @ w["w_up"][i])) @ w["w_down"][i]
    logits = rms(x, w["final_norm"]) @ w["unembed"]
    return F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(-1))

  return loss_fn


def _torch_breakdown(step, steps: int) -> dict:
  """Self CPU ms per step by category over ``steps`` steps, from ``torch.profiler``."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  cats = dict.fromkeys(CATEGORIES, 0.0)
  for e in prof.key_averages():
    cat = ("matmul" if e.key in ("aten::mm", "aten::bmm", "aten::addmm") else
           "attention" if "scaled_dot_product" in e.key else "elementwise, copies, reductions")
    cats[cat] += e.self_cpu_time_total / 1e3 / steps
  return cats


def torch_step_s(cfg: dict, params: dict, rows, steps: int, repeats: int,
                 start_at: float = 0.0, profile: bool = False) -> dict:
  """PyTorch: loss on ``params`` before any step, then the median seconds per AdamW step
  (``profile``: and ms per step by category over ``steps`` more, from ``torch.profiler``)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  w = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  loss_fn = _torch_loss_fn(cfg, w, rows)
  with torch.no_grad():
    loss0 = float(loss_fn())
  opt = torch.optim.AdamW(list(w.values()), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(w.values()), 1.0)
    opt.step()

  step()
  time.sleep(max(0.0, start_at - time.time()))  # concurrent workers time the same window
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    times.append((time.perf_counter() - start) / steps)
  out = {"step_s": statistics.median(times), "loss0": loss0}
  if profile:
    out["breakdown"] = _torch_breakdown(step, steps)
  return out


# The categories of the breakdown, and which of the step bench's categories (``step._categorise``)
# each one holds.
CATEGORIES = {"matmul": ("matmul",),
              "attention": ("attention matmul", "attention scores elementwise"),
              "elementwise, copies, reductions": ("elementwise", "copy / transpose", "reduction")}


def _overrides(islands: int) -> dict:
  return {"mesh.island": 1, "mesh.data": 1, "launch.processes": 1, "islands.num": islands}


def worker(spec: dict) -> dict:
  """One process: ``framework`` ours | torch, ``islands`` simulated in it, one core or all."""
  from experiments.bench import step  # pylint: disable=g-import-not-at-top  (no jax)
  if spec["one_core"]:
    step.pin_one_core(spec.get("core"))
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  cpu.apply_xla_defaults()  # before JAX starts
  if spec["framework"] == "ours":
    out = step.step(step.with_island_devices({
        "config": CONFIG, "steps": spec["steps"], "repeats": 3,
        "start_at": spec.get("start_at", 0.0), "profile": spec.get("profile"),
        "overrides": _overrides(spec["islands"])}))
    row = {"step_s": out["step_s"], "tokens_per_step": out["tokens_per_step"]}
    if spec.get("profile"):
      cats = out["breakdown"]["categories"]
      row["breakdown"] = {k: sum(cats.get(c, 0.0) for c in v) for k, v in CATEGORIES.items()}
    return row
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from fedjax_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lm import steps as steps_lib  # pylint: disable=g-import-not-at-top
  config = step.load_config(CONFIG, _overrides(spec["islands"]))
  cfg = model_lib.ModelConfig.from_config(config.model)
  b, t = int(config.data.batch_size), int(config.data.seq_len)
  rows = np.random.default_rng(0).integers(0, 256, (b, t + 1)).astype(np.int32)
  params = jax.device_get(model_lib.init_params(cfg, jax.random.key(0)))
  graphdef, _ = model_lib.build(cfg)
  ours_loss0 = float(steps_lib.mean_loss(graphdef, params, {
      "inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((b, t), np.float32)}))
  torch.set_num_threads(1 if spec["one_core"] else len(os.sched_getaffinity(0)))
  out = torch_step_s(dict(cfg.__dict__), {k: np.asarray(v) for k, v in params.items()}, rows,
                     spec["steps"], 3, spec.get("start_at", 0.0), bool(spec.get("profile")))
  if abs(out["loss0"] - ours_loss0) > 1e-4:
    raise SystemExit(f"torch_peer: the PyTorch model's loss {out['loss0']:.6f} differs from "
                     f"ours {ours_loss0:.6f} on the same parameters: not the same model")
  # PyTorch runs one island's step; M islands in one process run one after the other.
  return {"step_s": out["step_s"] * spec["islands"], "tokens_per_step": spec["islands"] * b * t,
          "loss0": out["loss0"], "ours_loss0": ours_loss0, "torch": torch.__version__,
          **({"breakdown": out["breakdown"]} if "breakdown" in out else {})}


def _spawn(spec: dict) -> subprocess.Popen:
  """A worker for ``spec``: ours with fedjax_lm's allocator defaults, PyTorch with glibc's
  malloc as it comes (``spec["tcmalloc"]``: with TCMalloc preloaded too)."""
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top
  env = cpu.without_tcmalloc(dict(os.environ))
  tcmalloc = spec.get("tcmalloc", spec["framework"] == "ours")
  env = cpu.malloc_env(env, one_core=spec["one_core"],
                       tcmalloc=cpu.tcmalloc_library() if tcmalloc else None)
  return subprocess.Popen([sys.executable, "-m", "experiments.studies.torch_peer.torch_peer",
                           "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env=env)


def _result(proc: subprocess.Popen) -> dict:
  out, _ = proc.communicate()
  if proc.returncode:
    raise SystemExit(f"torch_peer: a worker failed (exit {proc.returncode})")
  return json.loads(out.strip().splitlines()[-1])


def _pair(framework: str, steps: int, **extra) -> float:
  """Tokens/s of two 1-island processes, one per core, timed over the same window."""
  start_at = time.time() + 40  # after both have started, compiled and warmed up
  cores = sorted(os.sched_getaffinity(0))[:2]
  procs = [_spawn({"framework": framework, "islands": 1, "one_core": True, "core": c,
                   "steps": steps, "start_at": start_at, **extra}) for c in cores]
  return sum(r["tokens_per_step"] / r["step_s"] for r in map(_result, procs))


ROWS = (("1 island / 1 core", "1 process, 1 thread"),
        ("M=2, 2 processes × 1 core", "one island per process, both at once (the peer's layout)"),
        ("M=2, 1 process, 2 cores", "ours: islands simulated, one emulated CPU device per core; "
         "PyTorch: 2 threads, the two islands one after the other"))


PEER_TCMALLOC = "torch + TCMalloc"  # PyTorch with the allocator our default preloads


def measure(rounds: int, steps: int) -> dict:
  """{(row, framework): [tokens/s per round]}, the rows interleaved round by round; where the
  system has TCMalloc, PyTorch also with it preloaded (framework ``PEER_TCMALLOC``)."""
  from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top  (env helpers only)
  runs = [("ours", "ours", {}), ("torch", "torch", {})]
  if cpu.tcmalloc_library():
    runs.append((PEER_TCMALLOC, "torch", {"tcmalloc": True}))
  samples: dict = {}
  for _ in range(rounds):
    for name, fw, extra in runs:
      r = _result(_spawn({"framework": fw, "islands": 1, "one_core": True, "steps": steps,
                          **extra}))
      samples.setdefault((ROWS[0][0], name), []).append(r["tokens_per_step"] / r["step_s"])
      samples.setdefault((ROWS[1][0], name), []).append(_pair(fw, steps, **extra))
      r = _result(_spawn({"framework": fw, "islands": 2, "one_core": False, "steps": steps,
                          **extra}))
      samples.setdefault((ROWS[2][0], name), []).append(r["tokens_per_step"] / r["step_s"])
  return samples


def _measured_on() -> str:
  """The table's commit, date, CPU and versions (read from the installed packages' metadata:
  the report is written in the parent process, which needs neither framework imported)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(name):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return "not installed"

  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or "unknown commit"
  return (f"Measured at {commit}, {time.strftime('%Y-%m-%d')}, on {machine.describe()}; "
          f"JAX {version('jax')}, PyTorch {version('torch')}.")


def report(samples: dict, rounds: int, command: str) -> str:
  both = (ROWS[0][0], PEER_TCMALLOC) in samples
  lines = [f"Regenerate: `{command}`", "", _measured_on(), "",
           f"Inner step of `{CONFIG}` on a fixed batch, tokens/s (median of {rounds} rounds, "
           "interleaved). Ours: the jitted step with fedjax_lm's runtime defaults (TCMalloc "
           "preloaded where the system has it); PyTorch: eager, same model and loss (checked on "
           "the same parameters), AdamW + clipping, glibc's malloc as it comes"
           + ("; and with TCMalloc preloaded too." if both else "."), "",
           "| path | ours | PyTorch | ours ÷ PyTorch |"
           + (" PyTorch + TCMalloc | ours ÷ that |" if both else "") + " layout |",
           "|---|---|---|---|" + ("---|---|" if both else "") + "---|"]
  for path, layout in ROWS:
    ours = statistics.median(samples[(path, "ours")])
    peer = statistics.median(samples[(path, "torch")])
    row = f"| {path} | {ours:,.0f} | {peer:,.0f} | {ours / peer:.2f} |"
    if both:
      tc = statistics.median(samples[(path, PEER_TCMALLOC)])
      row += f" {tc:,.0f} | {ours / tc:.2f} |"
    lines.append(f"{row} {layout} |")
  return "\n".join(lines) + "\n"


def breakdown(rounds: int, steps: int) -> dict:
  """{framework: [breakdown row per round]} of the 1-island / 1-core step, interleaved."""
  out: dict = {}
  for _ in range(rounds):
    for fw in ("ours", "torch"):
      out.setdefault(fw, []).append(_result(_spawn(
          {"framework": fw, "islands": 1, "one_core": True, "steps": steps, "profile": True})))
  return out


def breakdown_report(rows: dict, command: str) -> str:
  """Markdown: median ms per step of each category, ours beside PyTorch."""
  med = lambda fw, f: statistics.median(f(r) for r in rows[fw])
  lines = [f"Regenerate: `{command}`", "", _measured_on(), "",
           f"Where the time of one island's step goes (`{CONFIG}`, 1 core, 1 thread), ms per step, "
           f"median of {len(rows['ours'])} interleaved rounds. Ours: XLA:CPU op time from the JAX "
           "profiler (`bench.step.breakdown`); PyTorch: self CPU time from `torch.profiler`.", "",
           "| category | ours | PyTorch | ours ÷ PyTorch | ours: the step bench's categories |",
           "|---|---|---|---|---|"]
  for cat, parts in [*CATEGORIES.items(), ("all ops", ())]:
    get = ((lambda r, c=cat: r["breakdown"][c]) if parts else
           (lambda r: sum(r["breakdown"].values())))
    a, b = med("ours", get), med("torch", get)
    lines.append(f"| {cat} | {a:.0f} | {b:.0f} | {a / b:.2f} | {', '.join(parts) or '—'} |")
  a, b = (med(fw, lambda r: r["step_s"] * 1e3) for fw in ("ours", "torch"))
  lines.append(f"| step, timed without the profiler | {a:.0f} | {b:.0f} | {a / b:.2f} | — |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat (3 repeats)")
  parser.add_argument("--out", default=None, help="default experiments/studies/torch_peer/"
                      "torch_peer.md (torch_peer_breakdown.md with --breakdown)")
  parser.add_argument("--breakdown", action="store_true",
                      help="per-category time of the 1-core step, ours beside PyTorch")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise SystemExit("torch_peer: PyTorch is not installed (pip install torch --index-url "
                     "https://download.pytorch.org/whl/cpu)") from None
  command = (f"python -m experiments.studies.torch_peer.torch_peer --rounds {args.rounds} "
             f"--steps {args.steps}")
  if args.breakdown:
    command += " --breakdown"
  if args.out:
    command += f" --out {args.out}"
  text = (breakdown_report(breakdown(args.rounds, args.steps), command) if args.breakdown else
          report(measure(args.rounds, args.steps), args.rounds, command))
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "torch_peer_breakdown.md" if args.breakdown else "torch_peer.md")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
