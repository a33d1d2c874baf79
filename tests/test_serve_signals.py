"""`recsys-metric serve` stops on SIGINT as on SIGTERM, also when started with SIGINT ignored.

A job a non-interactive shell script starts with ``&`` inherits SIGINT ignored (POSIX), which is
how ``kill -INT %1`` in docs/scheduling.md's script used to do nothing. Each test starts the
command in a subprocess with SIGINT ignored, as such a script would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The serve command with the API check passed and Prefect's serve replaced by what its runner does
# with signals: it takes SIGTERM over once started and then stops gracefully on it.
FAKE_SERVE = textwrap.dedent(
    """
    import signal, sys, time
    import flows.deployments as deployments
    from recsys_metric import cli

    def runner(*served):
        stop = []
        if sys.argv[1] == "runner":
            signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print("serving", len(served), "deployments", flush=True)
        while not stop:
            time.sleep(0.02)
        print("runner stopped gracefully", flush=True)

    deployments.serve_all = runner
    cli.prefect_api_problem = lambda timeout=3.0: None
    sys.exit(cli.main(["serve", "--artifacts", sys.argv[2]]))
    """
)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s: {proc.communicate()}")


@pytest.mark.parametrize(
    ("mode", "sig"), [("runner", signal.SIGINT), ("runner", signal.SIGTERM), ("early", signal.SIGINT)]
)
def test_serve_stops_on_sigint_and_sigterm_alike(tmp_path, mode, sig):
    proc = _start(["-c", FAKE_SERVE, mode, str(tmp_path)])
    _wait_for(proc, "serving 2 deployments", 60)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    if mode == "runner":
        assert "runner stopped gracefully" in out, "SIGINT went through the runner's own SIGTERM stop"
    assert err.strip().splitlines()[-1].startswith("recsys-metric serve: stopped")
    assert "Traceback" not in err


@pytest.mark.prefect
def test_the_real_runner_stops_on_sigint(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    proc = _start(
        ["-m", "recsys_metric.cli", "serve", "--artifacts", str(tmp_path), "--name-suffix", "sigint"],
        env={"PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    try:
        # Prefect prints its "Your deployments are being served" panel once the runner starts.
        deadline = time.monotonic() + 90
        out = ""
        while "being served" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "being served" in out, proc.communicate(timeout=5)
        time.sleep(2)  # the runner installs its SIGTERM handler as it starts
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "recsys-metric serve: stopped on SIGINT" in err and "Traceback" not in err
