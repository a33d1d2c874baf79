"""Train/test holdout of an encoded interaction frame.

Two methods, chosen by :class:`~recsys_metric.config.SplitConfig`:

- ``temporal`` (default): the newest interactions are the test set, so the model never sees the
  future it is evaluated on. Rows strictly newer than a cutoff are test; ties go to train.
- ``user_holdout``: a seeded random share of each sufficiently active user's interactions.
  A log without timestamps asked for ``temporal`` falls back to this and says so.

Both then apply the same leakage guard: a test row whose user, or whose item, has no training row
cannot be scored by a model trained on ``train``, so it is removed from the test set and counted
(never moved into train, which would change what the model sees). The removed rows are kept in
:attr:`Split.dropped`.

Everything is vectorised (numpy masks and one polars sort); 20M rows split in seconds.
:func:`split_codes` gives the same split as one code per row, for callers that keep a single frame
(``prepare_dataset`` writes it as the ``split`` column) instead of three copies of it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from recsys_metric.config import SplitConfig
from recsys_metric.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

# Rows per block for element-wise work on big arrays (temporaries stay small and are reused).
_BLOCK = 1 << 20

SPLIT_TRAIN: int = 0
SPLIT_TEST: int = 1
SPLIT_DROPPED: int = 2
SPLIT_NAMES: tuple[str, ...] = ("train", "test", "test_dropped")
"""Name of each :func:`split_codes` code, in code order."""


@dataclass(frozen=True)
class SplitInfo:
    """What a split did, for logs and the run manifest.

    Attributes:
        method: the method that ran (``temporal`` or ``user_holdout``).
        requested_method: the method the config asked for.
        fallback_reason: why ``method`` differs from ``requested_method``; None when it does not.
        cutoff: temporal only: test rows are strictly newer than this; None for user_holdout.
        test_fraction: the requested share of test rows (temporal: of all rows; user_holdout: of
            each eligible user's rows).
        n_train: rows in train.
        n_test: rows in test, after the leakage guard.
        n_test_dropped_unseen_user: test rows removed because their user has no training row.
        n_test_dropped_unseen_item: test rows removed because their item has no training row
            (and their user has one: a row with both counts once, as unseen user).
        n_train_users: distinct users in train.
        n_test_users: distinct users in test.
        n_test_liked: test rows with ``label == 1``; None when the frame has no label column.
    """

    method: str
    requested_method: str
    fallback_reason: str | None
    cutoff: datetime | None
    test_fraction: float
    n_train: int
    n_test: int
    n_test_dropped_unseen_user: int
    n_test_dropped_unseen_item: int
    n_train_users: int
    n_test_users: int
    n_test_liked: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict; ``cutoff`` as an ISO-8601 string (or None)."""
        out = dataclasses.asdict(self)
        out["cutoff"] = self.cutoff.isoformat() if self.cutoff is not None else None
        return out


@dataclass(frozen=True, eq=False)
class Split:
    """The result of a split.

    Attributes:
        train: training rows, every input column, in input order.
        test: test rows after the leakage guard, every input column, in input order.
        info: counts and parameters.
        dropped: test rows the leakage guard removed, in input order, with an extra String column
            ``drop_reason`` (``unseen_user`` or ``unseen_item``). ``train``, ``test`` and
            ``dropped`` together hold every input row exactly once.
    """

    train: pl.DataFrame
    test: pl.DataFrame
    info: SplitInfo
    dropped: pl.DataFrame = field(default_factory=pl.DataFrame)


def split_interactions(df: pl.DataFrame, config: SplitConfig) -> Split:
    """Split by ``config.method``; ``temporal`` without usable timestamps falls back to user holdout.

    Args:
        df: labelled, encoded interactions: ``user_num``, ``item_num`` (Int32, >= 0), optional
            ``timestamp`` (Datetime), optional ``label`` (Int8); other columns are carried along.

    Raises:
        DataError: missing or bad columns, or a split with an empty train or test set.
    """
    return _frames(df, _assign(df, config))


def split_codes(df: pl.DataFrame, config: SplitConfig) -> tuple[np.ndarray, SplitInfo]:
    """:func:`split_interactions` as one code per row, without building the three frames.

    Returns:
        ``(codes, info)``: uint8 ``[df.height]``, :data:`SPLIT_TRAIN` (0), :data:`SPLIT_TEST` (1) or
        :data:`SPLIT_DROPPED` (2: a test row the leakage guard removed), and the same
        :class:`SplitInfo` as :func:`split_interactions` gives.

    Raises:
        DataError: as :func:`split_interactions`.
    """
    assignment = _assign(df, config)
    codes = (~assignment.is_train).view(np.uint8)
    codes[np.flatnonzero(assignment.unseen_user | assignment.unseen_item)] = SPLIT_DROPPED
    return codes, assignment.info


def _assign(df: pl.DataFrame, config: SplitConfig) -> _Assignment:
    if config.method == "user_holdout":
        return _assign_user_holdout(
            df,
            test_fraction=config.test_fraction,
            min_user_interactions=config.min_user_interactions,
            seed=config.seed,
        )
    reason = _no_timestamps_reason(df)
    if reason is None:
        return _assign_temporal(df, test_fraction=config.test_fraction, cutoff=config.cutoff)
    if config.cutoff is not None:
        reason += f"; split.cutoff {config.cutoff.isoformat()} is ignored"
    logger.warning("temporal split not possible (%s): falling back to user_holdout", reason)
    assignment = _assign_user_holdout(
        df,
        test_fraction=config.test_fraction,
        min_user_interactions=config.min_user_interactions,
        seed=config.seed,
    )
    info = dataclasses.replace(assignment.info, requested_method="temporal", fallback_reason=reason)
    return dataclasses.replace(assignment, info=info)


def temporal_split(
    df: pl.DataFrame,
    *,
    test_fraction: float = 0.2,
    cutoff: datetime | None = None,
) -> Split:
    """Test = rows strictly newer than the cutoff; everything else is train.

    Without ``cutoff``, the cutoff is the timestamp with ``round(test_fraction * n)`` rows newer
    than it among the ``n`` timestamped rows, so about ``test_fraction`` of them are test; rows
    tied with the cutoff stay in train, so no training row is newer than any test row. Rows with
    a null timestamp cannot be placed in time and stay in train.

    Args:
        df: encoded interactions with a ``timestamp`` Datetime column (see :func:`split_interactions`).
        test_fraction: share of timestamped rows wanted in test, in (0, 1); ignored with ``cutoff``.
        cutoff: explicit cutoff. A naive datetime is read in the column's time zone (UTC for a
            naive column); an aware one is converted.

    Raises:
        DataError: no usable timestamps, or an empty train or test set (the message gives the
            oldest/newest event and the cutoff, and what to change).
    """
    return _frames(df, _assign_temporal(df, test_fraction=test_fraction, cutoff=cutoff))


def _assign_temporal(df: pl.DataFrame, *, test_fraction: float, cutoff: datetime | None) -> _Assignment:
    _check_frame(df)
    _check_fraction(test_fraction)
    reason = _no_timestamps_reason(df)
    if reason is not None:
        raise DataError(f"temporal split needs timestamps: {reason}; use split.method: user_holdout")
    ts = df.get_column("timestamp")
    valid = ts.drop_nulls()
    n_valid = valid.len()
    explicit = cutoff is not None
    if cutoff is None:
        n_newer = min(max(1, _round_half_up(test_fraction * n_valid)), max(n_valid - 1, 0))
        cut = valid.top_k(n_newer + 1).min()
    else:
        cut = _align_cutoff(cutoff, ts.dtype)
    is_test = (ts > cut).fill_null(False).to_numpy()
    n_test = int(is_test.sum())
    oldest, newest = valid.min(), valid.max()
    if n_test == 0:
        if explicit:
            raise DataError(
                f"temporal split left the test set empty: split.cutoff {cut} is at or after the newest "
                f"event {newest} ({n_valid} timestamped rows). Set split.cutoff before {newest}, or unset "
                f"it to cut at split.test_fraction."
            )
        if oldest == newest:
            raise DataError(
                f"temporal split left the test set empty: all {n_valid} timestamps are equal ({newest}), "
                f"so no event is newer than another. Use split.method: user_holdout."
            )
        n_tied = int((valid == cut).sum())
        raise DataError(
            f"temporal split left the test set empty: the cutoff {cut} from split.test_fraction="
            f"{test_fraction} is the newest event {newest}, shared by {n_tied} of {n_valid} rows, and ties "
            f"go to train. Raise split.test_fraction, set an earlier split.cutoff, or use "
            f"split.method: user_holdout."
        )
    if n_test == df.height:
        raise DataError(
            f"temporal split left the training set empty: split.cutoff {cut} is before the oldest event "
            f"{oldest}, so all {df.height} rows are newer. Set split.cutoff after {oldest}, or unset it "
            f"to cut at split.test_fraction."
        )
    if n_valid < df.height:
        logger.warning("%d of %d rows have no timestamp; they stay in train", df.height - n_valid, df.height)
    return _guard(
        df,
        is_test,
        method="temporal",
        cutoff=cut,
        test_fraction=test_fraction,
        hint="the test period holds only users/items that never occur before the cutoff; use an "
        "earlier split.cutoff or a larger split.test_fraction",
    )


def user_holdout_split(
    df: pl.DataFrame,
    *,
    test_fraction: float = 0.2,
    min_user_interactions: int = 5,
    seed: int = 42,
) -> Split:
    """For every user with ``>= min_user_interactions`` rows, a seeded random share goes to test.

    A user with ``n`` rows gives ``round(test_fraction * n)`` of them (half up), clipped to
    ``[1, n - 1]``, to test; less active users keep all their rows in train. The draw is a
    seeded 64-bit hash of ``(user_num, item_num)`` ranked within each user, so it depends on
    the seed and the data, not on the row order (repeated pairs tie and keep input order).

    Raises:
        DataError: no user reaches ``min_user_interactions`` (empty test set).
    """
    return _frames(
        df,
        _assign_user_holdout(
            df, test_fraction=test_fraction, min_user_interactions=min_user_interactions, seed=seed
        ),
    )


def _assign_user_holdout(
    df: pl.DataFrame, *, test_fraction: float, min_user_interactions: int, seed: int
) -> _Assignment:
    _check_frame(df)
    _check_fraction(test_fraction)
    if min_user_interactions < 2:
        raise ConfigError(
            f"split.min_user_interactions must be at least 2 (one row for train, one for test), "
            f"got {min_user_interactions}"
        )
    users = df.get_column("user_num").to_numpy().astype(np.int64)
    items = df.get_column("item_num").to_numpy().astype(np.int64)
    counts = np.bincount(users)
    n_test_per_user = np.clip(np.floor(test_fraction * counts + 0.5).astype(np.int64), 1, counts - 1)
    n_test_per_user[counts < min_user_interactions] = 0
    if not n_test_per_user.any():
        raise DataError(
            f"user holdout left the test set empty: no user has at least split.min_user_interactions="
            f"{min_user_interactions} interactions (the most active user has {int(counts.max())} of "
            f"{df.height} rows). Lower split.min_user_interactions."
        )
    key = _hash64((users << 32) | items, seed)
    # Users in the high 32 bits, 32 random bits below: one stable sort groups rows by user and
    # orders each user's rows randomly (ties, i.e. repeated pairs, keep input order).
    key >>= np.uint64(32)
    key |= users.astype(np.uint64) << np.uint64(32)
    order = pl.DataFrame({"k": key}).select(pl.arg_sort_by("k", maintain_order=True)).to_series().to_numpy()
    del key
    # In sorted order user u occupies counts[u] consecutive slots starting at starts[u]; the
    # first n_test_per_user[u] of them are its test rows. No gather through `order` is needed.
    starts = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=starts[1:])
    rank = np.arange(df.height, dtype=np.int64) - np.repeat(starts, counts)
    test_sorted = rank < np.repeat(n_test_per_user, counts)
    is_test = np.zeros(df.height, dtype=bool)
    is_test[order[test_sorted]] = True
    return _guard(
        df,
        is_test,
        method="user_holdout",
        cutoff=None,
        test_fraction=test_fraction,
        hint="every held-out item occurs only once in the log; lower split.test_fraction or use more data",
    )


