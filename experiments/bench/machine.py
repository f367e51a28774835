"""The machine a table was measured on, as one line: CPU model, cores and the SIMD features that
decide XLA:CPU's kernels (AVX2 / AVX-512 and its bf16, fp16, VNNI extensions / AMX)."""

from __future__ import annotations

import os

# /proc/cpuinfo flag -> how the tables name it, in the order they are printed
SIMD = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"),
        ("avx512_fp16", "AVX-512 FP16"), ("avx512_vnni", "AVX-512 VNNI"),
        ("amx_tile", "AMX"))


def cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
  """The first processor's fields in ``path`` (``model name``, ``vendor_id``, ``cpu family``,
  ``flags``, ...); {} off Linux."""
  fields = {}
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        key, _, value = (part.strip() for part in line.partition(":"))
        if not key and fields:
          break  # the blank line that ends the first processor
        if key:
          fields.setdefault(key, value)
  except OSError:
    pass
  return fields


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
  """(model name, flags) of the first processor in ``path``; ("unknown CPU", {}) off Linux."""
  fields = cpu_fields(path)
  return fields.get("model name", "unknown CPU"), set(fields.get("flags", "").split())


def describe(path: str = "/proc/cpuinfo") -> str:
  """E.g. ``AMD EPYC, 2 cores, AVX2 FMA (no AVX-512)``."""
  model, flags = cpu_info(path)
  simd = [name for flag, name in SIMD if flag in flags]
  if flags and "avx512f" not in flags:
    simd.append("(no AVX-512)")
  return f"{model}, {len(os.sched_getaffinity(0))} cores" + (f", {' '.join(simd)}" if simd else "")
