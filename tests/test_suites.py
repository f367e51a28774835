"""The bench suites stay alive: the smallest case of the quick suite end to end (in this
process), the projection model against hand-computed values, and the GPU suite's MFU on CPU.
Speed and memory figures live in the bench, not here."""

import json
import math
import os
import platform
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from experiments.bench import gpu as gpu_bench
from experiments.bench import jobs as suite_jobs
from experiments.bench import memory as suite_memory
from experiments.bench import projection
from experiments.bench import report as suite_report
from experiments.bench import suites
from experiments.studies.torch_peer import torch_peer
from fedjax_lm import cpu


def test_link_and_step_times():
  assert projection.comm_s(4e6, 1.0, 0.05) == pytest.approx(0.05 + 0.032)  # 4 MB at 1 Gbit/s
  # DDP: the all-reduce every step; under the backward pass (2/3 of the step) with overlap.
  assert projection.step_time("ddp", 0.1, 4e6, 1.0, 0.05, False) == pytest.approx(0.182)
  assert projection.step_time("ddp", 0.1, 4e6, 1.0, 0.05, True) == pytest.approx(
      0.1 + 0.082 - 0.2 / 3)
  # DiLoCo, H=10: one exchange per 10 steps; with overlap it hides under the next round.
  assert projection.step_time("diloco", 0.1, 4e6, 1.0, 0.05, False, H=10) == pytest.approx(
      (1.0 + 0.082) / 10)
  assert projection.step_time("diloco", 0.1, 4e6, 1.0, 0.05, True, H=10) == pytest.approx(0.1)
  assert projection.step_time("diloco", 0.001, 4e6, 1.0, 0.05, True, H=10) == pytest.approx(
      (0.01 + 0.082 - 0.01) / 10)
  # Streaming: 4 fragments of 1 MB (8 ms + 50 ms each), tau = 0.2 s of overlap each.
  t = projection.step_time("streaming", 0.1, 4e6, 1.0, 0.05, False, H=20, P=4, tau=2)
  assert t == pytest.approx((2.0 + 0.0) / 20)
  t = projection.step_time("streaming", 0.01, 4e6, 1.0, 0.05, False, H=20, P=4, tau=2)
  assert t == pytest.approx((0.2 + 4 * (0.058 - 0.02)) / 20)


def test_time_to_loss_and_bandwidth_for_cu():
  assert projection.steps_to_loss([10, 20, 30], [3.0, 2.0, 1.0], 1.5) == pytest.approx(25.0)
  assert projection.steps_to_loss([10, 20], [3.0, 2.0], 3.5) == 10.0
  assert projection.steps_to_loss([10, 20], [3.0, 2.0], 1.0) is None
  # 1 GB every 100 steps of 1 s, no overlap, no latency: 50% CU needs 8 Gbit / 100 s.
  b = projection.bandwidth_for_cu(0.5, 1.0, 1e9, 0.0, H=100)
  assert b == pytest.approx(0.08)
  t = projection.step_time("diloco", 1.0, 1e9, b, 0.0, False, H=100)
  assert 1.0 / t == pytest.approx(0.5)
  assert projection.bandwidth_for_cu(0.99, 1.0, 1e9, 10.0, H=1) == math.inf
  # Against Streaming DiLoCo's Table 4 (its numbers on a ~21% log grid): DiLoCo at 50% CU
  # sends 2N bytes per H steps with no overlap, so B = 2N * 8 / (H t_c): 1B at 0.1 s/step ->
  # 1.6 Gbit/s (paper 1.4); most cells land within one grid step.
  rows = projection.paper_table()
  diloco = next(r for r in rows if r["params"] == 1e9 and r["method"] == "DiLoCo")
  assert diloco["gbps"][0] == pytest.approx(2e9 * 8 / (100 * 0.1) / 1e9)
  ratios = [x for r in rows for x in r["ratio"]]
  assert len(ratios) == 75
  assert sum(1 / 1.21 <= x <= 1.21 for x in ratios) >= 50
  fp4 = next(r for r in rows if r["params"] == 100e9 and r["method"].endswith("FP4 com."))
  ddp = next(r for r in rows if r["params"] == 100e9 and r["method"] == "Data-Parallel")
  assert all(s < d / 100 for s, d in zip(fp4["gbps"], ddp["gbps"]))  # ~400x fewer bits


