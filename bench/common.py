"""Shared helpers for benchmarks: machine description, result files, peak memory.

Every benchmark writes ``bench/results/<name>.json`` (figures, command, date, machine) and
``bench/report.py`` assembles BENCHMARKS.md from those files, so one benchmark can be re-run alone
without losing the others' tables.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "bench" / "out"
# RECSYS_BENCH_DATASETS points elsewhere, e.g. from a git worktree whose parent has no shared/.
SHARED_DATASETS = Path(os.environ.get("RECSYS_BENCH_DATASETS") or ROOT.parent / "shared" / "datasets")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throwaway_prefect_home() -> str:
    """Point Prefect at a fresh ``PREFECT_HOME`` with no telemetry and room for a slow server start.

    Prefect reads these settings when it is imported, so call this before importing it. Returns the
    directory, for the caller to delete.
    """
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ.update(
        {
            "PREFECT_HOME": home,
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        }
    )
    return home


def save_result(name: str, result: dict[str, Any], command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine(),
        **result,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def run_isolated(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process (clean peak RSS); it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
