"""notebooks/quickstart.ipynb executes top to bottom on the bundled data and shows what it claims.

The notebook is committed with its outputs (``make notebook`` saves them); these tests execute an
in-memory copy, never rewriting the file, and check that the saved outputs are the fresh ones.
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    """Every text a code cell printed or displayed (stdout, text/plain of results and displays)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("notebook_artifacts")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":  # what the checks below see must come from this execution
            cell.outputs, cell.execution_count = [], None
    n_cells = len(nb.cells)
    # Appended only to the in-memory copy: which interpreter the kernel really ran.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLBACKEND", "Agg")
        mp.setenv("RECSYS_NOTEBOOK_ARTIFACTS", str(artifacts))
        # Run from notebooks/, as Jupyter would: the notebook finds the repository root itself.
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        ).execute()
    return nb, n_cells, artifacts


def _normalized(text: str, artifacts: Path | None = None) -> str:
    """Text output with what differs between two executions replaced: run ids and the artifacts path."""
    if artifacts is not None:
        text = text.replace(str(artifacts), "artifacts/notebook")
    return re.sub(r"\b\d{8}T\d{6}Z-[0-9a-f]{4}\b", "<run-id>", text)


def test_the_saved_notebook_shows_every_output_in_order():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run `make notebook`"
    assert all(out["output_type"] != "error" for c in code for out in c.outputs)
    assert all(c.outputs for c in code), "every code cell of the quickstart shows something"
    plots = [c for c in code if "plot" in c.metadata.get("tags", [])]
    assert len(plots) == 3 and all(any("image/png" in o.get("data", {}) for o in c.outputs) for c in plots)
    tables = [o for c in code for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(tables) >= 4  # metrics, similar items, recommendations, explanation
    text = "".join(_text(c) for c in code)
    assert "artifacts:  artifacts/notebook" in text and "/tmp/" not in text and "/work/" not in text


@pytest.mark.slow
def test_the_kernel_is_this_interpreter(executed):
    nb, _, _ = executed
    assert _text(nb.cells[-1]).strip() == sys.prefix


@pytest.mark.slow
def test_no_cell_raised_and_the_run_went_to_the_given_artifacts(executed):
    nb, n_cells, artifacts = executed
    code = [c for c in nb.cells[:n_cells] if c.cell_type == "code"]
    assert all(out["output_type"] != "error" for c in code for out in c.outputs)
    assert all(c.execution_count is not None for c in code)
    assert (artifacts / "current" / "item_embeddings.parquet").is_file()
    assert f"artifacts:  {artifacts}" in _text(code[0])


@pytest.mark.slow
def test_the_metrics_table_lists_model_and_popularity(executed):
    nb, n_cells, _ = executed
    texts = [_text(c) for c in nb.cells[:n_cells] if c.cell_type == "code"]
    table = next(t for t in texts if "holdout users, full ranking" in t)
    assert "recall@10" in table and "recall@50" in table and "coverage@50" in table
    assert "\nmodel " in table and "\npopularity " in table


@pytest.mark.slow
def test_every_plot_cell_produced_an_image(executed):
    nb, n_cells, _ = executed
    plots = [c for c in nb.cells[:n_cells] if "plot" in c.metadata.get("tags", [])]
    assert len(plots) == 3
    for cell in plots:
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source[:80]


@pytest.mark.slow
def test_queries_answer_and_the_model_beats_popularity(executed):
    nb, n_cells, _ = executed
    text = "".join(_text(c) for c in nb.cells[:n_cells] if c.cell_type == "code")
    assert "items similar to i000453" in text
    assert "u0000007 gets i" in text and "because they liked:" in text
    final = _text(nb.cells[n_cells - 1])
    assert final.startswith("quickstart ok: model recall@20 ")
    words = final.split()
    model, popularity = (
        float(words[words.index("recall@20") + 1]),
        float(words[words.index("popularity") + 1]),
    )
    assert model > popularity > 0


@pytest.mark.slow
def test_the_saved_outputs_are_what_the_notebook_prints_today(executed):
    nb, n_cells, artifacts = executed
    fresh = [c for c in nb.cells[:n_cells] if c.cell_type == "code"]
    saved = [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert len(fresh) == len(saved)
    for new, old in zip(fresh, saved, strict=True):
        assert _normalized(_text(new), artifacts) == _normalized(_text(old)), (
            f"the saved output of this cell is stale; run `make notebook`:\n{new.source[:200]}"
        )