@dataclass(frozen=True)
class _Assignment:
    """Row masks of a split (bool ``[n]`` each) and its info; the three test masks are disjoint."""

    is_train: np.ndarray
    keep: np.ndarray
    """Test rows that survive the leakage guard."""
    unseen_user: np.ndarray
    unseen_item: np.ndarray
    info: SplitInfo


def _guard(
    df: pl.DataFrame,
    is_test: np.ndarray,
    *,
    method: str,
    cutoff: datetime | None,
    test_fraction: float,
    hint: str,
) -> _Assignment:
    """Apply the leakage guard to a test mask and count the result."""
    users = df.get_column("user_num").to_numpy()
    items = df.get_column("item_num").to_numpy()
    is_train = ~is_test
    seen_user = np.zeros(int(users.max()) + 1, dtype=bool)
    seen_item = np.zeros(int(items.max()) + 1, dtype=bool)
    # Block by block: a masked gather of every training row at once allocates two arrays of 16M
    # int64 indices, and fresh memory is what costs most here.
    for lo in range(0, users.size, _BLOCK):
        train_block = is_train[lo : lo + _BLOCK]
        seen_user[users[lo : lo + _BLOCK][train_block]] = True
        seen_item[items[lo : lo + _BLOCK][train_block]] = True
    test_rows = np.flatnonzero(is_test)
    # Only test rows can be dropped: look them up alone instead of masking every row.
    test_unseen_user = ~seen_user[users[test_rows]]
    test_unseen_item = ~test_unseen_user & ~seen_item[items[test_rows]]
    unseen_user = np.zeros(df.height, dtype=bool)
    unseen_user[test_rows[test_unseen_user]] = True
    unseen_item = np.zeros(df.height, dtype=bool)
    unseen_item[test_rows[test_unseen_item]] = True
    n_unseen_user, n_unseen_item = int(test_unseen_user.sum()), int(test_unseen_item.sum())
    n_test = test_rows.size - n_unseen_user - n_unseen_item
    if n_test == 0:
        raise DataError(
            f"{method} split left the test set empty after the leakage guard: of {int(is_test.sum())} test "
            f"rows, {n_unseen_user} belong to users and {n_unseen_item} to items with no training row. "
            f"Likely {hint}."
        )
    keep = is_test.copy()
    keep[test_rows[test_unseen_user | test_unseen_item]] = False
    kept_rows = test_rows[~(test_unseen_user | test_unseen_item)]
    n_test_liked = None
    if "label" in df.columns:
        n_test_liked = int(np.count_nonzero(df.get_column("label").to_numpy()[kept_rows] == 1))
    info = SplitInfo(
        method=method,
        requested_method=method,
        fallback_reason=None,
        cutoff=cutoff,
        test_fraction=float(test_fraction),
        n_train=int(users.size - test_rows.size),
        n_test=n_test,
        n_test_dropped_unseen_user=n_unseen_user,
        n_test_dropped_unseen_item=n_unseen_item,
        n_train_users=int(seen_user.sum()),
        n_test_users=int(np.count_nonzero(np.bincount(users[kept_rows]))),
        n_test_liked=n_test_liked,
    )
    logger.info(
        "%s split: %d train rows, %d test rows (%d dropped: %d unseen user, %d unseen item)",
        method,
        info.n_train,
        info.n_test,
        n_unseen_user + n_unseen_item,
        n_unseen_user,
        n_unseen_item,
    )
    return _Assignment(
        is_train=is_train, keep=keep, unseen_user=unseen_user, unseen_item=unseen_item, info=info
    )


