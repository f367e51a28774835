"""The machine a table was measured on: ``fedjax_lm.machine`` (CPU model, cores and the SIMD
features that decide XLA:CPU's kernels), re-exported for the benchmarks."""

from fedjax_lm.machine import (  # pylint: disable=unused-import  (re-exported)
    SIMD, cpu_class, cpu_fields, cpu_info, describe)
