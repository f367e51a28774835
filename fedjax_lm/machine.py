"""The machine a number was measured on: its CPU as one line for a table (``describe``) and as
the class whose float bits a compiled program shares (``cpu_class``).

XLA:CPU picks its kernels by the SIMD features of the CPU it compiles for, so a timing names
them (AVX2 / AVX-512 and its bf16, fp16, VNNI extensions / AMX), and the last bits of a loss
differ between some CPU classes (``tests/golden.py`` keeps one recording per class). Reads
``/proc/cpuinfo`` only (no jax): the benchmarks' parent processes use it too.
"""

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


def cpu_class(path: str = "/proc/cpuinfo") -> str:
  """The CPU as far as a program's float bits go: e.g. ``x86-avx2``, ``intel-avx512``,
  ``amd-avx512-family25`` (Zen 4), or ``unknown``."""
  fields = cpu_fields(path)
  if not fields:
    return "unknown"
  vendor, family = fields.get("vendor_id", ""), fields.get("cpu family", "")
  flags = set(fields.get("flags", "").split())
  if "avx512f" not in flags:
    if "avx2" not in flags:
      return "unknown"
    # a Zen 3 EPYC (AMD family 25, AVX2 only) differs from an Intel AVX2 CPU in the 7th digit
    return "amd-avx2-family25" if vendor == "AuthenticAMD" and family == "25" else "x86-avx2"
  if vendor == "GenuineIntel":
    return "intel-avx512"
  return f"{'amd' if vendor == 'AuthenticAMD' else vendor.lower()}-avx512-family{family}"
