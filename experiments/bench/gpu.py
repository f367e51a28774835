"""``python -m experiments.bench --suite gpu``: tokens/s and model-FLOPs utilisation (MFU) of the
inner step on one device (``measure``; ``summary`` is its ``summary.md``).

MFU = ``model.train_flops_per_token`` (6N + 12·L·T·H·Dh per training token, PaLM's
convention: N = matmul weights incl. the unembedding, attention over the full T×T square) ×
tokens/s ÷ the device's peak. The peak is ``--peak_tflops`` if given, else the dense bf16
peak of a known accelerator (``PEAKS``, by ``device_kind``), else (CPU) the measured peak of
a jitted matmul in the step's compute dtype, best over ``step.PEAK_SHAPES``
(``step.matmul_peak``).

The model: ``--size 350m`` (24 layers, d=1024, 16 heads × 64, SwiGLU 2816, vocab 32768, seq
1024, bf16 compute, f32 params; ~0.37B params) on an accelerator, ``tiny`` (the quick suite's
2-layer d=64 model) on CPU. The step is the plain data-parallel step (``algorithm=ddp``, one
island, one device) on a fixed random batch; median of the timed repeats.
"""

from __future__ import annotations

from experiments.bench import step
from experiments.bench import suites

PEAKS = {  # dense bf16 TFLOP/s per chip (vendor datasheets, no sparsity)
    "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L4": 121.0,
    "L40S": 362.0, "A10G": 125.0, "V100": 125.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "B200": 2250.0, "GB200": 2500.0,
}
SIZES = {
    "350m": {"model.num_layers": 24, "model.embed_dim": 1024, "model.num_heads": 16,
             "model.num_kv_heads": 16, "model.head_dim": 64, "model.mlp_dim": 2816,
             "model.vocab_size": 32768, "model.max_len": 1024, "data.seq_len": 1024,
             "data.batch_size": 8, "model.compute_dtype": "bfloat16"},
    "tiny": {**suites.TINY, "data.batch_size": 8},
}
BASE = {"algorithm": "ddp", "islands.num": 1, "mesh.island": 1, "mesh.data": 1,
        "launch.processes": 1, "launch.mode": "none"}


def device_peak(kind: str) -> float | None:
  """Dense bf16 FLOP/s of a known device kind (longest matching name), else None."""
  hits = [k for k in PEAKS if k.lower() in kind.lower()]
  return PEAKS[max(hits, key=len)] * 1e12 if hits else None


def measure(size: str | None = None, peak_tflops: float | None = None, steps: int = 5,
            repeats: int = 3, batch_size: int | None = None) -> dict:
  """One MFU measurement on the first device (``size`` None: 350m off CPU, tiny on CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  size = size or ("tiny" if dev.platform == "cpu" else "350m")
  over = {**BASE, **SIZES[size]}
  if batch_size:
    over["data.batch_size"] = batch_size
  out = step.step({"config": "configs/shakespeare.py", "overrides": over,
                         "steps": steps, "repeats": repeats})
  dtype = over.get("model.compute_dtype", "float32")
  if peak_tflops:
    peak, source = peak_tflops * 1e12, "--peak_tflops"
  elif device_peak(dev.device_kind):
    peak, source = device_peak(dev.device_kind), f"datasheet ({dev.device_kind}, bf16 dense)"
  else:
    best = step.matmul_peak(dtype)
    peak, source = best["best"], f"measured {dtype} matmul, best shape {best['best_shape']}"
  tokens_s = out["tokens_per_step"] / out["step_s"]
  stats = getattr(dev, "memory_stats", lambda: None)() or {}
  return {"suite": "gpu", "size": size, "overrides": over, "device": dev.device_kind,
          "platform": dev.platform, "jax": jax.__version__, "params": out["params"],
          "flops_per_token": out["flops_per_token"], "tokens_per_step": out["tokens_per_step"],
          "step_s": out["step_s"], "step_s_all": out["step_s_all"], "tokens_per_s": tokens_s,
          "achieved_flops": out["flops_per_token"] * tokens_s, "peak_flops": peak,
          "peak_source": source, "mfu": out["flops_per_token"] * tokens_s / peak,
          "compile_s": out["compile_s"], "peak_device_bytes": stats.get("peak_bytes_in_use")}


def summary(row: dict, command: str) -> str:
  mem = row["peak_device_bytes"]
  return "\n".join([
      "# GPU suite: tokens/s and MFU of the inner step", "", f"Regenerate: `{command}`", "",
      f"git `{row['git_commit']}`, jax {row['jax']}, device `{row['device']}` "
      f"({row['platform']}).", "",
      "| model | params | tokens/step | ms/step | tokens/s | TFLOP/s achieved | peak TFLOP/s "
      "| MFU | peak device memory |", "|---|---|---|---|---|---|---|---|---|",
      f"| {row['size']} | {row['params']:,} | {row['tokens_per_step']:,} | "
      f"{row['step_s'] * 1e3:.1f} | {row['tokens_per_s']:,.0f} | "
      f"{row['achieved_flops'] / 1e12:.3f} | {row['peak_flops'] / 1e12:.3f} "
      f"({row['peak_source']}) | {row['mfu']:.1%} | "
      f"{'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'} |", "",
      f"FLOPs per token: {row['flops_per_token']:,} (`model.train_flops_per_token`: "
      "6N + 12·L·T·H·Dh).", ""])