@pytest.fixture
def compile_cache(tmp_path):
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  suites._setup_cache(str(tmp_path / "xla_cache"))
  yield
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.mark.slow
def test_smallest_quick_case_end_to_end(tmp_path, compile_cache):
  del compile_cache
  suite = "smoke"
  res = {"methods": [], "layout": {}, "sweeps": []}
  for name, run in suites.methods(suite):
    row = suites.method_run(suite, run, str(tmp_path / name.split()[0]), timing_steps=1,
                            rounds=1, repeats=1)
    res["methods"].append((name, row))
    res["layout"][row["key"]] = {"key": row["key"], "layout": "1 x 1",
                                 **suite_memory.outer_state_bytes(row["overrides"],
                                                            jax.devices()[:1])}
  ddp, diloco = (r for _, r in res["methods"])
  h = suites.SUITES[suite]["H"]
  assert diloco["island_bytes"] * h == ddp["island_bytes"]  # exactly 1/H of DDP
  # Outer state: global params + Nesterov momentum = 2 x the param bytes on one device.
  assert diloco["outer_state_bytes"] == 2 * diloco["param_bytes"]
  assert diloco["step_s"] > 0 and diloco["dp_step_s"] > 0 and diloco["sync_s"] > 0
  assert diloco["peak_rss_bytes"] > 0
  sweep_run = {"outer.sync_every": h, "outer.learning_rate": 0.3}
  res["sweeps"].append(("outer_lr", "M=2", 0.3, suites.train_run(suite, sweep_run,
                                                                  str(tmp_path / "sw"))))
  info = {"suite": suite, "git_commit": "test", "jax": jax.__version__, "device": "cpu",
          "wall_s": 1.0}
  suite_report.write({**res, "sweeps": res["sweeps"] + [("outer_lr", "M=2", 0.7, None)]},
                     str(tmp_path), info, "pytest", 1.0, 0.05)  # --hours ran out: one to go
  assert "**1 of 2 sweep points done**" in (tmp_path / "summary.md").read_text()
  suite_report.write(res, str(tmp_path), info, "pytest", 1.0, 0.05)
  text = (tmp_path / "summary.md").read_text()
  assert "## Methods" in text and "## Goals" in text and "outer_lr" in text
  assert "sweep points done" not in text
  assert f"{1 / h:.4f} | **met**" in text
  for png in ("methods.png", "sweep_outer_lr.png", "time_to_loss.png"):
    assert os.path.getsize(tmp_path / png) > 1000
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert {r["table"] for r in rows} == {"methods", "sweep:outer_lr", "projection"}
  assert all(r["path"] == suites.PATH for r in rows if r["table"] != "projection")
  only = tmp_path / "methods_only"  # --methods_only: the same table, no sweeps
  only.mkdir()
  suite_report.write({**res, "sweeps": []}, str(only), {**info, "methods_only": True}, "pytest",
                     1.0, 0.05)
  text = (only / "summary.md").read_text()
  assert "## Goals" in text and "Not run (`--methods_only`)." in text and "outer_lr" not in text
  assert sorted(os.listdir(only)) == ["methods.png", "results.jsonl", "summary.md",
                                      "time_to_loss.png"]


def test_runs_worker_trains_points_outside_the_grid(tmp_path, compile_cache):
  del compile_cache
  out = tmp_path / "side_runs.jsonl"
  runs = [{"outer.sync_every": 2}, {"outer.sync_every": 4}]
  suites.worker({"kind": "runs", "suite": "smoke", "runs": runs, "out": str(out),
                 "workdir": str(tmp_path / "w")})
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["kind"] for r in rows] == ["runs", "runs"]
  assert [r["key"] for r in rows] == [suites._key(r, "smoke") for r in runs]
  assert rows[0]["island_bytes"] == 2 * rows[1]["island_bytes"] > 0  # twice the syncs
  assert all(math.isfinite(r["eval_loss"]) for r in rows)


