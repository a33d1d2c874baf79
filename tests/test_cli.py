import json
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_metric.cli import main

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "interactions.parquet"


def test_inspect_data_prints_every_stage(capsys):
    assert main(["inspect-data", str(BUNDLED)]) == 0
    out = capsys.readouterr().out
    for label in (
        "input rows",
        "rejected",
        "users             2,000",
        "items             1,000",
        "liked",
        "unliked",
        "neutral",
        "train rows",
        "test rows",
        "triplets",
    ):
        assert label in out, label


def test_inspect_data_json_and_out_dir(tmp_path, capsys):
    assert main(["inspect-data", str(BUNDLED), "--json", "--out", str(tmp_path / "p")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_interactions"] == 60000 - report["validation"]["n_duplicates"]
    assert (tmp_path / "p" / "triplets.parquet").exists()


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect-data", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recsys-metric inspect-data: error:") and "missing.parquet" in err
    assert "\n" not in err

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 1\n")
    assert main(["inspect-data", str(BUNDLED), "--config", str(cfg)]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err


def test_missing_column_names_the_file_and_column(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("customer,item_id\n1,2\n")
    assert main(["inspect-data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "log.csv" in err and "user_id" in err and "customer" in err


def test_generate_data_reproduces_the_bundled_file(tmp_path):
    assert main(["generate-data", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "interactions.parquet").read_bytes() == BUNDLED.read_bytes()


def test_console_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_metric.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for cmd in ("inspect-data", "prepare", "generate-data"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("argv", [[], ["no-such-command"]])
def test_bad_invocation_exits_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
