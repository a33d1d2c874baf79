"""Fixtures shared by the test modules that run Prefect flows."""

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
