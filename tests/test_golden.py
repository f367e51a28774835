"""The engine's numerics against the golden file recorded before it was restructured
(``tests/golden.py``). ``FEDJAX_LM_WRITE_GOLDEN=1`` rewrites the file instead of comparing.

``EXACT`` runs must reproduce the recorded values bit for bit (their compiled programs are
unchanged); the others to rtol 1e-6 (see each entry's reason)."""

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
  if WRITE:
    path = golden.GOLDEN + f".{name}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(got, f)
    return
  want = json.load(open(golden.GOLDEN))[name]
  for key in ("steps", "nonfinite", "island_bytes", "island_peak_bytes",
              "island_control_bytes"):
    assert got[key] == want[key], key
  rtol = 1e-6 if name in TOLERANT else 0.0
  for key in ("island_loss", "eval_loss"):
    np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(want[key], float),
                               rtol=rtol, atol=0, err_msg=f"{name}: {key}")


def test_golden_file_covers_every_run():
  assert WRITE or sorted(json.load(open(golden.GOLDEN))) == sorted(golden.RUNS)
