"""Items added after a run, kept as files that every serving process reads: the added-items journal.

A service that runs several worker processes (``recsys-metric api --workers N``) or restarts must
not lose what was added to one process: an item posted to one worker has to be served by all of
them, and still after a restart. :class:`ItemsJournal` keeps every accepted add call as one
numbered Parquet file in a directory (by default ``ARTIFACTS/added_items/``)::

    added_items/
      .lock                       held while an entry is numbered and written
      000000000001.parquet        the item frame of the first add call, as given
      000000000002.parquet        ...

Entries are numbered under an exclusive lock (``fcntl.flock``), written to a temporary name,
flushed and renamed into place before the lock is released, so an entry only ever appears after
every entry numbered before it: a reader listing the directory sees a prefix of the sequence, and
processes that apply the entries in number order end in the same state. A crash mid-write leaves
only a temporary file, which is ignored. The tag separator of the call is kept in the file's
metadata. Entries are never rewritten.

A :class:`~recsys_metric.serving.follow.FollowingRecommender` given a journal replays it onto
every run it loads (:func:`replay`: all entries folded into one add, a later entry's row
replacing an earlier one of the same id), and applies the entries other processes write at each
check of ``current`` (:func:`apply_entries`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_metric.errors import DataError

if TYPE_CHECKING:
    from recsys_metric.serving.added_items import AddResult
    from recsys_metric.serving.recommender import Recommender

__all__ = ["DEFAULT_DIR", "ItemsJournal", "apply_entries", "replay"]

log = logging.getLogger(__name__)

DEFAULT_DIR = "added_items"
"""The journal's directory inside an artifact store, unless another is given."""

_LOCK = ".lock"
_SUFFIX = ".parquet"
_SEPARATOR_KEY = b"recsys_metric.separator"
_DIGITS = 12


class ItemsJournal:
    """The numbered entries of one journal directory (created on first use).

    Args:
        directory: where the entries live; every process serving the same store uses the same one.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"ItemsJournal({str(self.directory)!r})"

    def entries(self) -> list[str]:
        """Entry names, oldest first (a missing directory has none)."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return []  # nothing was ever written (append says why it cannot write)
        return sorted(n for n in names if n.endswith(_SUFFIX) and n[: -len(_SUFFIX)].isdigit())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def append(self, frame: pl.DataFrame, *, separator: str = "|") -> str:
        """Write ``frame`` (an add call's items, as given) as the next entry; returns its name.

        Raises:
            OSError: the directory cannot be created or written (a full disk, a read-only store);
                no entry is left behind.
        """
        table = frame.to_arrow()
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), _SEPARATOR_KEY: separator.encode()}
        )
        with self._locked():
            existing = self.entries()
            number = int(existing[-1][: -len(_SUFFIX)]) + 1 if existing else 1
            name = f"{number:0{_DIGITS}d}{_SUFFIX}"
            tmp = self.directory / f".{name}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as out:
                    pq.write_table(table, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.directory / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return name

    def read(self, name: str) -> tuple[pl.DataFrame, str]:
        """One entry: its item frame and the separator of its tag strings.

        Raises:
            DataError: the file cannot be read (named, with what to do).
        """
        path = self.directory / name
        try:
            table: pa.Table = pq.read_table(path)
        except (OSError, pa.ArrowException) as err:
            raise DataError(
                f"{path}: cannot read this added-items journal entry ({type(err).__name__}: {err}); "
                "move it out of the directory to serve without it"
            ) from None
        separator = (table.schema.metadata or {}).get(_SEPARATOR_KEY, b"|").decode()
        frame = pl.from_arrow(table.replace_schema_metadata(None))
        assert isinstance(frame, pl.DataFrame)
        return frame, separator


def replay(journal: ItemsJournal, rec: Recommender) -> list[str]:
    """Add every entry of ``journal`` to ``rec`` (a run just loaded, nothing added yet) in one add
    call; returns the entry names it read. Never raises: an entry that cannot be read, or items
    the run cannot place (an id it knows is served by its own vector; an item without a feature
    value it knows is dropped) are logged, and the run serves without them."""
    from recsys_metric.serving.added_items import _split_tag_strings, placeable_rows

    try:
        names = journal.entries()
    except OSError as err:  # e.g. no permission to list it: serve the run, say why
        log.warning("cannot read the added-items journal %s, serving without it: %s", journal.directory, err)
        return []
    if not names:
        return names
    source = f"in the added-items journal {journal.directory}"
    try:
        embedder = rec._item_embedder()
    except Exception as err:  # noqa: BLE001 - a run without item features still serves its own items
        log.warning("run %s cannot embed the %d journal entries %s: %s", rec.run_id, len(names), source, err)
        return names
    frames = []
    for name in names:
        try:
            frame, separator = journal.read(name)
        except DataError as err:
            log.warning("%s", err)
            continue
        frames.append(_split_tag_strings(frame, embedder, separator))
    if not frames:
        return names
    try:
        rows = pl.concat(frames, how="diagonal_relaxed").unique("item_id", keep="last", maintain_order=True)
    except pl.exceptions.PolarsError as err:
        log.warning("the entries %s do not fit together (%s); applying them one by one", source, err)
        apply_entries(journal, rec, names)
        return names
    rows = placeable_rows(rows, lambda: embedder, rec._base[2], source=source)
    if rows is not None:
        try:
            result = rec.add_items(rows)
        except Exception as err:  # noqa: BLE001 - never keep a good run from serving
            log.warning(
                "run %s: the items %s could not be added (%s); applying them one by one",
                rec.run_id,
                source,
                err,
            )
            apply_entries(journal, rec, names)
            return names
        log.info("run %s: %d item(s) %s added", rec.run_id, len(result.added), source)
    return names


def apply_entries(journal: ItemsJournal, rec: Recommender, names: list[str]) -> dict[str, AddResult | None]:
    """Add the entries ``names`` to ``rec`` in order, each as its own add call; the result of
    each (None for one that could not be read or added: logged, and skipped)."""
    results: dict[str, Any] = {}
    for name in names:
        try:
            frame, separator = journal.read(name)
            results[name] = rec.add_items(frame, separator=separator)
        except Exception as err:  # noqa: BLE001 - one bad entry must not stop the others
            log.warning(
                "added-items journal entry %s not applied to run %s: %s",
                journal.directory / name,
                rec.run_id,
                err,
            )
            results[name] = None
    return results
