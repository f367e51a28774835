"""fedjax_lm's CPU runtime defaults, the one place they are applied and documented; and the CPU
this process runs on.

Nothing here runs at import: ``import fedjax_lm`` leaves ``os.environ`` alone. A command's
``__main__`` (``experiments/train.py``, ``experiments/compare.py``, ...) calls
:func:`apply_defaults` first; a notebook's first cell and ``tests/conftest.py`` call
``apply_defaults(reexec=False)``; the launchers give their child processes :func:`process_env`.
Each default was measured by ``python -m experiments.bench --suite step``; what each is worth, per
CPU: docs/performance.md ("Runtime defaults and what each is worth"). A value the user already
set wins over every default, and each has a switch that turns it off:

- **XLA flags** (``CPU_XLA_FLAGS``, added to ``XLA_FLAGS``; ``FEDJAX_LM_XLA_DEFAULTS=0``): XLA's
  own (Eigen) dot emitter instead of YNNPACK fusions, which made the default model's train step
  slower on x86. XLA reads ``XLA_FLAGS`` once, when its backend starts: apply them before that.
- **Huge pages** (``GLIBC_TUNABLES``; ``FEDJAX_LM_MALLOC_DEFAULTS=0``, which turns off every
  allocator default): XLA:CPU allocates a step's temporaries afresh at every execution (585 MB for
  the default M=2 step); glibc serves allocations that large with mmap and unmaps them on free, so
  each step faulted ~150k 4 KiB pages in again; malloc's mmaps on transparent huge pages cut that
  ~40x.
- **One heap arena for a process pinned to one core** (``ONE_CORE_TUNABLES``, only where the
  launcher pins a process to one core; ``FEDJAX_LM_HEAP_DEFAULTS=0``). Such a process runs XLA:CPU
  on one worker thread whose arena is not the main one, so glibc serves the step's temporaries
  (272 MB for one island of the default config) from fresh mmaps whatever the mmap threshold, and
  the kernel zeroes them again at every step (136 2 MiB page faults a step). One arena, no mmap
  and no trimming keep them in the heap (0 faults a step; the 1-core step 0.86-0.95x the time,
  Intel AMX). The process's memory then returns to the system only when it exits. Not for
  processes with several compute threads: on the simulated path one arena made the step
  1.1-1.6x slower.
- **Two heap arenas for a server process** (``SERVER_TUNABLES``, the decoupled syncer's roles;
  ``FEDJAX_LM_HEAP_DEFAULTS=0``). gRPC's handler threads each get a glibc arena, and the freed
  chunk buffers of streamed payloads stay in them: a 67M-parameter syncer with 2 islands peaked
  at 4.03 GB with the default arenas, 3.04-3.24 GB with two (and 3.04 GB with TCMalloc,
  which ignores glibc's tunables), at no cost in round time (experiments/syncer_bench.py).
- **TCMalloc preloaded** where the system has it (Debian/Ubuntu: ``apt install
  libtcmalloc-minimal4``; ``FEDJAX_LM_TCMALLOC=0``; an ``LD_PRELOAD`` that already names an
  allocator wins). XLA:CPU takes an execution's temporaries as one block on the thread that runs
  it; with more than one such thread (the simulated path) glibc can only serve it from a fresh
  mmap, zeroed at every step, or from one shared arena whose lock is contended. TCMalloc keeps the
  block from step to step on any thread: the simulated step 0.43 -> 0.39 s (Intel AMX).
  glibc reads its tunables, and the loader its preloads, only when a process starts: a command
  re-executes itself once with them (:func:`apply_defaults`), and the processes it starts inherit
  them.
- **Compile options of the train and eval steps** (:func:`compiler_options`, given to
  ``jax.jit`` by :func:`jit_step`; ``FEDJAX_LM_COMPILE_DEFAULTS=0``;
  ``FEDJAX_LM_COMPILER_OPTIONS``, a JSON object of DebugOptions fields, is merged over them):
  ``xla_cpu_enable_fast_min_max``, max and min without NaN bookkeeping. XLA:CPU rewrites every max
  over the attention keys and the vocabulary into a reduce-window plus a reduce, and that
  reduce-window ran 3.3x slower with NaN-propagating max (1.87 vs 0.56 ms for a
  [16, 4, 128, 256] max on one core). The step's maxima only shift a softmax (a NaN logit still
  makes the loss NaN through exp, so the non-finite guard still sees it); the exchange programs
  (codecs, whose scales are maxima) are compiled without it. Measured on Intel AVX-512 (AMX); it
  removes work on any x86, so it is on for every CPU. Inside a user's own jit the step is traced
  without it (JAX takes compile options only at the top level); set through ``XLA_FLAGS``, the
  same field left the step's time unchanged (measured). Not used off CPU. Tried and left out:
  ``xla_cpu_prefer_vector_width=512`` on AVX-512 (0.92-0.97 of the step's time on the Intel AMX
  VMs, 1.02-1.06 on an earlier Intel VM, 0.98 on Zen 4, and it changes the last bits of a loss);
  set it through ``FEDJAX_LM_COMPILER_OPTIONS='{"xla_cpu_prefer_vector_width": 512}'``.
- **One emulated CPU device per core** for a one-process run's simulated islands
  (:func:`emulate_island_devices`, called by ``experiments/train.py`` before JAX starts).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

ENV_OFF = "FEDJAX_LM_COMPILE_DEFAULTS"
ENV_OPTIONS = "FEDJAX_LM_COMPILER_OPTIONS"

# --------------------------------------------------------------- the process's environment

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1",)
ONE_CORE_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                     "glibc.malloc.trim_threshold=17179869184")
SERVER_TUNABLES = ("glibc.malloc.arena_max=2",)
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def xla_env(env: Mapping[str, str]) -> dict[str, str]:
  """``env`` with ``CPU_XLA_FLAGS`` added to its ``XLA_FLAGS`` (a flag already named there
  wins; unchanged with ``FEDJAX_LM_XLA_DEFAULTS=0``)."""
  env = dict(env)
  if env.get("FEDJAX_LM_XLA_DEFAULTS", "1") == "0":
    return env
  flags = env.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in flags}
  flags += [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in names]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def tcmalloc_library() -> str | None:
  """The system's TCMalloc shared library (a name ``LD_PRELOAD`` resolves), or None."""
  import ctypes.util  # pylint: disable=g-import-not-at-top
  return next(filter(None, map(ctypes.util.find_library, TCMALLOC_LIBRARIES)), None)


