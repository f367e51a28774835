"""fedjax_lm: communication-efficient training of language models with federated methods."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU defaults, measured by ``python -m experiments.bench --suite step``: routing dots and
# their fused elementwise ops to YNNPACK made the default model's train step slower on x86
# than XLA's own (Eigen) dot emitter. Applied before any backend starts (XLA reads XLA_FLAGS
# once); a flag the user already set wins; FEDJAX_LM_XLA_DEFAULTS=0 turns this off.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def _apply_xla_defaults() -> None:
  if _os.environ.get("FEDJAX_LM_XLA_DEFAULTS", "1") == "0":
    return
  flags = _os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in flags}
  flags += [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in names]
  _os.environ["XLA_FLAGS"] = " ".join(flags)


_apply_xla_defaults()
