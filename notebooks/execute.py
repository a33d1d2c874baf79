"""Re-execute ``notebooks/quickstart.ipynb`` top to bottom and save it with its outputs (``make notebook``).

The committed notebook shows its tables and plots without anyone running it;
``tests/test_notebook.py`` executes it again and checks that the saved text outputs are the ones
a fresh run prints, so a change that alters them fails until this is re-run.

The run goes to ``artifacts/notebook`` (the notebook's default, ignored by git), emptied first so
that the saved output is a first run's: no current model to gate against.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
ARTIFACTS = "artifacts/notebook"


def execute(path: Path = NOTEBOOK, artifacts: str = ARTIFACTS) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` from its own directory, as Jupyter would; return it run."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    os.environ["RECSYS_NOTEBOOK_ARTIFACTS"] = artifacts
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return nb


def main() -> int:
    shutil.rmtree(ROOT / ARTIFACTS, ignore_errors=True)
    nb = execute()
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out["output_type"] == "error"]
    if errors:
        print(
            f"{NOTEBOOK}: a cell raised {errors[0]['ename']}: {errors[0]['evalue']}; not saved",
            file=sys.stderr,
        )
        return 1
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(ROOT)} with its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
