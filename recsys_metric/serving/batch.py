"""Batch recommendation tables: the top ``k`` items of every user as partitioned Parquet.

:func:`write_recommendations` writes one table in this process; :func:`plan_recommendations`,
:func:`write_partition` and :func:`finish_recommendations` cut the same work into partitions that
other processes or machines write. Scoring is the exact blocked ranker of
:mod:`recsys_metric.serving.ranking` (torch when it is installed, which used less CPU time than
numpy for large blocks; numpy otherwise) or the run's Annoy index, with the same canonical scores as :class:`~recsys_metric.serving.Recommender`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_metric.cold_items import excluded_item_nums
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.index import AnnoyIndex, ItemIndex
from recsys_metric.registry import resolve_run_dir
from recsys_metric.serving.ranking import _block_users, _check_k, _Engine, _Exclusions
from recsys_metric.serving.recommender import _id_numbers
from recsys_metric.serving.run import _read_interactions, _read_run, _RunEmbeddings
from recsys_metric.serving.verify import RunVerifier

TABLE_MANIFEST = "_manifest.json"
"""Written last into a recommendation table directory (readers of ``*.parquet`` skip it)."""

_WRITES_IN_FLIGHT = 2


def _check_device(device: str) -> None:
    """Refuse an invalid device spec before anything is written (``cpu`` needs no torch)."""
    if str(device).strip().lower() != "cpu":
        from recsys_metric.device import resolve_device

        resolve_device(device)


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _write_part(table: pa.Table, path: Path) -> None:
    with open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd", use_dictionary=["user_id", "run_id"])
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TablePartition:
    """Consecutive blocks of users of a recommendation table, written by one call of
    :func:`write_partition`.

    Attributes:
        number: position of the partition in its plan, from 0.
        first_file: number of its first file: block ``j`` of the partition is written as
            ``part-{first_file + j:05d}.parquet``.
        user_nums: int64 ``[U]`` dense user numbers of the partition, in table order.
    """

    number: int
    first_file: int
    user_nums: np.ndarray


@dataclass(frozen=True)
class TablePlan:
    """A recommendation table cut into partitions that separate tasks (threads, processes, Dask
    workers on other machines) write, then finished in one place.

    Made by :func:`plan_recommendations` (which creates the temporary table directory); each
    partition is written by :func:`write_partition`; :func:`finish_recommendations` writes the
    manifest and moves the table into place, or :func:`discard_recommendations` removes it.
    :func:`write_recommendations` is the same three steps with one partition, in one process.

    Files are numbered as in a single-process run whatever the number of partitions: users go
    in blocks of ``block_users`` in table order, block ``b`` to ``part-{b:05d}.parquet``, and a
    partition is a run of consecutive blocks. The table, its files and its manifest are therefore
    the same for any number of partitions (but for ``created`` and the timings).

    The plan is small and picklable: paths, settings and the user numbers (8 bytes per user).

    Attributes:
        run_dir: the resolved run directory every partition reads.
        run_id: the run's id (from its embeddings); a partition finding another refuses to write.
        out_dir: the table directory to create.
        tmp_dir: the temporary directory beside ``out_dir`` that partitions write into.
        k, index, exclude_seen, device, search_k, overwrite: as for :func:`write_recommendations`.
        block_users: users per file.
        started: ``time.time()`` when the plan was made (the manifest's ``seconds`` count from it).
        partitions: the partitions, numbered from 0.
    """

    run_dir: str
    run_id: str
    out_dir: str
    tmp_dir: str
    k: int
    index: Literal["exact", "annoy"]
    exclude_seen: bool
    device: str
    search_k: int | None
    overwrite: bool
    block_users: int
    started: float
    partitions: tuple[TablePartition, ...]

    @property
    def n_users(self) -> int:
        return sum(int(p.user_nums.size) for p in self.partitions)


def plan_recommendations(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    k: int = 100,
    user_ids: Sequence[Any] | None = None,
    index: Literal["exact", "annoy"] = "exact",
    batch_users: int | None = None,
    exclude_seen: bool = True,
    device: str = "cpu",
    search_k: int | None = None,
    overwrite: bool = False,
    partitions: int = 1,
) -> TablePlan:
    """Check the arguments and the run, cut the users into ``partitions`` and create the temporary
    table directory beside ``out_dir``.

    Arguments as for :func:`write_recommendations`; ``partitions`` is the number of partitions
    wanted, at most one per block of users (fewer blocks give fewer partitions, at least one).
    Blocks are shared out as evenly as possible, consecutive blocks to the same partition.

    Raises:
        DataError, KeyError: as :func:`write_recommendations`, before anything is written.
        ValueError: ``partitions`` or ``batch_users`` is not a positive integer.
    """
    return _plan(
        path,
        out_dir,
        k=k,
        user_ids=user_ids,
        index=index,
        batch_users=batch_users,
        exclude_seen=exclude_seen,
        device=device,
        search_k=search_k,
        overwrite=overwrite,
        partitions=partitions,
    )[0]


def _plan(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    k: int,
    user_ids: Sequence[Any] | None,
    index: Literal["exact", "annoy"],
    batch_users: int | None,
    exclude_seen: bool,
    device: str,
    search_k: int | None,
    overwrite: bool,
    partitions: int,
) -> tuple[TablePlan, _RunEmbeddings]:
    """:func:`plan_recommendations`, also returning the run it read (a single-process writer
    goes on with it instead of reading it again)."""
    started = time.time()
    k = _check_k(k)
    if index not in ("exact", "annoy"):
        raise ConfigError(f"index must be 'exact' or 'annoy', got {index!r}")
    for name, value in (("batch_users", batch_users), ("partitions", partitions)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output directory {out_dir} already exists; pass overwrite=True to replace it")
    run_dir = resolve_run_dir(path)
    _check_device(device)
    # Verified like a query's load: a damaged file must not become a table other systems read.
    run = _read_run(run_dir, RunVerifier(run_dir))
    if user_ids is None:
        users = np.arange(len(run.users), dtype=np.int64)
    else:
        users = _id_numbers(Vocabulary(run.users.ids, name="user"), user_ids).astype(np.int64)
    block = int(batch_users) if batch_users is not None else _block_users(len(run.items))
    n_blocks = -(-int(users.size) // block)
    groups = np.array_split(np.arange(n_blocks), max(1, min(int(partitions), n_blocks)))
    parts = tuple(
        TablePartition(
            number=number,
            first_file=int(group[0]) if group.size else 0,
            user_nums=users[int(group[0]) * block : (int(group[-1]) + 1) * block]
            if group.size
            else users[:0],
        )
        for number, group in enumerate(groups)
    )
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    tmp_dir.mkdir(parents=True)
    plan = TablePlan(
        run_dir=str(run_dir),
        run_id=run.run_id,
        out_dir=str(out_dir),
        tmp_dir=str(tmp_dir),
        k=k,
        index=index,
        exclude_seen=exclude_seen,
        device=str(device),
        search_k=search_k,
        overwrite=overwrite,
        block_users=block,
        started=started,
        partitions=parts,
    )
    return plan, run


def write_partition(plan: TablePlan, number: int, *, progress: bool | None = False) -> dict[str, Any]:
    """Write partition ``number`` of ``plan`` into the plan's temporary directory.

    Reads the run itself (embeddings, seen items, the Annoy index when asked for), so that it can
    run in any process that sees ``plan.run_dir`` and ``plan.tmp_dir``. Writing the same partition
    twice (a retried task) writes the same files again.

    Returns:
        ``number``, ``files`` (names, in order), ``n_users``, ``n_rows``, ``users_short``: what
        :func:`finish_recommendations` takes.

    Raises:
        DataError: the temporary directory is not there (``out_dir`` is not on storage this
            process sees), or the run directory now holds another run.
    """
    if not 0 <= number < len(plan.partitions):
        raise ValueError(f"partition {number} is not in the plan (partitions 0..{len(plan.partitions) - 1})")
    tmp_dir = Path(plan.tmp_dir)
    if not tmp_dir.is_dir():
        raise DataError(
            f"the table's temporary directory {tmp_dir} does not exist on {socket.gethostname()}: every "
            "process writing partitions must see the output directory (a shared file system), and "
            "the plan must not have been finished or discarded already"
        )
    run = _read_run(Path(plan.run_dir), RunVerifier(Path(plan.run_dir)))
    if run.run_id != plan.run_id:
        raise DataError(
            f"run directory {plan.run_dir} now holds run {run.run_id!r}, but the table was planned for "
            f"run {plan.run_id!r}; plan the table again"
        )
    return _write_partition(plan, plan.partitions[number], run, progress)


def _write_partition(
    plan: TablePlan, part: TablePartition, run: _RunEmbeddings, progress: bool | None
) -> dict[str, Any]:
    # Parquet decoding leaves freed buffers in Arrow's pool; hand them back before the next peak.
    pa.default_memory_pool().release_unused()
    run_dir = Path(plan.run_dir)
    tmp_dir = Path(plan.tmp_dir)
    k = plan.k
    n_users, n_items = len(run.users), len(run.items)
    seen = _read_interactions(run_dir, n_users, n_items, liked=False)[0] if plan.exclude_seen else None
    ann: ItemIndex | None = None
    if plan.index == "annoy":
        ann = AnnoyIndex.load(
            run_dir, vectors=run.items.vectors, search_k=plan.search_k, distance=run.distance
        )
    engine = _Engine(
        run.items.vectors, run.distance, plan.device, bulk=True, never=excluded_item_nums(plan.run_dir)
    )
    block = plan.block_users
    users = part.user_nums
    buffer = engine.ranker.buffer(min(block, max(1, int(users.size))))

    user_id_array = run.users.ids.to_arrow()
    item_id_array = run.items.ids.to_arrow()
    run_id_array = pa.array([run.run_id], type=pa.string())
    schema_meta = {b"run_id": run.run_id.encode(), b"k": str(k).encode(), b"distance": run.distance.encode()}

    n_rows = 0
    users_short = 0
    files: list[str] = []
    pending: deque[Future[None]] = deque()
    bar = None
    try:
        if _show_progress(progress):
            from tqdm.auto import tqdm

            bar = tqdm(total=int(users.size), unit="user", unit_scale=True, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recommendations-writer") as writer:
            for part_file, start in enumerate(range(0, users.size, block), start=part.first_file):
                chunk = users[start : start + block]
                exclusions = (
                    _Exclusions.of_matrix(seen, chunk) if seen is not None else _Exclusions.none(chunk.size)
                )
                nums, scores = engine.rank(run.users.vectors[chunk], k, exclusions, ann, buffer)
                keep = nums >= 0
                per_user = keep.sum(1)
                n_kept = int(per_user.sum())
                users_short += int((per_user < k).sum())
                n_rows += n_kept
                ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), nums.shape)[keep]
                table = pa.table(
                    {
                        "user_id": pc.take(user_id_array, pa.array(np.repeat(chunk, per_user))),
                        "rank": pa.array(ranks),
                        "item_id": pc.take(item_id_array, pa.array(nums[keep])),
                        "score": pa.array(scores[keep].astype(np.float32, copy=False)),
                        "run_id": pc.take(run_id_array, pa.array(np.zeros(n_kept, dtype=np.int32))),
                    }
                ).replace_schema_metadata(schema_meta)
                name = f"part-{part_file:05d}.parquet"
                files.append(name)
                if len(pending) >= _WRITES_IN_FLIGHT:
                    pending.popleft().result()
                pending.append(writer.submit(_write_part, table, tmp_dir / name))
                if bar is not None:
                    bar.update(int(chunk.size))
            while pending:
                pending.popleft().result()
    finally:
        if bar is not None:
            bar.close()
    return {
        "number": part.number,
        "files": files,
        "n_users": int(users.size),
        "n_rows": n_rows,
        "users_short": users_short,
    }


def finish_recommendations(plan: TablePlan, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write the manifest of a planned table and rename the table into place.

    Args:
        plan: the plan every partition was written from.
        results: what :func:`write_partition` returned for every partition, in any order.

    Returns:
        The summary :func:`write_recommendations` returns; ``seconds`` counts from the planning.

    Raises:
        DataError: a partition is missing or was written twice, or a file it reported is not
            there; the temporary directory is removed and ``out_dir`` left as it was.
    """
    tmp_dir, out_dir = Path(plan.tmp_dir), Path(plan.out_dir)
    try:
        by_number = sorted(results, key=lambda r: r["number"])
        numbers = [r["number"] for r in by_number]
        if numbers != list(range(len(plan.partitions))):
            raise DataError(
                f"table {out_dir}: the plan has {len(plan.partitions)} partitions but results came for "
                f"partitions {numbers}; write every partition exactly once"
            )
        files = [name for r in by_number for name in r["files"]]
        missing = [name for name in files if not (tmp_dir / name).is_file()]
        if missing:
            raise DataError(
                f"table {out_dir}: {len(missing)} of {len(files)} partition files are not in {tmp_dir} "
                f"(first: {missing[0]}); every writer must see the same output directory"
            )
        n_users = sum(r["n_users"] for r in by_number)
        seconds = time.time() - plan.started
        summary: dict[str, Any] = {
            "run_id": plan.run_id,
            "run_dir": plan.run_dir,
            "out_dir": str(out_dir),
            "k": plan.k,
            "index": plan.index,
            "exclude_seen": plan.exclude_seen,
            "n_users": n_users,
            "n_rows": sum(r["n_rows"] for r in by_number),
            "n_files": len(files),
            "users_short": sum(r["users_short"] for r in by_number),
            "block_users": plan.block_users,
            "seconds": round(seconds, 3),
            "users_per_second": round(n_users / seconds, 1) if seconds > 0 else None,
        }
        manifest = {
            **summary,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "columns": ["user_id", "rank", "item_id", "score", "run_id"],
            "files": files,
        }
        (tmp_dir / TABLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp_dir)
        _move_into_place(tmp_dir, out_dir, plan.overwrite)
    except BaseException:
        discard_recommendations(plan)
        raise
    return summary


def discard_recommendations(plan: TablePlan) -> None:
    """Remove a planned table's temporary directory (a failed write); ``out_dir`` is untouched."""
    shutil.rmtree(plan.tmp_dir, ignore_errors=True)


def write_recommendations(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    k: int = 100,
    user_ids: Sequence[Any] | None = None,
    index: Literal["exact", "annoy"] = "exact",
    batch_users: int | None = None,
    exclude_seen: bool = True,
    progress: bool | None = None,
    device: str = "cpu",
    search_k: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Top ``k`` items for every user (or ``user_ids``) as a partitioned Parquet table.

    ``out_dir`` receives ``part-00000.parquet``, ``part-00001.parquet``, ... (one per block of
    users, rows ordered by user then rank) with the columns ``user_id, rank, item_id, score,
    run_id`` (rank int32 from 1, score float32 higher is better), and ``_manifest.json``
    (counts and settings). Everything is written into a temporary directory beside ``out_dir``
    and renamed into place at the end: a reader sees the whole table or none of it.

    Users are scored in blocks: one ``[block, n_items]`` matrix product, the block's seen items
    masked, the best ``k + margin`` items selected, then the canonical scores (the module
    docstring); each block is written by a background thread while the next is scored. A block
    holds about 256 MiB of scores whatever the catalogue size, so memory stays bounded by the
    user vectors, the seen-item matrix and two blocks: well under 2 GB for 1M users x 100k
    items at D=64.

    This is :func:`plan_recommendations`, :func:`write_partition` and
    :func:`finish_recommendations` with one partition in this process; several processes or
    machines can write the partitions of one plan instead, with the same result.

    Args:
        path: run directory or artifacts directory (:func:`resolve_run_dir`).
        out_dir: the table directory to create.
        k: items per user; fewer only for users with fewer eligible items.
        user_ids: restrict to these users (in this order); None: every user in number order.
        index: ``exact`` (blocked exact scoring) or ``annoy`` (the run's ``items.ann``, with
            exact scoring for any user whose Annoy answer came back short).
        batch_users: users per block; None sizes blocks by the number of items.
        exclude_seen: leave out every item the user interacted with in the run.
        progress: tqdm progress bar; None: only when stderr is a terminal.
        device: where blocks are scored (``cpu``, ``cuda``, ``auto``).
        search_k: Annoy ``search_k``; None keeps the index default.
        overwrite: replace an existing ``out_dir`` (the old table is removed after the new one
            is in place); otherwise an existing ``out_dir`` is an error.

    Returns:
        ``run_id``, ``out_dir``, ``k``, ``index``, ``n_users``, ``n_rows``, ``n_files``,
        ``users_short`` (users with fewer than ``k`` rows), ``block_users``, ``seconds``,
        ``users_per_second``.

    Raises:
        DataError: the run breaks its contract, or ``out_dir`` exists without ``overwrite``.
        KeyError: an unknown id in ``user_ids`` (named in the message).
    """
    plan, run = _plan(
        path,
        out_dir,
        k=k,
        user_ids=user_ids,
        index=index,
        batch_users=batch_users,
        exclude_seen=exclude_seen,
        device=device,
        search_k=search_k,
        overwrite=overwrite,
        partitions=1,
    )
    try:
        result = _write_partition(plan, plan.partitions[0], run, progress)
    except BaseException:
        discard_recommendations(plan)
        raise
    del run
    return finish_recommendations(plan, [result])


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp_dir`` to ``out_dir``; an existing ``out_dir`` (with ``overwrite``) is renamed
    aside first and removed after the new one is in place."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise DataError(
                f"output directory {out_dir} appeared while writing; pass overwrite=True to replace it"
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