def _frames(df: pl.DataFrame, a: _Assignment) -> Split:
    """The train, test and dropped frames of an assignment."""
    dropped_mask = a.unseen_user | a.unseen_item
    train = df.filter(pl.Series(a.is_train))
    test = df.filter(pl.Series(a.keep))
    dropped = df.filter(pl.Series(dropped_mask)).with_columns(
        drop_reason=pl.Series(np.where(a.unseen_user[dropped_mask], "unseen_user", "unseen_item"))
    )
    return Split(train=train, test=test, info=a.info, dropped=dropped)


def _check_frame(df: pl.DataFrame) -> None:
    if not isinstance(df, pl.DataFrame):
        raise TypeError(f"expected a polars DataFrame, got {type(df).__name__} (collect a LazyFrame first)")
    if df.height == 0:
        raise DataError("cannot split an empty interaction frame (0 rows)")
    for col in ("user_num", "item_num"):
        if col not in df.columns:
            raise DataError(
                f"cannot split: the frame has no {col} column (columns: {df.columns}); encode it with a "
                f"Vocabulary first"
            )
        s = df.get_column(col)
        if not s.dtype.is_integer():
            raise DataError(f"cannot split: {col} must be an integer column, got {s.dtype}")
        if s.null_count():
            raise DataError(
                f"cannot split: {col} has {s.null_count()} null(s) in {df.height} rows; encode with "
                f"missing='drop' or fix the vocabulary"
            )
        if s.min() < 0:
            raise DataError(
                f"cannot split: {col} has negative numbers (min {s.min()}); numbers must be 0..n-1"
            )


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"split.test_fraction must lie strictly between 0 and 1, got {test_fraction}")


