"""The CPU this process runs on, and the XLA:CPU compile options of the train and eval steps.

Measured by ``python -m experiments.bench --suite step`` (and the A/B in docs/performance.md),
the jitted train and eval steps are compiled on CPU with this field of XLA's DebugOptions:

- ``xla_cpu_enable_fast_min_max``: max and min without NaN bookkeeping. XLA:CPU rewrites every
  max over the attention keys and the vocabulary into a reduce-window plus a reduce, and that
  reduce-window ran 3.3x slower with NaN-propagating max (1.87 vs 0.56 ms for a [16, 4, 128, 256]
  max on one core). The step's maxima only shift a softmax (a NaN logit still makes the loss NaN
  through exp, so the non-finite guard still sees it); the exchange programs (codecs, whose
  scales are maxima) are compiled without it. Measured on Intel AVX-512 (AMX) only; it removes
  work on any x86, so it is on for every CPU.

Tried and left out: ``xla_cpu_prefer_vector_width=512`` on AVX-512. It measured 0.92-0.97 of the
step's time on the Intel AMX VMs, 1.02-1.06 on an earlier Intel VM and 0.98 on Zen 4, and it
changes the last bits of a loss (the order of vectorised sums); set it through
``FEDJAX_LM_COMPILER_OPTIONS='{"xla_cpu_prefer_vector_width": 512}'``.

The option goes to ``jax.jit(..., compiler_options=...)`` (:func:`jit_step`; inside a user's own
jit the step is traced without it, since JAX takes compile options only at the top level); set
through ``XLA_FLAGS``, the same field left the step's time unchanged here (measured).
``FEDJAX_LM_COMPILE_DEFAULTS=0`` turns it off; ``FEDJAX_LM_COMPILER_OPTIONS`` (a JSON object of
DebugOptions fields) is merged over it, so a value the user sets wins. Not used off CPU.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

ENV_OFF = "FEDJAX_LM_COMPILE_DEFAULTS"
ENV_OPTIONS = "FEDJAX_LM_COMPILER_OPTIONS"


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


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _cpu_only(env: Mapping[str, str]) -> bool:
  """Whether JAX can only pick its CPU backend here (JAX_PLATFORMS, else no accelerator plugin
  installed); decided without starting a backend."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if env.get("JAX_PLATFORMS"):
    return env["JAX_PLATFORMS"].split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def island_devices(config, env: Mapping[str, str] | None = None,
                   cores: int | None = None) -> int:
  """How many CPU devices a one-process run of ``config`` emulates for its simulated islands
  (``islands.simulated_groups`` 0, the default: one per core): the largest divisor of M not
  above the usable cores, each device running its islands on its own thread. 1 leaves the run as
  configured: not the islands algorithm, not the simulated path (the mesh names more than one
  device; an axis of -1 takes what is left), M < 2 or one core, groups asked for explicitly,
  the device count already set in ``XLA_FLAGS``, or an accelerator backend possible. Measured
  against per-core vmapped groups on one device (docs/performance.md): 0.357-0.371 against
  0.385-0.399 s a step with TCMalloc, 0.409-0.415 against 0.420-0.438 without (default config,
  M=2, 2 cores, Intel AMX)."""
  env = os.environ if env is None else env
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  num = int(config.islands.num)
  if (config.algorithm != "islands" or int(config.islands.simulated_groups) != 0 or num < 2 or
      int(config.mesh.island) != 1 or
      any(int(v) not in (1, -1) for v in config.mesh.values()) or DEVICE_COUNT_FLAG in
      env.get("XLA_FLAGS", "") or not _cpu_only(env)):
    return 1
  devices = max(1, min(int(cores or 1), num))
  while num % devices:
    devices -= 1
  return devices


def emulate_island_devices(config, env: dict[str, str] | None = None) -> int:
  """Applies :func:`island_devices` before JAX starts its CPU backend: that many host devices
  in ``env``'s ``XLA_FLAGS`` (``os.environ`` by default) and the island axis over them in
  ``config.mesh``. Returns the count (1: nothing changed)."""
  env = os.environ if env is None else env
  devices = island_devices(config, env)
  if devices > 1:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={devices}".strip()
    with config.unlocked():
      config.mesh.island = devices
  return devices


def compiler_options(platform: str,
                     env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The compile options of the train and eval steps on ``platform`` (None: XLA's own)."""
  env = os.environ if env is None else env
  if platform != "cpu":
    return None
  options: dict[str, Any] = {}
  if env.get(ENV_OFF, "1") != "0":
    options["xla_cpu_enable_fast_min_max"] = True
  if env.get(ENV_OPTIONS):
    try:
      extra = json.loads(env[ENV_OPTIONS])
    except json.JSONDecodeError as e:
      raise ValueError(f"{ENV_OPTIONS}={env[ENV_OPTIONS]!r} is not JSON: {e}") from None
    if not isinstance(extra, dict):
      raise ValueError(f"{ENV_OPTIONS}={env[ENV_OPTIONS]!r} is not a JSON object")
    options.update(extra)
  return options or None


def step_compiler_options(mesh) -> dict[str, Any] | None:
  """:func:`compiler_options` for the devices of ``mesh``."""
  return compiler_options(mesh.devices.flat[0].platform)


class TopLevelJit:
  """A jitted step compiled with ``options`` when called at the top level; traced inside
  another jit (JAX takes compile options only at the top level, and the outer jit then owns the
  compile) the same function without them. ``lower`` lowers the top-level one."""

  def __init__(self, fn: Callable, options: dict[str, Any] | None, **jit_kwargs):
    import jax  # pylint: disable=g-import-not-at-top  (this module is imported without jax)
    self._tracer = jax.core.Tracer
    self.nested = jax.jit(fn, **jit_kwargs)
    self.top = jax.jit(fn, compiler_options=options, **jit_kwargs) if options else self.nested

  def __call__(self, *args, **kwargs):
    import jax  # pylint: disable=g-import-not-at-top
    traced = any(isinstance(x, self._tracer) for x in jax.tree.leaves((args, kwargs)))
    return (self.nested if traced else self.top)(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self.top.lower(*args, **kwargs)


def jit_step(fn: Callable, mesh, **jit_kwargs) -> TopLevelJit:
  """``jax.jit(fn, **jit_kwargs)`` with the step's compile options for ``mesh`` (see above)."""
  return TopLevelJit(fn, step_compiler_options(mesh), **jit_kwargs)
