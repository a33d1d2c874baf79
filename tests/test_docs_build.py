"""The documentation site builds with ``mkdocs build --strict`` (what ``make docs`` runs).

A broken link between pages, a page missing from disk but named in the nav, an unresolved
``::: module.object`` API reference or a bad ``--8<--`` include fails the build, so it fails here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if not os.environ.get("CI"):
    # CI installs the docs extra (Makefile EXTRAS); elsewhere a checkout without it skips.
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")


@pytest.mark.slow
def test_the_site_builds_strict_with_every_page_and_the_generated_reference(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {p.relative_to(site).parent.as_posix() for p in site.rglob("index.html")}
    for md in (ROOT / "docs").glob("*.md"):
        assert (md.stem if md.stem != "index" else ".") in pages, md.name
    configuration = (site / "configuration" / "index.html").read_text()
    assert 'id="train-lr"' in configuration and 'id="data-columns-user_id"' in configuration
    assert "config-reference" not in configuration
    api = (site / "api" / "index.html").read_text()
    assert "recommend_for_history" in api and ":meth:" not in api
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    assert "Ingest: read + validate + split + triplets" in benchmarks


def _hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optional_pages_join_their_nav_section_only_when_they_exist(tmp_path):
    (tmp_path / "serving.md").write_text("# Serving\n")
    config = {
        "docs_dir": str(tmp_path),
        "nav": [{"Home": "index.md"}, {"User guide": [{"Python API": "python.md"}]}],
        "extra": {
            "optional_pages": {
                "User guide": [{"Serving over HTTP": "serving.md"}, {"Operations": "operations.md"}],
                "Elsewhere": [{"Databases": "databases.md"}],
            }
        },
    }
    nav = _hooks().on_config(config)["nav"]
    assert nav == [
        {"Home": "index.md"},
        {"User guide": [{"Python API": "python.md"}, {"Serving over HTTP": "serving.md"}]},
    ]