def _no_timestamps_reason(df: pl.DataFrame) -> str | None:
    """Why ``df`` has no usable timestamps (None when it has some); DataError on a wrong dtype."""
    if "timestamp" not in df.columns:
        return "the frame has no timestamp column"
    ts = df.get_column("timestamp")
    if ts.dtype == pl.Null or ts.null_count() == ts.len():
        return f"the timestamp column is null in all {ts.len()} rows"
    if not isinstance(ts.dtype, pl.Datetime):
        raise DataError(
            f"cannot split: timestamp must be a Datetime column, got {ts.dtype}; read the log with the "
            f"library's readers, which convert epoch numbers using data.timestamp_unit"
        )
    return None


def _align_cutoff(cutoff: datetime, dtype: pl.DataType) -> datetime:
    """Make ``cutoff`` comparable with a Datetime column: naive for naive, aware for aware."""
    if not isinstance(cutoff, datetime):
        raise ConfigError(f"split.cutoff must be a datetime, got {type(cutoff).__name__}")
    tz = getattr(dtype, "time_zone", None)
    if tz is None:
        return cutoff.astimezone(UTC).replace(tzinfo=None) if cutoff.tzinfo is not None else cutoff
    if cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=ZoneInfo(tz))
    return cutoff.astimezone(ZoneInfo(tz))


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _hash64(x: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 finaliser of int64 ``x`` xor a seed-derived salt: uint64 ``[n]``, stable across versions.

    Works in place on a copy of ``x``; numpy's uint64 arithmetic wraps modulo 2**64 as intended.
    """
    z = x.astype(np.uint64)
    tmp = np.empty_like(z)
    z ^= np.uint64(_splitmix64_scalar(seed & _MASK64))
    z += np.uint64(0x9E3779B97F4A7C15)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        z ^= tmp
        z *= np.uint64(mult)
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def _splitmix64_scalar(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
