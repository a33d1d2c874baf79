"""Transient or not (the flows retry only transient errors), and how the CLI reports failures."""

from __future__ import annotations

import argparse
import errno
import io
import sys

import pytest

from recsys_metric.cli_errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USER_ERROR, run_command
from recsys_metric.errors import ConfigError, DataError, RejectLimitExceeded, is_transient


class _FakeDriverError(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (DataError("log.parquet: not a readable Parquet file", transient=True), True),
        (DataError("log.csv: required column user_id is missing"), False),
        (ConfigError("invalid config c.yaml: train.epochz: unknown key"), False),
        (RejectLimitExceeded("5 of 120 rows rejected", n_rejected=5, n_total=120, rejects_path=None), False),
        (OSError("NFS hiccup"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (OSError(errno.ESTALE, "Stale file handle"), True),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "log.parquet"), False),
        (PermissionError(errno.EACCES, "Permission denied", "log.parquet"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (ValueError("a bug"), False),
        (KeyError("u1"), False),
    ],
)
def test_what_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_database_connection_errors_are_transient_by_driver_and_name():
    for module in ("psycopg", "psycopg2.errors", "sqlalchemy.exc", "pg8000.exceptions"):
        name = "InterfaceError" if module.startswith("pg8000") else "OperationalError"
        cls = type(name, (Exception,), {"__module__": module})
        assert is_transient(cls("server closed the connection unexpectedly")), module
    integrity = type("IntegrityError", (Exception,), {"__module__": "psycopg"})
    assert not is_transient(integrity("duplicate key"))
    wrapped = _FakeDriverError("query failed")
    wrapped.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert is_transient(wrapped)


def _run(func, capsys, verbose=False) -> tuple[int, str]:
    code = run_command(argparse.Namespace(func=func, command="run", verbose=verbose))
    return code, capsys.readouterr().err


def _raise(exc):
    def func(args):
        raise exc

    return func


def test_an_os_error_is_one_line_naming_the_path_first(capsys):
    code, err = _run(_raise(OSError(errno.EIO, "Input/output error", "/mnt/nfs/log.parquet")), capsys)
    assert code == EXIT_USER_ERROR
    assert err == "recsys-metric run: error: /mnt/nfs/log.parquet: input/output error (errno 5)\n"
    code, err = _run(_raise(OSError("disk full while writing the index")), capsys)
    assert err == "recsys-metric run: error: disk full while writing the index\n"


def test_a_multi_line_message_is_printed_on_one_line(capsys):
    code, err = _run(_raise(DataError("first line\n  second line")), capsys)
    assert code == EXIT_USER_ERROR and err == "recsys-metric run: error: first line second line\n"


def test_verbose_adds_the_traceback(capsys, caplog):
    caplog.set_level("INFO", logger="recsys_metric.cli")
    code, err = _run(_raise(DataError("bad")), capsys, verbose=True)
    assert code == EXIT_USER_ERROR and err.endswith("recsys-metric run: error: bad\n")
    assert any(r.exc_info for r in caplog.records)


def test_interrupt_and_closed_pipe(capsys, monkeypatch):
    code, err = _run(_raise(KeyboardInterrupt()), capsys)
    assert code == EXIT_INTERRUPTED and err == "recsys-metric run: interrupted\n"

    class ClosedPipe(io.StringIO):
        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def fileno(self):
            raise ValueError("no descriptor")  # nothing to point at /dev/null: still no traceback

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code, err = _run(lambda args: print("row"), capsys)
    assert code == EXIT_BROKEN_PIPE and err == ""


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command(argparse.Namespace(func=lambda args: 1 / 0, command="run", verbose=False))
