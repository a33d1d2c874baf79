"""Fixtures shared by the test modules that run Prefect flows."""

import shutil
import tempfile
from pathlib import Path

import pytest
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect test API server for the whole session (~7 s to start), with its own PREFECT_HOME.

    The environment variables reach processes the flows start too (Dask workers).
    """
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("prefect-home")
    for name, value in {
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }.items():
        mp.setenv(name, value)
    try:
        # A fresh PREFECT_HOME: nothing persisted by an earlier session can be served from cache.
        with temporary_settings(updates={PREFECT_HOME: home, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            with prefect_test_harness(server_startup_timeout=90):
                yield
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 16 server for the session (pgserver, about a second to start), stopped at the end.

    Yields ``(server, uri)``: ``uri`` connects as the superuser ``postgres`` over the server's
    Unix socket (trust authentication); ``server.psql(sql)`` runs SQL. Skipped only where the
    server cannot start (pgserver not installed, or its binaries cannot run here).
    """
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need pgserver: pip install '.[db]'")
    pytest.importorskip("adbc_driver_postgresql", reason="PostgreSQL tests need adbc-driver-postgresql")
    # Not under pytest's tmp_path: running as root, pgserver runs the server as an unprivileged
    # user, who cannot enter pytest's 0700 directory. A short path also keeps the Unix socket's
    # path under 108 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
    try:
        try:
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        except Exception as err:  # noqa: BLE001 - any start failure means "no server here"
            pytest.skip(f"no PostgreSQL server could start here: {type(err).__name__}: {err}")
        try:
            yield server, server.get_uri()
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
