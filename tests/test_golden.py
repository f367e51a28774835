"""The engine's numerics against the golden file recorded before it was restructured
(``tests/golden.py``). ``FEDJAX_LM_WRITE_GOLDEN=1`` rewrites the file instead of comparing.

Each run must reproduce the recording of this machine's CPU class bit for bit (``golden.py``
says why a class may keep its own); on a CPU class with no recording, ``engine.json`` to rtol
1e-5."""

import glob
import json
import os

import numpy as np
import pytest

import golden

WRITE = os.environ.get("FEDJAX_LM_WRITE_GOLDEN") == "1"
# name -> None (bitwise), or the reason its programs changed and the tolerance is 1e-6
TOLERANT: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(golden.RUNS))
def test_golden_numerics(tmp_path, data_dir, name):
  got = golden.run(name, str(tmp_path / name), data_dir)
  path, exact = golden.golden_file()
  if WRITE:  # one file per run; merge them into the class's file
    cls = golden.cpu_class()
    path = (golden.GOLDEN if cls in golden.DEFAULT_CLASSES else
            os.path.join(golden.HERE, "golden", f"engine.{cls}.json")) + f".{name}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(got, f)
    return
  want = json.load(open(path))[name]
  for key in ("steps", "nonfinite", "island_bytes", "island_peak_bytes",
              "island_control_bytes"):
    assert got[key] == want[key], key
  rtol = 1e-6 if name in TOLERANT else 0.0 if exact else 1e-5
  for key in ("island_loss", "eval_loss"):
    np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(want[key], float),
                               rtol=rtol, atol=0, err_msg=f"{name}: {key}")


def test_golden_file_covers_every_run():
  for path in glob.glob(os.path.join(golden.HERE, "golden", "engine*.json")):
    assert WRITE or sorted(json.load(open(path))) == sorted(golden.RUNS), path


def test_cpu_class_of_the_machines_measured(tmp_path):
  """Which recording a machine is held to: AVX2 and Intel AVX-512 share engine.json."""
  def cls(vendor, family, flags):
    f = tmp_path / "cpuinfo"
    f.write_text(f"vendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: {flags}\n")
    return golden.cpu_class(str(f))
  assert cls("AuthenticAMD", 23, "fma avx2") == "x86-avx2"
  assert cls("GenuineIntel", 6, "avx2 avx512f amx_tile") == "intel-avx512"
  assert cls("AuthenticAMD", 25, "avx2 avx512f avx512_bf16") == "amd-avx512-family25"
  assert cls("AuthenticAMD", 25, "fma avx2") == "amd-avx2-family25"
  assert golden.golden_file("intel-avx512") == (golden.GOLDEN, True)
  assert golden.golden_file("some-new-cpu") == (golden.GOLDEN, False)
