"""Execute every notebook in experiments/notebooks in small mode, as CI does.

Conventions every notebook follows (so this test can run it and `python -m experiments.report`
can collect it):
- small mode by default; `FULL=1` in the environment selects the larger runs. This test unsets FULL.
- the kernel's working directory is the notebook's own folder (as when it is opened in Jupyter);
  the library is imported as the installed package (`pip install -e .`), not through the path.
- results go to `Path(os.environ.get("M1JAX_RESULTS_DIR", "../results"))`, i.e. experiments/results
  by default: PNG figures and `<notebook name>.json` with the numbers the notebook states. This
  test points M1JAX_RESULTS_DIR at a temporary directory, so running the tests never touches the
  committed results.
- notebooks are committed without outputs (nbformat 4); `test_notebooks_are_committed_clean` checks it.

One test per notebook, so `pytest -n 2` spreads them over workers. Each must run in about a minute
on a 2-core CPU in small mode.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a small-mode notebook takes about a minute in all


def test_notebooks_present():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_clean(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4, f"{path.name}: nbformat {nb.nbformat}, expected 4"
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path, tmp_path, monkeypatch):
    monkeypatch.delenv("FULL", raising=False)
    monkeypatch.setenv("M1JAX_RESULTS_DIR", str(tmp_path))
    # The kernel inherits this environment. conftest.py gives the test process 8 host devices for
    # the sharding tests; a notebook should see the one CPU device a user's kernel would.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    if flags:
        monkeypatch.setenv("XLA_FLAGS", flags)
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s in small mode")

    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs {errors}"
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs, f"{path.name} saved no PNG under M1JAX_RESULTS_DIR"
    assert all(p.stat().st_size > 1000 for p in pngs), f"{path.name}: empty figure among {pngs}"
    report = tmp_path / f"{path.stem}.json"
    assert report.exists(), f"{path.name} did not write {report.name}; found {sorted(os.listdir(tmp_path))}"
    numbers = json.loads(report.read_text())
    assert isinstance(numbers, dict) and numbers, f"{report.name} is empty"
    shown = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "text/markdown" in out.get("data", {})
    ]
    assert shown, f"{path.name} displays no Markdown with its numbers"
