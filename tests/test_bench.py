"""The step bench's measurement: runs a config's inner step and outer sync and attributes the
profiled op time to categories of the compiled HLO."""

from experiments.bench import step as step_bench

ISLANDS = {"algorithm": "islands", "islands.num": 2, "outer.sync_every": 2, "mesh.data": 1,
           "launch.processes": 1}


def test_step_measurement_and_breakdown():
  out = step_bench.step({"config": "configs/tiny.py", "overrides": ISLANDS, "steps": 1,
                         "repeats": 1, "profile": True})
  assert out["tokens_per_step"] == 2 * 4 * 32
  assert out["step_s"] > 0 and out["sync_s"] > 0
  b = out["breakdown"]
  assert b["categories"]["matmul"] > 0 and b["op_ms"] > 0
  assert abs(sum(b["categories"].values()) - b["op_ms"]) < 0.5  # every op in one category
  assert b["top_ops"] and all("[" in t["shape"] for t in b["top_ops"])


def test_categories():
  assert step_bench._categorise("dot.3", "f32[4096,128]{1,0}", "dot", 256) == "matmul"
  assert step_bench._categorise("ynn_fusion.5", "f32[2,4096]{1,0}", "fusion", 256) == "matmul"
  scores = "f32[2,16,4,128,256]{4,3,2,1,0}"
  assert step_bench._categorise("multiply_fusion", scores, "fusion", 256) == (
      "attention scores elementwise")
  assert step_bench._categorise("wrapped_reduce-window.1", scores, "fusion", 256) == "reduction"
  assert step_bench._categorise("copy_bitcast_fusion", "f32[384,4096]", "fusion", 256) == (
      "copy / transpose")
  # Attention's batched dots ([..., heads, q, k | Dh]) apart from the projections, vmapped too.
  assert step_bench._categorise("dot.77", "f32[16,4,128,256]{3,2,1,0}", "dot", 256) == (
      "attention matmul")
  assert step_bench._categorise("dot.9", "f32[2,4096,768]{2,1,0}", "dot", 256) == "matmul"
  assert step_bench._categorise("add_fusion", "f32[16,256,256]", "fusion", 256) == (
      "attention scores elementwise")
  assert step_bench._categorise("add_fusion", "f32[4096,256]", "fusion", 256) == "elementwise"


def test_compare_table_against_ddp_has_no_duplicate_or_infinite_ratios():
  from experiments.bench import report as suite_report  # pylint: disable=g-import-not-at-top
  rows = [("DDP", {"tokens": 100, "eval_loss": 2.0, "island_bytes": 1000,
                   "island_peak_bytes": 10}),
          ("DiLoCo (M=2)", {"tokens": 100, "eval_loss": 2.2, "island_bytes": 20,
                            "island_peak_bytes": 10}),
          ("DiLoCo (M=1)", {"tokens": 100, "eval_loss": 1.9, "island_bytes": 0,
                            "island_peak_bytes": 0})]
  table = suite_report.compare_table(rows, {n: {10: r["eval_loss"]} for n, r in rows}, "tuning")
  header, _, ddp, m2, m1 = table.splitlines()[:5]
  assert header.count("bytes / DDP") == 1 and "inf" not in table
  assert m2.split(" | ")[3:6] == ["1.1000", "20", "0.0200"]
  assert m1.split(" | ")[5] == "— (none cross)"
  assert ddp.split(" | ")[-1] == "1.0000 |"


def test_machine_line_names_the_cpu_and_its_simd(tmp_path):
  """The tables' machine line: the model name and the SIMD features that pick XLA's kernels;
  an AVX2-only CPU is marked as having no AVX-512."""
  from fedjax_lm import machine  # pylint: disable=g-import-not-at-top
  zen4 = tmp_path / "zen4"
  zen4.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f "
                  "avx512_bf16 avx512_vnni\n\nprocessor\t: 1\nmodel name\t: other\n")
  assert machine.cpu_info(str(zen4)) == ("AMD EPYC", {"fpu", "avx2", "fma", "avx512f",
                                                      "avx512_bf16", "avx512_vnni"})
  assert machine.describe(str(zen4)).endswith(
      "cores, AVX2 FMA AVX-512 AVX-512 BF16 AVX-512 VNNI")
  avx2 = tmp_path / "avx2"
  avx2.write_text("model name\t: AMD EPYC 7B12\nflags\t\t: avx2 fma\n")
  assert machine.describe(str(avx2)).endswith("AVX2 FMA (no AVX-512)")
  assert machine.cpu_info(str(tmp_path / "missing")) == ("unknown CPU", set())


def test_contend_kernels_run_on_one_core_and_report_a_rate():
  import math
  import os
  from experiments.studies.contention import contend
  before = os.sched_getaffinity(0)
  try:
    core = min(before)
    rates = [contend.kernel_rate(k, core, 0.0, 0.05) for k in range(len(contend.KERNELS))]
    assert os.sched_getaffinity(0) == {core}  # the worker pins itself
  finally:
    os.sched_setaffinity(0, before)
  assert all(math.isfinite(r) and r > 0 for r in rates), rates


def test_cpu_class_groups_the_cpus_whose_float_bits_agree(tmp_path):
  """The golden recordings' CPU classes: Intel AVX-512 is one class, an AMD one per family, an
  AVX2-only AMD family 25 (Zen 3) its own; no /proc/cpuinfo is ``unknown``."""
  from fedjax_lm import machine  # pylint: disable=g-import-not-at-top
  def cls(vendor, family, flags):
    path = tmp_path / f"{vendor}{family}{len(flags)}"
    path.write_text(f"vendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: {flags}\n")
    return machine.cpu_class(str(path))
  assert cls("GenuineIntel", "6", "avx2 avx512f amx_tile") == "intel-avx512"
  assert cls("AuthenticAMD", "25", "avx2 avx512f") == "amd-avx512-family25"
  assert cls("AuthenticAMD", "25", "avx2 fma") == "amd-avx2-family25"
  assert cls("AuthenticAMD", "23", "avx2 fma") == "x86-avx2"
  assert cls("GenuineIntel", "6", "sse4_2") == "unknown"
  assert machine.cpu_class(str(tmp_path / "missing")) == "unknown"
