"""The bad-input corpus (tests/bad_inputs): every case is refused with one line and exit 2, or
quarantined with a reason; none prints a traceback.

Cases run in this process through ``cli.main`` (a fresh parser each time, stderr captured);
those marked ``subprocess`` run again through a real ``python -m recsys_metric.cli``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from bad_inputs.cases import CASES, ONE_EPOCH, Case, csv_text, good_rows, write

from recsys_metric import cli

ROOT = Path(__file__).resolve().parent.parent
README = Path(__file__).resolve().parent / "bad_inputs" / "README.md"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A small published store (one epoch on 20 users x 15 items) for the query cases."""
    d = tmp_path_factory.mktemp("bad-inputs-store")
    log = write(d / "log.csv", csv_text(good_rows()))
    config = write(d / "c.yaml", ONE_EPOCH)
    argv = ["run", "--interactions", str(log), "--artifacts", str(d / "art"), "--config", str(config)]
    assert cli.main([*argv, "--no-progress", "--force"]) == 0  # published whatever the gate says
    return d / "art"


def _argv(case: Case, d: Path, store: Path | None) -> list[str]:
    return [a.replace("{dir}", str(d)).replace("{store}", str(store)) for a in case.argv]


def _check_refused(case: Case, code: int, err: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"{len(lines)} lines: {err}"
    command = case.argv[0]
    assert lines[0].startswith(f"recsys-metric {command}: error: "), lines[0]
    for text in case.expect:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def _check_quarantined(case: Case, code: int, err: str, d: Path) -> None:
    assert code == 0 and "Traceback" not in err, err
    rejects = pl.read_parquet(d / "out" / "rejects.parquet")
    got = {
        reason: sorted(rejects.filter(pl.col("reason") == reason)["row_number"].to_list())
        for reason in rejects["reason"].unique()
    }
    assert got == case.quarantine


def _store_for(case: Case, request) -> Path | None:
    return request.getfixturevalue("store") if case.needs_store else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_or_quarantine(case, tmp_path, capsys, request):
    store = _store_for(case, request)
    case.make(tmp_path)
    code = cli.main(_argv(case, tmp_path, store))
    err = capsys.readouterr().err
    if case.quarantine:
        _check_quarantined(case, code, err, tmp_path)
    else:
        _check_refused(case, code, err)


SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_bad_input_through_the_real_command(case, tmp_path, request):
    store = _store_for(case, request)
    case.make(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_metric.cli", *_argv(case, tmp_path, store)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    _check_refused(case, proc.returncode, proc.stderr)


def test_a_closed_pipe_ends_the_output_quietly(store):
    """``recsys-metric recommend U -k 500 | head -1``: no BrokenPipeError traceback."""
    user = pl.read_parquet(next(store.glob("runs/*/users.parquet")))[0, 0]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recsys_metric.cli",
            "recommend",
            str(user),
            "-k",
            "15",
            "--artifacts",
            str(store),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "POLARS_FMT_MAX_ROWS": "-1"},
    )
    proc.stdout.close()  # the reader went away before the first line
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert proc.returncode == 141


def test_the_corpus_is_large_and_documented():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    listed = README.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in listed]
    assert not missing, f"tests/bad_inputs/README.md does not list {missing}"
