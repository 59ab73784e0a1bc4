"""`python -m experiments.report` collects what the steps produce, names the machine, and fails
loudly when a step fails (a stand-in benchmark and a tiny notebook keep this fast; the real
notebooks run in tests/test_notebooks.py)."""

import json

import nbformat

from experiments import report

WRITE_JSON = "import json, sys; json.dump({'tokens_per_s': 1234.5, 'ratio': 0.75}, open(sys.argv[-1], 'w'))"
NOTEBOOK_SRC = """import json, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = os.environ["M1JAX_RESULTS_DIR"]
plt.plot([1, 2, 3]); plt.savefig(os.path.join(out, "tiny_plot.png"))
json.dump({"accuracy": 0.625, "steps": [1, 2]}, open(os.path.join(out, "tiny.json"), "w"))"""


def _notebook(folder):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK_SRC)])
    nbformat.write(nb, str(folder / "tiny.ipynb"))


def test_report_collects_numbers_machine_and_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BENCHMARKS", {"fake": ["-c", WRITE_JSON]})
    (tmp_path / "nb").mkdir()
    _notebook(tmp_path / "nb")
    out = tmp_path / "out"
    assert report.main(["--out", str(out), "--notebooks", str(tmp_path / "nb")]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["benchmarks"]["fake"]["result"] == {"tokens_per_s": 1234.5, "ratio": 0.75}
    assert data["notebooks"]["tiny"]["result"] == {"accuracy": 0.625, "steps": [1, 2]}
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["jax"]
    md = (out / "REPORT.md").read_text()
    for text in ("| tokens_per_s | 1234 |", "| accuracy | 0.625 |", "| steps | [1, 2] |", "![tiny_plot.png]"):
        assert text in md, text
    assert "## Machine" in md and f"| cpu_count | {data['machine']['cpu_count']} |" in md


def test_a_failing_step_fails_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BENCHMARKS", {"broken": ["-c", "raise SystemExit('boom: no GPU here')"]})
    out = tmp_path / "out"
    assert report.main(["--out", str(out), "--notebooks", str(tmp_path)]) == 1
    md = (out / "REPORT.md").read_text()
    assert "### broken (FAILED" in md and "boom: no GPU here" in md
