"""XLA:CPU compile options of the train step (fedjax_lm.cpu): the switches, and that the
options reach XLA and the engine's train step."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
import fedjax_lm
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


_FAULTS = """
import resource
from experiments.bench import step
step.pin_one_core()
import fedjax_lm
s = step.Stepper({"config": "configs/shakespeare_diloco.py",
                  "overrides": step.PATHS["1 island / 1 core"][0]})
s.run(8)  # warm: the heap grows to the step's size
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  s.run(1)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])  # the median step (one step in a while re-faults as the heap settles)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables")
def test_one_core_heap_tunables_stop_the_per_step_page_faults():
  """The default config's 1-core step (one island, 272 MB of temporaries) in a fresh process:
  with the huge-pages default alone the kernel faults the temporaries in again at every step
  (136 huge pages a step, measured); with fedjax_lm's one-core heap tunables they stay in the
  heap (0 a step once warm)."""
  faults = {}
  for one_core in (False, True):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env = fedjax_lm.malloc_env({**env, "PYTHONPATH": ROOT}, one_core=one_core)  # 1 device
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    faults[one_core] = float(out.stdout.strip().splitlines()[-1])
  assert faults[False] >= 64, faults
  assert faults[True] <= 4, faults
