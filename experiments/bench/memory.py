"""Memory readings of the bench suites (:mod:`experiments.bench.suites`): the outer state's
bytes per device (from the abstract state and its shardings, no allocation) and a run's own peak
host RSS."""

from __future__ import annotations


def outer_state_bytes(overrides: dict, devices) -> dict:
  """Bytes on one device of the global params + outer optimizer state (0 for ddp), and the
  param bytes, for ``overrides`` on ``devices``."""
  import math  # pylint: disable=g-import-not-at-top
  from experiments.bench import suites  # pylint: disable=g-import-not-at-top  (it imports this)
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from fedjax_lm import engine, mesh as mesh_lib, model as model_lib
  config = suites._config(overrides)  # pylint: disable=protected-access
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  alg = engine.build(config, mesh, model_cfg)
  abstract = jax.eval_shape(alg.init, jax.random.key(0))
  dev = mesh.devices.flat[0]
  total = 0
  server = getattr(abstract, "server", None)  # DDP has no global copy or outer state
  parts = [] if server is None else [(server.params, alg.state_shardings.server.params),
                                     (server.outer, alg.state_shardings.server.outer)]
  for tree, shardings in parts:
    def leaf(a, s):
      nonlocal total
      if hasattr(a, "shape") and s is not None:
        shape = s.shard_shape(a.shape) if dev in s.device_set else (0,)
        total += math.prod(shape) * a.dtype.itemsize
    jax.tree.map(leaf, tree, shardings)
  params = jax.eval_shape(alg.eval_params, abstract)
  return {"outer_state_bytes": total,
          "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
          "params": model_lib.count_params(params),
          "devices_per_island": int(mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["tensor"])}


def peak_rss_reset() -> None:
  """Resets this process's peak RSS (Linux ``clear_refs``), so the next reading is a run's own
  peak (which includes the runtime already loaded); elsewhere readings stay process-wide. Memory
  TCMalloc (preloaded by fedjax_lm's defaults) holds free goes back to the system first."""
  import ctypes  # pylint: disable=g-import-not-at-top
  release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
  if release is not None:
    release()
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def peak_rss_bytes() -> int:
  """Peak RSS since the last ``peak_rss_reset`` (Linux ``VmHWM``), else since process start."""
  import resource  # pylint: disable=g-import-not-at-top
  try:
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
