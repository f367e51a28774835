"""The colabs: each jupytext source (``colabs/*.py``) matches its paired ``.ipynb`` (outputs
stripped), and runs top to bottom with the smoke switch on."""

import glob
import os

import jupytext
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "colabs", "[0-9]*.py")))


def _cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_four_notebooks():
  names = [os.path.basename(p)[:-3] for p in SOURCES]
  assert names == ["01_diloco_in_five_minutes", "02_outer_optimizers",
                   "03_streaming_and_compression", "04_non_iid_islands"]


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_paired_notebook_is_in_sync_and_stripped(source):
  ipynb = source[:-3] + ".ipynb"
  assert os.path.exists(ipynb), f"{ipynb} missing: run jupytext --sync {source}"
  paired = nbformat.read(ipynb, as_version=4)
  assert _cells(paired) == _cells(jupytext.read(source)), (
      f"{ipynb} is stale: run jupytext --sync {source}")
  for cell in paired.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{ipynb}: outputs not stripped"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(source, tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LM_SMOKE", "1")
  monkeypatch.setenv("FEDJAX_LM_FIGURES", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
  nb = jupytext.read(source)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  name = os.path.basename(source)[:-3]
  assert os.path.getsize(tmp_path / f"{name}.png") > 10_000  # the figure was drawn and saved
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
