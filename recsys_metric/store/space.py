"""Free space: checked before a run writes anything heavy, and a full disk told in one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from recsys_metric.errors import RecsysMetricError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskSpaceError(RecsysMetricError):
    """Not enough free space for a run (checked before it starts, or a write failed with ENOSPC).

    Attributes:
        directory: where the space is missing.
        needed: bytes the run needs (an estimate).
        free: bytes free there when it was checked.
    """

    def __init__(self, message: str, *, directory: Path, needed: int, free: int):
        super().__init__(message)
        self.directory = directory
        self.needed = needed
        self.free = free


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``path`` (or its
    nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def fmt_bytes(n: int) -> str:
    """``12,345,678 bytes (11.8 MiB)``."""
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def check_free_space(directory: str | os.PathLike[str], needed: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` unless ``needed`` bytes are free where ``directory`` lives.

    Raises:
        DiskSpaceError: one line naming the directory, the bytes needed and free, and what to do.
    """
    directory = Path(directory).absolute()
    free = free_bytes(directory)
    if free < needed:
        raise DiskSpaceError(
            f"not enough free space in {directory}: {what} needs about {fmt_bytes(needed)}, "
            f"{fmt_bytes(free)} are free; free some space (or lower publish.keep_runs) and run again",
            directory=directory,
            needed=needed,
            free=free,
        )


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk or an exhausted quota.

    Libraries wrap ENOSPC in their own exceptions (polars, pyarrow, torch.save), so the message
    is checked too.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False
