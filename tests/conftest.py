"""Test setup: this process sees 4 virtual CPU devices, used only to *compile* multi-device
programs (HLO checks, sharding rules). Anything that *executes* across devices runs as separate
processes through the launcher (in-process CPU collectives can deadlock on small machines)."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from fedjax_lm import cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

# fedjax_lm's CPU runtime defaults, as a command's __main__ applies them: the XLA flags for this
# process (before JAX starts its backend) and its subprocesses; the allocator defaults for the
# subprocesses (CLI runs, notebook kernels), as the commands' own re-exec would give them.
cpu.apply_defaults(reexec=False)

# One JAX persistent compilation cache for this session, this process and its subprocesses:
# the tests compile the same tiny-model programs over and over (a resume test runs the same
# command three times). Keyed by the HLO and compile options, so it changes no numerics.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="fedjax_lm_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """``configs/tiny.py`` (a model small enough to train in seconds), unlocked, with
  ``overrides`` given as dotted keys."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.unlock()
  config_lib.override(c, overrides)
  return c


def run_cli(args, env=None, timeout=600):
  """Runs ``python -m experiments.train ARGS`` from the repo root; returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = ""  # the launcher gives each process one device
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data dir per test session (the Shakespeare build happens once)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  from fedjax_lm import data  # pylint: disable=g-import-not-at-top
  data.prepare_shakespeare(path)
  return path


@pytest.fixture
def one_device():
  return jax.devices()[:1]


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: end-to-end through the CLI (CI runs them; -m 'not slow' skips locally)")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Longest first: ``slow`` tests, then those that train on the data, then the rest (each in
  collection order). Under ``pytest -n 2`` the workers take tests in this order as they free
  up, so the minute-long end-to-end runs overlap each other and the quick tests fill the
  end, instead of one worker running a late minute-long test while the other idles."""
  def cost(item):
    if item.get_closest_marker("slow"):
      return 0
    return 1 if "data_dir" in getattr(item, "fixturenames", ()) else 2
  items.sort(key=cost)  # stable: the same order on every xdist worker
