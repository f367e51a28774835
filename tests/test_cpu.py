"""The CPU runtime defaults (fedjax_lm.cpu): the compile options of the train step (the switches,
and that they reach XLA and the engine's train step), the per-core devices, and the process's
environment (XLA flags, allocator; none of it applied by an import)."""

import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from fedjax_lm import cpu
from fedjax_lm import engine
from fedjax_lm import mesh as mesh_lib
from fedjax_lm import model as model_lib


def test_options_and_their_switches():
  fast = {"xla_cpu_enable_fast_min_max": True}
  assert cpu.compiler_options("cpu", env={}) == fast
  assert cpu.compiler_options("gpu", env={}) is None
  assert cpu.compiler_options("cpu", env={cpu.ENV_OFF: "0"}) is None
  mine = {cpu.ENV_OPTIONS: '{"xla_cpu_prefer_vector_width": 512}'}
  assert cpu.compiler_options("cpu", env=mine) == {**fast, "xla_cpu_prefer_vector_width": 512}
  assert cpu.compiler_options("cpu", env={**mine, cpu.ENV_OFF: "0"}) == {
      "xla_cpu_prefer_vector_width": 512}
  with pytest.raises(ValueError, match=f"^{cpu.ENV_OPTIONS}='512' is not a JSON object$"):
    cpu.compiler_options("cpu", env={cpu.ENV_OPTIONS: "512"})
  with pytest.raises(ValueError, match=f"^{cpu.ENV_OPTIONS}='{{bad' is not JSON"):
    cpu.compiler_options("cpu", env={cpu.ENV_OPTIONS: "{bad"})


def test_fast_min_max_reaches_xla_and_a_nan_logit_still_makes_the_loss_nan():
  """With the options XLA's max drops a NaN (the documented cost, and the proof that the option
  is honoured: a JAX upgrade that ignored it would lose the speed silently); a softmax loss over
  a NaN logit is NaN all the same, so the non-finite guard still sees it."""
  options = cpu.compiler_options("cpu")
  x = jnp.array([jnp.nan, 1.0, 2.0])
  assert float(jax.jit(jnp.max)(x)) != float(jax.jit(jnp.max)(x))  # NaN without the options
  assert float(jax.jit(jnp.max, compiler_options=options)(x)) == 2.0
  loss = jax.jit(lambda l: -jax.nn.log_softmax(l)[2], compiler_options=options)(x)
  assert np.isnan(float(loss))


def test_the_engine_s_train_step_is_compiled_with_them(monkeypatch):
  """An option XLA does not know, set through the override, fails the inner step's compile
  naming it: the options reach that program (DDP's too)."""
  monkeypatch.setenv(cpu.ENV_OPTIONS, '{"xla_no_such_option": 1}')
  for algorithm in ("islands", "ddp"):
    config = tiny_config(**{"algorithm": algorithm})
    mesh = mesh_lib.make_mesh(dict(config.mesh), jax.devices()[:1])
    alg = engine.build(config, mesh, model_lib.ModelConfig.from_config(config.model))
    state = alg.init(jax.random.key(0))
    m, b, t = int(config.islands.num), int(config.data.batch_size), int(config.data.seq_len)
    rows = np.zeros((m, b, t), np.int32)
    batch = {"inputs": rows, "targets": rows, "mask": np.ones((m, b, t), np.float32)}
    with pytest.raises(Exception, match="No such compile option: 'xla_no_such_option'"):
      alg.inner_step(state, batch)


def test_a_step_traced_inside_another_jit_runs_without_them():
  """JAX takes compile options only at the top level: the same step called inside a user's
  jit is traced without them (and gives the top-level call's numbers); at the top level it
  keeps them (max drops the NaN)."""
  step = cpu.TopLevelJit(jnp.max, {"xla_cpu_enable_fast_min_max": True})
  x = jnp.array([jnp.nan, 1.0, 2.0])
  assert float(step(x)) == 2.0
  assert np.isnan(float(jax.jit(lambda y: step(y))(x)))
  y = jnp.array([3.0, 1.0, 2.0])
  assert float(jax.jit(lambda v: step(v) * 2)(y)) == 2 * float(step(y)) == 6.0
  assert "reduce" in step.lower(y).as_text()