def test_a_killed_full_suite_run_resumes_exactly_where_its_queue_left_it(tmp_path,
                                                                          compile_cache):
  del compile_cache
  run = {"outer.sync_every": 4, "outer.fragments": 2, "outer.overlap": 1}  # Streaming
  jobs = tmp_path / "jobs.json"
  killed_once = {**run, "faults.kill": "process/0@6"}  # the key (and resume dir) is run's
  jobs.write_text(json.dumps([{"kind": "runs", "runs": [killed_once]}]))
  out, resume = tmp_path / "runs.jsonl", tmp_path / "resume"
  spec = {"kind": "queue", "suite": "smoke", "jobs": str(jobs), "out": str(out),
          "workdir": str(tmp_path / "w"), "resume_dir": str(resume)}
  # The same XLA configuration as this process, which resumes the run and trains the reference
  # (run_suite's workers share one too): XLA:CPU splits some dots differently with 1 host
  # device than with this process's 4, which moves the 7th digit of the losses.
  env = dict(os.environ)
  killed = subprocess.run([sys.executable, "-m", "experiments.bench.suites", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert killed.returncode == -9, killed.stdout + killed.stderr  # SIGKILLed after step 6
  (wd,) = resume.iterdir()
  assert suites.checkpointed_step(str(wd)) == 4 and not out.exists()  # the eval at 4 saved
  os.remove(f"{jobs}.claim0")  # what run_suite does before a queue runs again
  suites.worker(spec)
  (row,) = [json.loads(l) for l in out.read_text().splitlines()]
  assert row["resumed_at_step"] == 4 and not wd.exists()  # done: its directory goes
  never_stopped = suites.train_run("smoke", run, str(tmp_path / "ref"))
  assert never_stopped["resumed_at_step"] == 0
  assert row["eval_losses"] == never_stopped["eval_losses"]
  assert row["island_bytes"] == never_stopped["island_bytes"] > 0


def test_hours_stops_the_training_phase_and_says_what_is_left(tmp_path):
  with pytest.raises(SystemExit, match="not all done; run the same command again"):
    suite_jobs.run_suite("smoke", str(tmp_path), workers=1, hours=1e-9)  # no time at all
  assert not (tmp_path / "runs.jsonl").exists()  # its worker was stopped before any row


def test_sweep_grid_reuses_runs():
  keys = [suites._key(run) for *_, run in suites.sweeps("quick")]
  assert len(set(keys)) < len(keys)  # shared points run once
  assert suites._key({"islands.num": 2}) == suites._key({})  # the config's own M
  assert suites._key({"outer.learning_rate": 0.123}) != suites._key({})


def test_frontier_settings_enter_the_key_only_where_in_use():
  """DeMo's, DES-LOC's, HeLoCo's and the delay's keys are absent from the runs recorded before
  them (their keys stay) and tell their own runs apart from DiLoCo's."""
  plain = json.loads(suites._key({}))["outer"]
  assert not {k for k in plain if k.startswith(("demo_", "desloc_", "heloco_", "gossip"))}
  assert "delay" not in plain
  meth = dict(suites.methods("quick"))
  keys = [suites._key(run) for run in meth.values()]
  assert len(set(keys)) == len(keys) - 1  # only "(its H)" repeats the H=50 row
  desloc = next(r for n, r in meth.items() if n.startswith("DES-LOC"))
  assert desloc["outer.sync_every"] == 10  # K_v = 60 fires 4 times in 300 steps
  assert suites._key({**desloc, "outer.desloc_nu_every": 0}) != suites._key(desloc)
  assert suites._key({"outer.delay": "naive"}) != suites._key({})
  heloco = {"outer.delay": "naive", "outer.optimizer": "heloco", "outer.hparams_for": "heloco"}
  assert suites._key({**heloco, "outer.heloco_c_ok": -1.0}) != suites._key(heloco)
  demo = next(r for n, r in meth.items() if n.startswith("DeMo"))
  assert suites._key({**demo, "outer.demo_topk": 16}) != suites._key(demo)


def test_job_plan_runs_each_point_once_and_compiles_each_new_program_in_one_job():
  key = suites._key
  jobs, untimed = suite_jobs.plan("quick", set())
  meth = {key(run) for _, run in suites.methods("quick")}
  assert [j["kind"] for j in jobs[:len(meth)]] == ["method_train"] * len(meth)  # first, once
  assert {key(j["runs"][0]) for j in jobs[:len(meth)]} == meth and len(untimed) == len(meth)
  sweep_runs = [key(r) for j in jobs if j["kind"] == "runs" for r in j["runs"]]
  assert sorted(sweep_runs) == sorted({key(r) for *_, r in suites.sweeps("quick")} - meth)
  program = lambda run: suite_jobs._inner_program(run, "quick")
  compiled = {program(run) for _, run in suites.methods("quick")}
  owner = {}  # a program no method compiled: all its runs in one job
  for i, job in enumerate(jobs):
    for run in job["runs"]:
      if program(run) not in compiled:
        assert owner.setdefault(program(run), i) == i
  # Inner lr and M change the inner program; outer lr, H, seed, partition and codec do not.
  assert program({"inner.learning_rate": 1e-2}) != program({})
  assert program({"islands.num": 4}) != program({})
  assert len({program(r) for r in ({}, {"outer.learning_rate": 0.1}, {"outer.sync_every": 10},
                                  {"seed": 3}, {"data.partition": "by_play"},
                                  {"outer.compression": "int4"})}) == 1
  have = ({("runs", key(r)) for *_, r in suites.sweeps("quick")} |
          {("method", key(r)) for _, r in suites.methods("quick")})
  assert suite_jobs.plan("quick", have) == ([], [])  # resumed: nothing left
  only, untimed = suite_jobs.plan("quick", set(), sweeps=False)  # --methods_only
  assert [j["kind"] for j in only] == ["method_train"] * len(meth) and len(untimed) == len(meth)
  full, _ = suite_jobs.plan("full", set())  # days: one run per job, whole sweeps in order
  rank = {}  # a point shared by sweeps runs with the first of them in FULL_ORDER
  for sw, *_, r in suites.sweeps("full"):
    k = suites._key(r, "full")
    rank[k] = min(rank.get(k, 99), suites.FULL_ORDER.index(sw))
  order = [rank[suites._key(j["runs"][0], "full")] for j in full if j["kind"] == "runs"]
  assert all(len(j["runs"]) == 1 for j in full) and order[0] == 0  # the seed sweep first
  assert order == sorted(order)


def test_queue_claims_each_job_once_and_peak_rss_resets(tmp_path):
  q = str(tmp_path / "jobs.json")
  assert suites._claimed(q, 0) and not suites._claimed(q, 0) and suites._claimed(q, 1)
  import numpy as np  # pylint: disable=g-import-not-at-top
  big = np.ones(64 * 2**20 // 8)  # 64 MiB touched, then freed
  before = suite_memory.peak_rss_bytes()
  del big
  suite_memory.peak_rss_reset()
  assert suite_memory.peak_rss_bytes() < before - 32 * 2**20


def test_seed_sweep_repeats_the_goal_rows_and_reports_ratios_seed_by_seed():
  meth = {suites._key(run) for _, run in suites.methods("quick")}
  seeds = [(series, x, run) for sw, series, x, run in suites.sweeps("quick") if sw == "seed"]
  assert len(seeds) == 3 * len(suites.SEED_SERIES)
  assert all(suites._key(run) in meth for _, x, run in seeds if x == 0)  # reused, not re-run
  assert len({suites._key(run) for *_, run in seeds}) == len(seeds)  # every seed is a new run
  assert all("outer.momentum" not in run for *_, run in seeds)  # the config's defaults
  loss = {("DDP (M=2)", 0): 2.0, ("DDP (M=2)", 1): 2.2,
          ("DiLoCo (M=2), config defaults", 0): 2.1, ("DiLoCo (M=2), config defaults", 1): 2.2}
  res = {"sweeps": [("seed", s, x, {"eval_loss": v}) for (s, x), v in loss.items()]}
  table, goal = suite_report.seed_section(res)
  assert "| DDP (M=2) | 2 | 2.1000 | 0.1414 | 2.0000 | 2.2000 |" in table
  # seed by seed: 2.1 / 2.0 = 1.05 and 2.2 / 2.2 = 1.0; mean 1.025 > 1.02
  assert goal == ["| DiLoCo (M=2), config defaults: loss ÷ DDP (M=2) ≤ 1.02, mean of 2 seeds "
                  "(range) | 1.0250 (1.0000–1.0500) | **not met** |"]
  assert suite_report.seed_section({"sweeps": []}) == ([], [])


def test_inner_lr_sweep_compares_each_method_at_its_best_lr():
  pts = [("inner_lr", "DDP", 1e-3, 2.3), ("inner_lr", "DDP", 1e-2, 2.0),
         ("inner_lr", "DiLoCo (config defaults)", 1e-3, 2.2),
         ("inner_lr", "DiLoCo (config defaults)", 1e-2, 2.03)]
  res = {"sweeps": [(sw, s, x, {"eval_loss": v}) for sw, s, x, v in pts]}
  assert suite_report.tuned_lr_goal(res) == [
      "| DiLoCo (M=2), config defaults: loss ÷ DDP ≤ 1.02, each at its best inner lr (DiLoCo "
      "0.01, DDP 0.01; DiLoCo at the grid's top, DDP at the grid's top) | 1.0150 | **met** |"]
  over = {x: run for sw, series, x, run in suites.sweeps("quick")
          if sw == "inner_lr" and series == "DiLoCo (config defaults)"}
  assert over[3e-3]["outer.momentum"] == 0.5  # the config's outer, not the paper's 0.9
  assert suites._key(over[3e-3]) == suites._key({})  # = the config-defaults methods row


def test_gpu_suite_mfu_on_cpu():
  row = gpu_bench.measure("tiny", steps=1, repeats=1)
  assert row["flops_per_token"] > 0 and row["tokens_per_s"] > 0
  assert 0 < row["mfu"] < 1.5
  assert row["peak_source"].startswith("measured") or row["platform"] != "cpu"
  assert gpu_bench.device_peak("NVIDIA H200") == 989e12
  assert gpu_bench.device_peak("some CPU") is None


def test_torch_peer_report_takes_medians_and_ratios():
  samples = {(row, fw): v for row, *_ in torch_peer.ROWS
             for fw, v in (("ours", [800.0, 900.0, 1000.0]), ("torch", [1000.0, 1000.0, 9.0]))}
  text = torch_peer.report(samples, 3, "cmd")
  assert "| 1 island / 1 core | 900 | 1,000 | 0.90 |" in text



def test_torch_peer_breakdown_maps_our_categories_and_takes_medians():
  assert sorted(c for parts in torch_peer.CATEGORIES.values() for c in parts) == sorted(
      ["matmul", "attention matmul", "attention scores elementwise", "elementwise",
       "copy / transpose", "reduction"])  # every category of step_bench._categorise, once
  row = lambda m, a, e, s: {"breakdown": {"matmul": m, "attention": a,
                                          "elementwise, copies, reductions": e}, "step_s": s}
  rows = {"ours": [row(440, 230, 430, 1.0), row(460, 250, 520, 1.2), row(450, 240, 500, 9.0)],
          "torch": [row(400, 180, 200, 0.8), row(420, 170, 220, 0.9), row(410, 175, 210, 0.1)]}
  text = torch_peer.breakdown_report(rows, "cmd")
  assert "| matmul | 450 | 410 | 1.10 | matmul |" in text
  assert "| elementwise, copies, reductions | 500 | 210 | 2.38 |" in text
  assert "| all ops | 1190 | 795 | 1.50 | — |" in text  # medians of the per-round sums
  assert "| step, timed without the profiler | 1200 | 800 | 1.50 | — |" in text


_FAULTS = """
import resource
from experiments.bench import step
step.pin_one_core()
from fedjax_lm import cpu
cpu.apply_xla_defaults()
s = step.Stepper({"config": "configs/shakespeare_diloco.py",
                  "overrides": step.PATHS["1 island / 1 core"][0]})
s.run(8)  # warm: the heap grows to the step's size
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  s.run(1)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])  # the median step (one step in a while re-faults as the heap settles)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables")
def test_one_core_heap_tunables_stop_the_per_step_page_faults():
  """The default config's 1-core step (one island, 272 MB of temporaries) in a fresh process:
  with the huge-pages default alone the kernel faults the temporaries in again at every step
  (136 huge pages a step, measured); with fedjax_lm's one-core heap tunables they stay in the
  heap (0 a step once warm)."""
  faults = {}
  for one_core in (False, True):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", "LD_PRELOAD")}
    env = cpu.malloc_env({**env, "PYTHONPATH": ROOT}, one_core=one_core,
                         tcmalloc=None)  # 1 device; glibc's malloc
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    faults[one_core] = float(out.stdout.strip().splitlines()[-1])
  assert faults[False] >= 64, faults
  assert faults[True] <= 4, faults


def test_compare_runs_every_study_set_by_name_and_keeps_only_method_sets_itself():
  """``compare --set NAME`` finds a study's set (experiments/studies/<name>/sets.py) as well as
  its own; every row names a config that exists and a unique run name within its set."""
  # compare defines absl flags when imported (as other commands do): read it in a process
  # of its own
  out = subprocess.run([sys.executable, "-c", (
      "import json; from experiments import compare; "
      "print(json.dumps([compare.run_sets(), list(compare.RUN_SETS)]))")], cwd=ROOT,
                       capture_output=True, text=True, check=True)
  sets, own = json.loads(out.stdout.strip().splitlines()[-1])
  assert not any(n.startswith(("eager", "budget", "sparseloco", "fidelity", "m_rows"))
                 for n in own)
  for name in ("eager_quick", "budget_2000", "sparseloco", "sparseloco_2000", "fidelity_1000",
               "m_rows64", "methods"):
    assert name in sets, name
  for name, rows in sets.items():
    assert len({r[0] for r in rows}) == len(rows), name
    assert all(os.path.isfile(os.path.join(ROOT, config)) for _, config, _ in rows), name
  assert len(sets["eager_quick"]) == 1 + 2 * 2 * 3 + 2  # DDP, seed x H x 3 methods, ours x H
