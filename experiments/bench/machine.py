"""The machine a table was measured on, as one line: CPU model, cores and the SIMD features that
decide XLA:CPU's kernels (AVX2 / AVX-512 and its bf16, fp16, VNNI extensions / AMX)."""

from __future__ import annotations

import os

from fedjax_lm.cpu import cpu_fields, cpu_info  # pylint: disable=unused-import  (re-exported)

# /proc/cpuinfo flag -> how the tables name it, in the order they are printed
SIMD = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"),
        ("avx512_fp16", "AVX-512 FP16"), ("avx512_vnni", "AVX-512 VNNI"),
        ("amx_tile", "AMX"))


def describe(path: str = "/proc/cpuinfo") -> str:
  """E.g. ``AMD EPYC, 2 cores, AVX2 FMA (no AVX-512)``."""
  model, flags = cpu_info(path)
  simd = [name for flag, name in SIMD if flag in flags]
  if flags and "avx512f" not in flags:
    simd.append("(no AVX-512)")
  return f"{model}, {len(os.sched_getaffinity(0))} cores" + (f", {' '.join(simd)}" if simd else "")