def test_island_devices_one_per_core_dividing_m_only_on_the_simulated_cpu_path():
  """A one-process run's simulated islands go one emulated CPU device per core (the largest
  divisor of M not above the cores); anything else is left as configured."""
  cpu_env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  def devices(cores=2, env=None, **overrides):
    c = tiny_config(**{"algorithm": "islands", "islands.num": 2, "mesh.island": 1,
                       "mesh.data": 1, **overrides})
    return cpu.island_devices(c, {**cpu_env, **(env or {})}, cores)
  assert devices() == 2
  assert devices(cores=16) == 2 and devices(cores=1) == 1
  assert devices(cores=3, **{"islands.num": 4}) == 2  # the largest divisor of 4 <= 3
  assert devices(cores=2, **{"islands.num": 3}) == 1
  assert devices(cores=8, **{"islands.num": 8}) == 8
  assert devices(**{"islands.num": 1}) == 1
  assert devices(**{"islands.simulated_groups": 1}) == 1  # asked for one vmap
  assert devices(**{"islands.simulated_groups": 2}) == 1  # asked for vmapped groups
  assert devices(**{"mesh.data": -1}) == 2  # -1: the devices left over, here 1
  assert devices(**{"mesh.data": 2}) == 1 and devices(**{"mesh.island": 2}) == 1
  assert devices(**{"algorithm": "ddp"}) == 1
  assert devices(env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) == 1
  assert devices(env={"JAX_PLATFORMS": "cuda"}) == 1
  env = dict(cpu_env)
  c = tiny_config(**{"islands.num": 4, "mesh.island": 1, "mesh.data": 1})
  with c.unlocked():
    c.algorithm = "islands"
  if cpu.island_devices(c, env) > 1:  # this machine's cores
    n = cpu.emulate_island_devices(c, env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={n}"
    assert int(c.mesh.island) == n


@pytest.mark.slow
def test_one_process_run_emulates_a_device_per_core_with_the_same_numerics(tmp_path, data_dir):
  """``experiments.train`` in one process puts M=2 simulated islands on one emulated CPU device
  per core: the same bytes, and the same losses and evals to f32 rounding (each device compiles
  its own program), as the per-core vmapped groups on one device (``simulated_groups=2``)."""
  from conftest import run_cli  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  out = {}
  for name, extra in (("devices", []), ("groups", ["--config.islands.simulated_groups=2"])):
    done = run_cli(["--config", "configs/tiny.py", "--workdir", str(tmp_path / name),
                    f"--config.data.data_dir={data_dir}", "--config.algorithm=islands",
                    "--config.launch.processes=1", "--config.mesh.island=1",
                    "--config.mesh.data=1", "--config.islands.num=2",
                    "--config.outer.sync_every=3", "--config.total_steps=6",
                    "--config.eval_every=6", *extra])
    assert done.returncode == 0, done.stderr[-2000:]
    devices = 2 if name == "devices" and cores >= 2 else 1
    assert f"'island': {devices}," in done.stdout + done.stderr
    assert f"on {devices} devices / 1 processes" in done.stdout + done.stderr
    with open(tmp_path / name / "metrics.jsonl", encoding="utf-8") as f:
      out[name] = [json.loads(line) for line in f]
  a, b = out["devices"], out["groups"]
  assert [(r["step"], r["island_bytes"], r["island_peak_bytes"]) for r in a] == [
      (r["step"], r["island_bytes"], r["island_peak_bytes"]) for r in b]
  np.testing.assert_allclose([r["island_loss"] for r in a], [r["island_loss"] for r in b],
                             rtol=1e-5)
  evals = lambda rs: [r["eval_loss"] for r in rs if "eval_loss" in r]
  assert len(evals(a)) == 1
  np.testing.assert_allclose(evals(a), evals(b), rtol=1e-5)

# ------------------------------------------------------- the runtime defaults of the process

_ENV_KEYS = ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")
_YNN = cpu.CPU_XLA_FLAGS[0]


def _bare_env():
  """This environment without any runtime default in it (so that applying one shows)."""
  return {k: v for k, v in os.environ.items() if k not in _ENV_KEYS and
          not k.startswith("FEDJAX_LM_")} | {"PYTHONPATH": ROOT}


def test_import_fedjax_lm_leaves_the_environment_alone():
  """Importing the package and its modules changes no variable of the process's environment;
  ``cpu.apply_defaults(reexec=False)`` is what adds the XLA flags and allocator defaults."""
  code = ("import json, os; before = dict(os.environ); import fedjax_lm; "
          "from fedjax_lm import cpu, launch, engine, train, config_lib; "
          "after = dict(os.environ); cpu.apply_defaults(reexec=False); "
          "print(json.dumps([before == after, os.environ.get('XLA_FLAGS', ''), "
          "os.environ.get('GLIBC_TUNABLES', '')]))")
  out = subprocess.run([sys.executable, "-c", code], env=_bare_env(), cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.splitlines()[-1]
  unchanged, flags, tunables = json.loads(out)
  assert unchanged
  assert flags == _YNN
  assert tunables == ("glibc.malloc.hugetlb=1" if platform.libc_ver()[0] == "glibc" else "")


def test_xla_env_adds_the_flags_unless_set_or_off():
  assert cpu.xla_env({})["XLA_FLAGS"] == _YNN
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot --xla_foo=1"}
  assert cpu.xla_env(mine) == mine  # the user's own value wins
  assert cpu.xla_env({"XLA_FLAGS": "--xla_foo=1"})["XLA_FLAGS"] == f"--xla_foo=1 {_YNN}"
  off = {"FEDJAX_LM_XLA_DEFAULTS": "0"}
  assert cpu.xla_env(off) == off
  env = {"A": "1"}
  assert cpu.process_env(env, one_core=True)["XLA_FLAGS"] == _YNN and env == {"A": "1"}
  assert cpu.process_env({}, one_core=True).get("GLIBC_TUNABLES", "") == (
      cpu.malloc_env({}, one_core=True).get("GLIBC_TUNABLES", ""))


def test_malloc_env_adds_huge_pages_and_keeps_what_the_user_set():
  assert cpu.malloc_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  user = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
  assert cpu.malloc_env(user, tcmalloc=None) == user  # the user's own hugetlb wins
  assert cpu.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[
      "GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  off = {"FEDJAX_LM_MALLOC_DEFAULTS": "0"}
  assert cpu.malloc_env(off) == off
  assert cpu.malloc_env(off, one_core=True) == off
  # a server (the syncer): two arenas, unless the user set their own or turned it off
  assert cpu.malloc_env({}, tcmalloc=None, server=True)["GLIBC_TUNABLES"] == (
      "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2")
  assert cpu.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, tcmalloc=None,
                        server=True)["GLIBC_TUNABLES"] == (
                            "glibc.malloc.arena_max=8:glibc.malloc.hugetlb=1")
  assert cpu.malloc_env({"FEDJAX_LM_HEAP_DEFAULTS": "0"}, tcmalloc=None, server=True)[
      "GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_malloc_env_preloads_tcmalloc_where_found_unless_off_or_another_allocator():
  lib = "libtcmalloc_minimal.so.4"
  env = cpu.malloc_env({}, tcmalloc=lib)
  assert env["LD_PRELOAD"] == lib and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 30
  assert cpu.malloc_env(env, tcmalloc=lib) == env  # once
  assert cpu.malloc_env({"LD_PRELOAD": "libfoo.so"}, tcmalloc=lib)["LD_PRELOAD"] == (
      f"{lib} libfoo.so")
  for user in ({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, {"FEDJAX_LM_TCMALLOC": "0"},
               {"FEDJAX_LM_MALLOC_DEFAULTS": "0"}):
    assert cpu.malloc_env(user, tcmalloc=lib).get("LD_PRELOAD") == user.get("LD_PRELOAD")
  assert "LD_PRELOAD" not in cpu.malloc_env({}, tcmalloc=None)  # none on the system
  assert cpu.without_tcmalloc({"LD_PRELOAD": f"{lib} libfoo.so", "A": "1"}) == {
      "LD_PRELOAD": "libfoo.so", "A": "1"}
  assert cpu.without_tcmalloc(env) == {k: v for k, v in env.items() if k != "LD_PRELOAD"}
  found = cpu.tcmalloc_library()
  assert found is None or "tcmalloc" in found


@pytest.mark.skipif(cpu.tcmalloc_library() is None, reason="TCMalloc not installed")
def test_a_command_runs_with_tcmalloc_preloaded():
  """Where the system has TCMalloc, a command restarts itself with it preloaded: it is in the
  process's memory map, and a JAX computation runs on it."""
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FEDJAX_LM_TCMALLOC")}
  code = ("from fedjax_lm import cpu; cpu.apply_defaults(); import jax.numpy as jnp; "
          "print(float(jnp.ones((512, 512)).sum()), any('tcmalloc' in line for line in "
          "open('/proc/self/maps')))")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                       text=True).stdout.split()
  assert out[-2:] == ["262144.0", "True"]


def test_malloc_env_one_core_adds_the_heap_tunables_unless_set_or_off():
  one = cpu.malloc_env({}, one_core=True)["GLIBC_TUNABLES"].split(":")
  assert one == ["glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                 "glibc.malloc.trim_threshold=17179869184"]
  user = cpu.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, one_core=True)
  assert user["GLIBC_TUNABLES"].split(":")[:2] == ["glibc.malloc.arena_max=4",
                                                   "glibc.malloc.hugetlb=1"]
  assert "arena_max=1" not in user["GLIBC_TUNABLES"]  # the user's arena count wins
  off = cpu.malloc_env({"FEDJAX_LM_HEAP_DEFAULTS": "0"}, one_core=True)
  assert off["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("preset, expected", [
    (None, "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),
])
def test_command_reexecs_itself_once_with_the_tunables(preset, expected):
  """glibc reads its tunables at start: a command restarts itself once to get them, with
  the same arguments; a value already set is left alone (no restart)."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if preset:
    env["GLIBC_TUNABLES"] = preset
  code = ("import os, sys; from fedjax_lm import cpu; print('start', flush=True); "
          "cpu.apply_defaults(); "
          "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.split("\n")
  assert out[-2] == f"{expected} ['a', '--b=1']"
  assert out.count("start") == (1 if preset else 2)
