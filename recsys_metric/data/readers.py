"""Lazy readers for interaction logs: Parquet (file, partitioned directory, glob), CSV, JSON lines
and the MovieLens rating files.

:func:`scan_interactions` returns a ``polars.LazyFrame`` with canonical column names only
(``user_id``, ``item_id`` and whichever of ``timestamp``, ``rating``, ``event``, ``weight`` the
source has), so a 25M-row log streams instead of being loaded by the reader. Values are not parsed
here: typed sources (Parquet, JSON lines) keep their stored types, text sources (CSV and the
MovieLens files) give every column as ``String`` so that a bad value reaches validation as a row to
quarantine instead of failing the scan. :func:`recsys_metric.data.validate.validate_interactions`
parses, quarantines and types the columns.

Problems the user can fix (missing path, no matching files, a truncated Parquet file, a missing
column) raise :class:`~recsys_metric.errors.DataError` naming the path and what to do.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from recsys_metric.config import DataConfig
from recsys_metric.errors import DataError, is_transient

CANONICAL_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "rating", "event", "weight")
"""Canonical interaction columns, in output order."""
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id")
"""Columns every interaction log must have."""
TEXT_FORMATS: frozenset[str] = frozenset({"csv", "movielens-dat", "movielens-udata", "movielens-csv"})
"""Formats whose columns come back as ``String`` (no stored types)."""

_MOVIELENS_COLUMNS: dict[str, dict[str, str]] = {
    "movielens-dat": {
        "user_id": "UserID",
        "item_id": "MovieID",
        "rating": "Rating",
        "timestamp": "Timestamp",
    },
    "movielens-udata": {
        "user_id": "user id",
        "item_id": "item id",
        "rating": "rating",
        "timestamp": "timestamp",
    },
    "movielens-csv": {
        "user_id": "userId",
        "item_id": "movieId",
        "rating": "rating",
        "timestamp": "timestamp",
    },
}
_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq", ".parq"),
    "csv": (".csv",),
    "jsonl": (".jsonl", ".ndjson"),
    "movielens-dat": (".dat",),
    "movielens-udata": (".data",),
    "movielens-csv": (".csv",),
}
_GLOB_CHARS = frozenset("*?[")
_DEFAULTS = DataConfig()


def _is_glob(source: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in source) and not os.path.exists(source)


def _format_from_name(name: str, path: Path | None) -> str | None:
    """Format implied by a file name (``path`` given: the file exists and may be peeked at)."""
    lower = name.lower()
    if lower == "ratings.dat":
        return "movielens-dat"
    if lower == "u.data":
        return "movielens-udata"
    if lower.endswith(_EXTENSIONS["parquet"]):
        return "parquet"
    if lower.endswith(_EXTENSIONS["jsonl"]):
        return "jsonl"
    if lower.endswith(".csv"):
        if lower == "ratings.csv" and path is not None:
            with open(path, "rb") as fh:
                header = fh.readline().lstrip(b"\xef\xbb\xbf").strip()
            if header.startswith(b"userId,movieId"):
                return "movielens-csv"
        return "csv"
    if path is not None and path.is_file():
        with open(path, "rb") as fh:
            if fh.read(4) == b"PAR1":
                return "parquet"
    return None


def detect_format(path: str | Path) -> str:
    """Input format of ``path`` as ``format: auto`` decides it (see ``DataConfig.format``).

    A directory is Parquet partitions; a glob is decided by the extension of its pattern (or of
    the files it matches when the pattern has none); a file by its name: ``ratings.dat`` ->
    ``movielens-dat``, ``u.data`` -> ``movielens-udata``, ``ratings.csv`` whose header starts
    ``userId,movieId`` -> ``movielens-csv``, ``*.csv`` -> ``csv``, ``*.jsonl``/``*.ndjson`` ->
    ``jsonl``, ``*.parquet``/``*.pq`` (or any file starting with the Parquet magic) -> ``parquet``.

    Raises DataError when the path does not exist or the format cannot be told from the name.
    """
    text = os.path.expanduser(str(path))
    if _is_glob(text):
        fmt = _format_from_name(os.path.basename(text), None)
        if fmt is None:
            matched = [Path(p) for p in _expand_glob(text)]
            found = {_format_from_name(p.name, p) for p in matched}
            if len(found) == 1 and None not in found:
                fmt = found.pop()
        if fmt is None:
            raise DataError(
                f"{text}: cannot tell the input format from this glob; end the pattern with an extension "
                "(*.parquet, *.csv, *.jsonl) or set data.format"
            )
        return fmt
    p = Path(text)
    if not p.exists():
        raise DataError(f"{p}: path does not exist; check the interaction log location")
    if p.is_dir():
        return "parquet"
    fmt = _format_from_name(p.name, p)
    if fmt is None:
        raise DataError(
            f"{p}: cannot tell the input format from the file name; rename it (*.parquet, *.csv, *.jsonl, "
            "ratings.dat, u.data) or set data.format to one of parquet, csv, jsonl, movielens-dat, "
            "movielens-udata, movielens-csv"
        )
    return fmt


def resolve_format(source: str | Path, config: DataConfig = _DEFAULTS) -> str:
    """``config.format``, or :func:`detect_format` of ``source`` when it is ``auto``."""
    return detect_format(source) if config.format == "auto" else config.format


def _expand_glob(pattern: str) -> list[str]:
    return sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))


def _list_files(source: str, fmt: str) -> tuple[list[str], bool]:
    """Files to read for ``source`` and whether it is a directory (hive partitions possible)."""
    if _is_glob(source):
        files = _expand_glob(source)
        if not files:
            raise DataError(f"{source}: the glob matches no files; check the pattern and the directory")
        return files, False
    p = Path(source)
    if not p.exists():
        raise DataError(f"{p}: path does not exist; check the interaction log location")
    if p.is_file():
        return [str(p)], False
    exts = _EXTENSIONS[fmt]
    files = sorted(
        str(f)
        for f in p.rglob("*")
        if f.is_file()
        and f.name.lower().endswith(exts)
        and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
    )
    if not files:
        pattern = " or ".join(f"*{e}" for e in exts)
        raise DataError(
            f"{p}: directory holds no {pattern} files (searched recursively; names starting with '.' or '_' "
            f"are skipped); check the path, or give a glob such as '{p}/**/*.parquet' and set data.format"
        )
    return files, True


def _column_map(fmt: str, config: DataConfig) -> dict[str, str]:
    if fmt in _MOVIELENS_COLUMNS:
        return _MOVIELENS_COLUMNS[fmt]
    return config.columns.model_dump()


_SEPARATOR_NAMES = {";": "';'", "\t": "'\\t' (tab)", "|": "'|'", ",": "','"}


def _other_separator(source_name: str, present: Sequence[str], separator: str) -> str | None:
    """The separator a CSV header was really written with, when reading it with ``separator`` left
    the wanted column inside one bigger name (``'user_id;item_id;rating'``); None otherwise."""
    for candidate in _SEPARATOR_NAMES:
        if candidate == separator:
            continue
        if any(source_name in name.split(candidate) for name in present if candidate in name):
            return candidate
    return None


def _missing_column_error(
    file: str, canonical: str, source_name: str, present: Sequence[str], fmt: str, separator: str = ","
) -> DataError:
    other = _other_separator(source_name, present, separator) if fmt == "csv" else None
    if other is not None:
        hint = (
            f"the header looks {_SEPARATOR_NAMES[other]}-separated, not {_SEPARATOR_NAMES[separator]}: "
            f"set data.csv_separator to {_SEPARATOR_NAMES[other].split(' ')[0]}"
        )
    elif fmt in _MOVIELENS_COLUMNS:
        hint = f"this does not look like a MovieLens {fmt} file; set data.format to the file's real format"
    else:
        hint = f"set data.columns.{canonical} to the column that holds it"
    return DataError(
        f"{file}: required column {canonical} (source column {source_name!r}) is missing; "
        f"columns present: {list(present)}; {hint}"
    )


def _hive_keys(file: str, root: str) -> list[str]:
    rel = Path(file).relative_to(root).parts[:-1]
    return [part.split("=", 1)[0] for part in rel if "=" in part]


def _starts_like_parquet(file: str) -> bool:
    try:
        with open(file, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def _parquet_schema(file: str, source: str) -> dict[str, pl.DataType]:
    """The file's schema from its footer; a truncated or non-Parquet file is a DataError naming it.

    The error is transient (:func:`recsys_metric.errors.is_transient`) when the file starts with
    Parquet's magic bytes (a writer puts them first and the footer last: a file caught mid-copy
    looks like this) or the read failed with an I/O error; a file in another format is not.
    """
    try:
        return dict(pl.read_parquet_schema(file))
    except (pl.exceptions.PolarsError, OSError) as err:
        todo = "re-export it" if file == source else f"re-export it, or remove it from {source}"
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            transient = is_transient(err)
        else:
            transient = _starts_like_parquet(file)
        detail = " ".join(str(err).split())
        raise DataError(
            f"{file}: not a readable Parquet file ({detail}); it is truncated, still being written or in another "
            f"format: {todo}",
            transient=transient,
        ) from None


def _unify(column: str, dtypes: dict[str, pl.DataType]) -> pl.DataType:
    """One dtype for a column whose partitions disagree; a DataError when no lossless one exists."""
    kinds = list(dict.fromkeys(dtypes.values()))
    if len(kinds) == 1:
        return kinds[0]
    if all(d.is_integer() for d in kinds):
        return pl.Int64()
    if all(d.is_numeric() for d in kinds):
        return pl.Float64()
    if all(isinstance(d, pl.String | pl.Categorical | pl.Enum) for d in kinds):
        return pl.String()
    if all(isinstance(d, pl.Datetime) for d in kinds):
        zones = {d.time_zone for d in kinds}
        return pl.Datetime("ms", "UTC" if len(zones) > 1 else zones.pop())
    files = iter(dtypes)
    f1 = next(files)
    f2 = next(f for f in files if dtypes[f] != dtypes[f1])
    raise DataError(
        f"{f2}: column {column!r} has dtype {dtypes[f2]} but {dtypes[f1]} in {f1}; partitions of one log "
        "must share compatible types: rewrite them with one type"
    )


def _scan_parquet(
    source: str, files: list[str], is_dir: bool, mapping: dict[str, str], fmt: str
) -> pl.LazyFrame:
    schemas = {f: _parquet_schema(f, source) for f in files}
    hive = {f: _hive_keys(f, source) for f in files} if is_dir else {f: [] for f in files}
    present_by_file = {f: list(schemas[f]) + hive[f] for f in files}
    for f in files:
        for canonical in REQUIRED_COLUMNS:
            if mapping[canonical] not in present_by_file[f]:
                raise _missing_column_error(f, canonical, mapping[canonical], present_by_file[f], fmt)
    first = files[0]
    selected = {c: s for c, s in mapping.items() if s in present_by_file[first]}
    for f in files[1:]:
        for canonical, src in mapping.items():
            if (src in present_by_file[f]) != (canonical in selected):
                has, lacks = (f, first) if canonical not in selected else (first, f)
                raise DataError(
                    f"{lacks}: column {src!r} ({canonical}) is missing but {has} has it; partitions of one log "
                    "must have the same columns: rewrite them, or read them separately"
                )
    file_columns = [s for s in dict.fromkeys(selected.values()) if s in schemas[first]]
    schema = {s: _unify(s, {f: schemas[f][s] for f in files}) for s in file_columns}
    cast = pl.ScanCastOptions(
        integer_cast=["upcast", "allow-float"],
        float_cast="upcast",
        datetime_cast=["downcast", "convert-timezone"],
        categorical_to_string="allow",
    )
    lf = pl.scan_parquet(
        files,
        schema=schema,
        hive_partitioning=is_dir and any(hive.values()),
        extra_columns="ignore",
        cast_options=cast,
    )
    return lf.select([pl.col(src).alias(c) for c, src in selected.items()])


def _csv_header(file: str, separator: str) -> list[str]:
    try:
        return pl.scan_csv(file, separator=separator, infer_schema=False).collect_schema().names()
    except pl.exceptions.NoDataError:
        raise DataError(f"{file}: file is empty; it needs a header line and rows") from None
    except pl.exceptions.PolarsError as err:
        raise DataError(f"{file}: cannot read the CSV header ({err}); check data.csv_separator") from None


def _scan_text(files: list[str], fmt: str, mapping: dict[str, str], config: DataConfig) -> pl.LazyFrame:
    if fmt == "movielens-dat":
        # polars takes single-byte separators only: read whole lines and split on "::"; splitn keeps
        # any surplus fields in the last part so that a malformed line fails to parse, not shifts.
        lf = pl.scan_csv(
            files,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            infer_schema=False,
            new_columns=["line"],
        )
        names = ["UserID", "MovieID", "Rating", "Timestamp"]
        parts = pl.col("line").str.splitn("::", 4).struct.rename_fields(names)
        lf = lf.select(parts).unnest("line")
        present = names
    elif fmt == "movielens-udata":
        names = list(mapping.values())
        lf = pl.scan_csv(
            files,
            has_header=False,
            separator="\t",
            quote_char=None,
            infer_schema=False,
            new_columns=names,
            truncate_ragged_lines=False,
        )
        present = names
    else:
        separator = "," if fmt == "movielens-csv" else config.csv_separator
        headers = [_csv_header(f, separator) for f in files]
        for f, cols in zip(files, headers, strict=True):
            for canonical in REQUIRED_COLUMNS:
                if mapping[canonical] not in cols:
                    raise _missing_column_error(f, canonical, mapping[canonical], cols, fmt, separator)
        present = headers[0]
        # a line with more fields than the header fails the read instead of being cut silently
        lf = pl.scan_csv(files, separator=separator, infer_schema=False, truncate_ragged_lines=False)
    selected = {c: s for c, s in mapping.items() if s in present}
    return lf.select([pl.col(src).alias(c) for c, src in selected.items()])


def _scan_jsonl(source: str, files: list[str], mapping: dict[str, str]) -> pl.LazyFrame:
    # The whole file is used for type inference: a column mixing numbers and strings becomes String
    # instead of failing half way through the read.
    lf = pl.scan_ndjson(files, infer_schema_length=None)
    try:
        cols = lf.collect_schema().names()
    except pl.exceptions.PolarsError as err:
        raise json_lines_error(source, files, err) from None
    for canonical in REQUIRED_COLUMNS:
        if mapping[canonical] not in cols:
            where = files[0] if len(files) == 1 else source
            raise _missing_column_error(where, canonical, mapping[canonical], cols, "jsonl")
    selected = {c: s for c, s in mapping.items() if s in cols}
    return lf.select([pl.col(src).alias(c) for c, src in selected.items()])


def _first_bad_json_line(file: str) -> tuple[int, str, bool] | None:
    """(1-based line number, why, whether it is the unterminated last line) of the first line of
    ``file`` that is not a JSON object; None when every line is one. Blank lines are skipped, as
    polars skips them."""
    with open(file, "rb") as fh:
        number = 0
        for number, raw in enumerate(fh, start=1):  # noqa: B007 - number is used after the loop
            line = raw.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                why = f"not valid JSON ({getattr(err, 'msg', err)}, column {getattr(err, 'colno', '?')})"
                return number, why, not raw.endswith(b"\n")
            if not isinstance(value, dict):
                return number, f"a JSON {type(value).__name__}, not an object", not raw.endswith(b"\n")
    return None


def json_lines_error(source: str, files: Sequence[str], err: Exception) -> DataError:
    """A DataError for a JSON-lines log polars could not read, naming the file and the first bad
    line; transient when that line is the file's last and has no newline yet (a file still being
    written)."""
    for file in files:
        try:
            bad = _first_bad_json_line(file)
        except OSError as io_err:
            return DataError(f"{file}: cannot read ({io_err})", transient=is_transient(io_err))
        if bad is not None:
            number, why, unterminated = bad
            tail = (
                "; it is the last line and has no newline: the file may still be being written"
                if unterminated
                else ": fix or remove that line"
            )
            return DataError(f"{file}: line {number} is {why}{tail}", transient=unterminated)
    detail = " ".join(str(err).split())
    return DataError(f"{source}: cannot read as JSON lines ({detail}); check the file or set data.format")


def source_files(source: str | Path, config: DataConfig = _DEFAULTS) -> list[str]:
    """The files :func:`scan_interactions` reads for ``source`` (sorted; one for a single file).

    Raises DataError as :func:`scan_interactions` does for a missing path or an empty directory.
    """
    text = os.path.expanduser(str(source))
    return _list_files(text, resolve_format(text, config))[0]


def scan_interactions(source: str | Path, config: DataConfig = _DEFAULTS) -> pl.LazyFrame:
    """Lazily read an interaction log into canonical columns.

    ``source`` is a file, a directory of Parquet partitions (searched recursively; hive
    ``key=value`` directories become columns; names starting with ``.`` or ``_`` are skipped) or a
    glob (``logs/**/*.parquet``). ``config.format`` picks the reader (``auto``: see
    :func:`detect_format`) and ``config.columns`` maps source names to canonical ones (MovieLens
    formats have fixed columns).

    Returns a LazyFrame with columns ``user_id``, ``item_id`` and whichever of ``timestamp``,
    ``rating``, ``event``, ``weight`` exist, in that order; other source columns are dropped.
    Parquet and JSON lines keep their types (int ids Int64-compatible, string ids String; a JSON
    column mixing numbers and strings is String); text formats give String columns. Nothing is
    parsed or checked per row here.

    Raises DataError when the path does not exist, a directory or glob has no matching files, a
    Parquet file is unreadable (checked at scan time from each file's footer), or a required column
    is missing (the message names the file, the canonical and source column, and the columns present).
    """
    text = os.path.expanduser(str(source))
    fmt = resolve_format(text, config)
    files, is_dir = _list_files(text, fmt)
    mapping = _column_map(fmt, config)
    if fmt == "parquet":
        lf = _scan_parquet(text, files, is_dir, mapping, fmt)
    elif fmt == "jsonl":
        lf = _scan_jsonl(text, files, mapping)
    else:
        lf = _scan_text(files, fmt, mapping, config)
    order = [c for c in CANONICAL_COLUMNS if c in lf.collect_schema().names()]
    return lf.select(order)
