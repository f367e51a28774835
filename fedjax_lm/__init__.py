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

# glibc malloc default, measured by ``python -m experiments.bench --suite step``: XLA:CPU
# allocates a step's temporaries afresh at every execution (585 MB for the default M=2 step),
# glibc serves allocations that large with mmap and unmaps them on free, so each step faulted
# ~150k 4 KiB pages in again; malloc's mmaps on transparent huge pages cut that ~40x.
# glibc reads GLIBC_TUNABLES once, at start: the command-line entry points re-exec themselves
# with it (``reexec_with_malloc_defaults``) and their child processes inherit it.
# FEDJAX_LM_MALLOC_DEFAULTS=0 turns this off; a value the user already set wins.
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1",)
# A process pinned to one core (the launcher's one process per core, the benches' 1-core
# workers) runs XLA:CPU on one worker thread. Its arena is not the main one, so glibc serves the
# step's temporaries (272 MB for one island of the default config) from fresh mmaps whatever the
# mmap threshold, and the kernel zeroes them again at every step: 136 2 MiB page faults a step,
# measured. One arena, no mmap and no trimming keep them in the heap from step to step (0 faults
# a step; the 1-core step 0.86-0.95x the time, Intel AMX, docs/performance.md). The process's memory
# is then not returned to the system until it exits. Not for processes with several compute
# threads: on the simulated path (2 threads) one arena made the step 1.1-1.6x slower.
# FEDJAX_LM_HEAP_DEFAULTS=0 turns this part off.
ONE_CORE_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                     "glibc.malloc.trim_threshold=17179869184")


# TCMalloc, where the system has it (Debian/Ubuntu: ``apt install libtcmalloc-minimal4``): every
# command and launched process starts with it preloaded. XLA:CPU takes an execution's
# temporaries as one block (286 MB for one island of the default config) on the thread that
# runs it; with more than one such thread (the simulated path) glibc can only serve it from a
# fresh mmap, zeroed by the kernel at every step (8.6-10.6% of the simulated step's CPU time in
# perf), or from one shared arena, whose lock made the step 1.1-1.6x slower. TCMalloc keeps the
# block from step to step on any thread: the simulated step 0.43 -> 0.39 s (Intel AMX,
# docs/performance.md). FEDJAX_LM_TCMALLOC=0 turns this part off; an LD_PRELOAD that already
# names an allocator wins.
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def tcmalloc_library() -> str | None:
  """The system's TCMalloc shared library (a name ``LD_PRELOAD`` resolves), or None."""
  import ctypes.util  # pylint: disable=g-import-not-at-top
  return next(filter(None, map(ctypes.util.find_library, TCMALLOC_LIBRARIES)), None)


def without_tcmalloc(env: dict[str, str]) -> dict[str, str]:
  """``env`` with any TCMalloc taken out of ``LD_PRELOAD`` (for a run that starts without it)."""
  out = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
  preload = [p for p in env.get("LD_PRELOAD", "").split() if "tcmalloc" not in p]
  if preload:
    out["LD_PRELOAD"] = " ".join(preload)
  return out


def malloc_env(env: dict[str, str], one_core: bool = False,
               tcmalloc: str | None = "find") -> dict[str, str]:
  """``env`` with fedjax_lm's allocator defaults added (unchanged off glibc or when turned off):
  its glibc tunables, and TCMalloc preloaded where the system has it (``tcmalloc``: the library,
  found by :func:`tcmalloc_library` by default); ``one_core``: for a process that will run
  pinned to one core (``ONE_CORE_TUNABLES`` too)."""
  import platform  # pylint: disable=g-import-not-at-top
  if env.get("FEDJAX_LM_MALLOC_DEFAULTS", "1") == "0" or platform.libc_ver()[0] != "glibc":
    return env
  ours = GLIBC_TUNABLES
  if one_core and env.get("FEDJAX_LM_HEAP_DEFAULTS", "1") != "0":
    ours += ONE_CORE_TUNABLES
  have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=")[0] for t in have}
  env = {**env, "GLIBC_TUNABLES": ":".join(
      have + [t for t in ours if t.split("=")[0] not in names])}
  preload = env.get("LD_PRELOAD", "")
  if env.get("FEDJAX_LM_TCMALLOC", "1") != "0" and not any(a in preload for a in _ALLOCATORS):
    library = tcmalloc_library() if tcmalloc == "find" else tcmalloc
    if library:
      env["LD_PRELOAD"] = " ".join(filter(None, (library, preload)))
      # its report of every allocation over 1 GiB goes to stderr: a big config's normal steps
      env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  return env


def reexec_with_malloc_defaults() -> None:
  """For ``__main__`` of a command: restart this process with ``malloc_env`` if it differs
  (before any work: glibc reads its tunables, and the loader its preloads, only at start)."""
  import sys  # pylint: disable=g-import-not-at-top
  env = malloc_env(dict(_os.environ))
  if any(env.get(k) != _os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD")):
    _os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
