"""Check the files serving reads against the run's ``manifest.json`` before reading them.

A run finalized by the artifact store records the size and sha256 of every file. A file damaged
since (a disk error, a half-finished copy, an operator's mistake) must never reach a reader:
Annoy does not check its file, and random bytes in ``items.ann`` kill the querying process with
SIGSEGV or SIGABRT; a zeroed Parquet file or a damaged ``model.pt`` may even be read without
error and answer silently wrong. So :class:`RunVerifier` compares each file with the manifest,
size first (a ``stat``), then sha256, before the file is opened, and raises
:class:`~recsys_metric.registry.IntegrityError` naming the file.

Cost: hashing reads every byte once, about 1-2 s per GB here (sha256 is CPU bound; files are
hashed in parallel threads, hashlib releases the GIL). ``verify=False`` skips it and says so in a
warning: the run's files are then trusted as they are.

Which runs must have a manifest: a run inside an artifact store (its directory is under
``runs/``) always has one once finalized, so a missing or unreadable manifest there is an
integrity error. A directory outside a store (the output of ``train_run``) has none by design; it
is loaded unverified, with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recsys_metric.registry import (
    MANIFEST_FILE,
    RUNS_DIR,
    IntegrityError,
    Manifest,
    RegistryError,
    file_sha256,
)

log = logging.getLogger(__name__)

_HASH_THREADS = 4


class RunVerifier:
    """Verifies files of one run directory against its manifest, each file at most once.

    Thread-safe: a file asked for by two threads at once is hashed by one of them.

    Attributes:
        run_dir: the run directory.
        manifest: the run's manifest, or None when the run has none (see the module docstring)
            or verification is off.
        enabled: False with ``verify=False``: :meth:`check` does nothing.
    """

    def __init__(self, run_dir: Path, *, verify: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = bool(verify)
        self.manifest: Manifest | None = None
        self._done: set[str] = set()
        self._lock = threading.Lock()
        if not self.enabled:
            log.warning(
                "run %s is loaded without verification (verify=False): its files are not checked "
                "against %s, so a damaged file can give wrong answers or crash the process",
                self.run_dir,
                MANIFEST_FILE,
            )
            return
        path = self.run_dir / MANIFEST_FILE
        in_store = self.run_dir.parent.name == RUNS_DIR
        if not path.exists():
            if in_store:
                raise IntegrityError(
                    f"run directory {self.run_dir} has no {MANIFEST_FILE}: a run in an artifact store "
                    "is finalized with one, so this run is damaged or incomplete; publish another run "
                    "(or pass verify=False to load it unchecked)",
                    run_id=self.run_dir.name,
                    files=[MANIFEST_FILE],
                )
            self.enabled = False
            log.warning(
                "run directory %s has no %s (not finalized by an artifact store): loaded unverified",
                self.run_dir,
                MANIFEST_FILE,
            )
            return
        try:
            self.manifest = Manifest.load(path)
        except (RegistryError, UnicodeDecodeError, OSError, ValueError) as err:
            # UnicodeDecodeError: random bytes in the JSON text are not even UTF-8.
            raise IntegrityError(
                f"run directory {self.run_dir}: {MANIFEST_FILE} cannot be read ({err}); without it the "
                "run's files cannot be verified. Publish another run (or pass verify=False)",
                run_id=self.run_dir.name,
                files=[MANIFEST_FILE],
            ) from None
        if in_store and self.manifest.run_id != self.run_dir.name:
            raise IntegrityError(
                f"run directory {self.run_dir}: {MANIFEST_FILE} belongs to run "
                f"{self.manifest.run_id!r}; the run directory is damaged",
                run_id=self.run_dir.name,
                files=[MANIFEST_FILE],
            )

    @property
    def verified(self) -> bool:
        """True when files are checked against a manifest."""
        return self.enabled and self.manifest is not None

    def check(self, names: Iterable[str]) -> None:
        """Verify the files ``names`` (relative paths) that exist or that the manifest lists.

        A file neither on disk nor in the manifest is skipped (an optional file the run does not
        have; the reader reports it when it needs it).

        Raises:
            IntegrityError: a file is missing, not in the manifest, or differs in size or sha256;
                the message names every such file and the run.
        """
        if not self.verified:
            return
        assert self.manifest is not None
        with self._lock:
            todo = [n for n in dict.fromkeys(names) if n not in self._done]
            problems: list[tuple[str, str]] = []
            to_hash: list[str] = []
            for name in todo:
                path = self.run_dir / name
                entry = self.manifest.files.get(name)
                exists = path.is_file()
                if entry is None:
                    if exists:
                        problems.append((name, "is not in the manifest"))
                    continue
                if not exists:
                    problems.append((name, "is missing"))
                    continue
                size = os.stat(path).st_size
                if size != entry.size:
                    problems.append((name, f"has {size} bytes but the manifest records {entry.size}"))
                    continue
                to_hash.append(name)
            if to_hash:
                workers = min(_HASH_THREADS, len(to_hash))
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
                    digests = list(pool.map(lambda n: file_sha256(self.run_dir / n), to_hash))
                for name, digest in zip(to_hash, digests, strict=True):
                    wanted = self.manifest.files[name].sha256
                    if digest != wanted:
                        problems.append(
                            (name, f"has sha256 {digest[:12]}... but the manifest records {wanted[:12]}...")
                        )
            if problems:
                detail = "; ".join(f"{name} {what}" for name, what in problems)
                raise IntegrityError(
                    f"run {self.manifest.run_id} in {self.run_dir} does not match its {MANIFEST_FILE}: "
                    f"{detail}. The file is damaged; publish another run (or re-run the pipeline)",
                    run_id=self.manifest.run_id,
                    files=[name for name, _ in problems],
                )
            self._done.update(todo)
