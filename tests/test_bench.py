"""The step bench's measurement: runs a config's inner step and outer sync and attributes the
profiled op time to categories of the compiled HLO."""

from experiments import step_bench

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