def without_tcmalloc(env: Mapping[str, str]) -> dict[str, str]:
  """``env`` with any TCMalloc taken out of ``LD_PRELOAD`` (for a run that starts without it)."""
  out = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
  preload = [p for p in env.get("LD_PRELOAD", "").split() if "tcmalloc" not in p]
  if preload:
    out["LD_PRELOAD"] = " ".join(preload)
  return out


def malloc_env(env: Mapping[str, str], one_core: bool = False,
               tcmalloc: str | None = "find", server: bool = False) -> dict[str, str]:
  """``env`` with the allocator defaults added (unchanged off glibc or when turned off): its
  glibc tunables, and TCMalloc preloaded where the system has it (``tcmalloc``: the library,
  found by :func:`tcmalloc_library` by default); ``one_core``: for a process that will run
  pinned to one core (``ONE_CORE_TUNABLES`` too); ``server``: a gRPC server process
  (``SERVER_TUNABLES``)."""
  import platform  # pylint: disable=g-import-not-at-top
  env = dict(env)
  if env.get("FEDJAX_LM_MALLOC_DEFAULTS", "1") == "0" or platform.libc_ver()[0] != "glibc":
    return env
  ours = GLIBC_TUNABLES
  if one_core and env.get("FEDJAX_LM_HEAP_DEFAULTS", "1") != "0":
    ours += ONE_CORE_TUNABLES
  elif server and env.get("FEDJAX_LM_HEAP_DEFAULTS", "1") != "0":
    ours += SERVER_TUNABLES
  have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=")[0] for t in have}
  env["GLIBC_TUNABLES"] = ":".join(have + [t for t in ours if t.split("=")[0] not in names])
  preload = env.get("LD_PRELOAD", "")
  if env.get("FEDJAX_LM_TCMALLOC", "1") != "0" and not any(a in preload for a in _ALLOCATORS):
    library = tcmalloc_library() if tcmalloc == "find" else tcmalloc
    if library:
      env["LD_PRELOAD"] = " ".join(filter(None, (library, preload)))
      # its report of every allocation over 1 GiB goes to stderr: a big config's normal steps
      env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  return env


def process_env(env: Mapping[str, str], one_core: bool = False,
                server: bool = False) -> dict[str, str]:
  """``env`` for a process fedjax_lm starts: the XLA flags and the allocator defaults."""
  return xla_env(malloc_env(env, one_core=one_core, server=server))


def apply_xla_defaults() -> None:
  """Adds ``CPU_XLA_FLAGS`` to this process's ``XLA_FLAGS`` (:func:`xla_env`); before JAX starts
  a backend. The XLA part of :func:`apply_defaults`, for a worker process whose parent set up its
  allocator."""
  os.environ.update(xla_env(os.environ))


def apply_defaults(reexec: bool = True) -> None:
  """Applies the runtime defaults to this process; call it first, before JAX starts a backend.

  ``XLA_FLAGS`` gets ``CPU_XLA_FLAGS`` in ``os.environ``. The allocator defaults take effect
  only when a process starts: ``reexec`` (a command's ``__main__``) restarts this process once
  with them, with the same arguments, if they differ; ``reexec=False`` (a notebook kernel, the
  tests) puts them in ``os.environ`` for the processes it starts, and this one keeps its
  allocator."""
  import sys  # pylint: disable=g-import-not-at-top
  apply_xla_defaults()
  env = malloc_env(os.environ)
  if not reexec:
    os.environ.update(env)
  elif any(env.get(k) != os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD")):
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)



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
