"""The bad-input corpus: every case writes its small input files into a directory and says what
the ``recsys-metric`` command must answer.

A case is either *refused* (exit 2 and exactly one line on stderr, ``recsys-metric CMD: error:
...``, holding every string of ``expect``: the file, the column or key, the row or line, what to
do) or *quarantined* (exit 0; the bad rows are in ``rejects.parquet`` with ``reason`` and
``row_number``). No case may print a traceback. README.md lists them; tests/test_bad_inputs.py
runs them.

Files are generated, not stored: each is a few lines, and a generator says exactly what is wrong
with it. ``{dir}`` in an argument is the case's directory, ``{store}`` a small published artifact
store shared by the query cases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

BASE_TS = 1_700_000_000


def good_rows(n_users: int = 20, n_items: int = 15, per_user: int = 6) -> list[tuple[int, int, int, float]]:
    """A small valid log: (user, item, epoch seconds, rating); every user rates ``per_user`` items,
    the users taking turns in time (a temporal split keeps every user and item in training)."""
    rows = []
    for u in range(n_users):
        for j in range(per_user):
            rows.append(
                (u, (u * 7 + j * 3) % n_items, BASE_TS + 3600 * (j * n_users + u), float(1 + (u + j) % 5))
            )
    return rows


def csv_text(rows, header=("user_id", "item_id", "timestamp", "rating"), sep=",") -> str:
    return sep.join(header) + "\n" + "".join(sep.join(str(v) for v in r) + "\n" for r in rows)


def frame(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "rating"], orient="row")


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@dataclass(frozen=True)
class Case:
    """One bad input and the answer it must get."""

    id: str
    """Short name (the test id and the README row)."""
    what: str
    """What is wrong, in a few words (README)."""
    make: Callable[[Path], None]
    """Writes the case's files into the given directory."""
    argv: tuple[str, ...]
    """Command line after ``recsys-metric``; ``{dir}`` and ``{store}`` are substituted."""
    expect: tuple[str, ...] = ()
    """Substrings of the one error line (refused), or of the rejects' reasons (quarantined)."""
    quarantine: dict[str, list[int]] = field(default_factory=dict)
    """Quarantined: reason -> the 0-based input row numbers rejected for it (exit 0)."""
    needs_store: bool = False
    subprocess: bool = False
    """Also run through a real ``python -m recsys_metric.cli`` process."""


def _nothing(d: Path) -> None:
    pass


def _file(name: str, content: Callable[[], str | bytes]) -> Callable[[Path], None]:
    return lambda d: write(d / name, content()) and None


def _parquet(name: str, df: Callable[[], pl.DataFrame]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        df().write_parquet(d / name)

    return make


def _truncated_parquet(d: Path) -> None:
    frame(good_rows()).write_parquet(d / "whole.parquet")
    data = (d / "whole.parquet").read_bytes()
    write(d / "log.parquet", data[: len(data) // 2])
    (d / "whole.parquet").unlink()


def _partitions(second: Callable[[], pl.DataFrame]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / "log").mkdir()
        frame(good_rows()[:60]).write_parquet(d / "log" / "part-0.parquet")
        second().write_parquet(d / "log" / "part-1.parquet")

    return make


def _with_bad(n_bad: int, bad: Callable[[int], tuple]) -> Callable[[], str]:
    """A valid CSV log of 120 rows in which rows 3, 3 + 7, ... (``n_bad`` of them) are replaced."""

    def content() -> str:
        rows = good_rows()
        for i in range(n_bad):
            rows[3 + 7 * i] = bad(3 + 7 * i)
        return csv_text(rows)

    return content


def _config(name: str, text: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        write(d / "log.csv", csv_text(good_rows()))
        write(d / name, text)

    return make


def _jsonl(lines: list[str], end: str = "\n") -> Callable[[], str]:
    return lambda: "\n".join(lines) + end


GOOD_JSON = [json.dumps({"user_id": u, "item_id": i, "timestamp": t}) for u, i, t, _ in good_rows()[:30]]
INSPECT = ("inspect-data", "{dir}/log.csv")
WITH_OUT = ("--out", "{dir}/out")
ONE_EPOCH = "train: {epochs: 1, lr: 0.05, batch_size: 256}\nindex: {recall_queries: 50}\n"

CASES: list[Case] = [
    # --- the log: where it is and what format ----------------------------------------------------
    Case(
        "missing-file",
        "the log path does not exist",
        _nothing,
        ("inspect-data", "{dir}/nope.parquet"),
        ("nope.parquet: path does not exist",),
        subprocess=True,
    ),
    Case(
        "run-missing-file",
        "`run` on a log that does not exist",
        _nothing,
        ("run", "--interactions", "{dir}/nope.csv", "--artifacts", "{dir}/art"),
        ("interaction log", "nope.csv does not exist", "nothing was written"),
    ),
    Case(
        "empty-csv",
        "a CSV file of zero bytes",
        _file("log.csv", lambda: ""),
        INSPECT,
        ("log.csv: file is empty; it needs a header line and rows",),
    ),
    Case(
        "header-only-csv",
        "a header and no rows",
        _file("log.csv", lambda: "user_id,item_id\n"),
        INSPECT,
        ("log.csv: the interaction log has no rows",),
    ),
    Case(
        "empty-directory",
        "a directory with no Parquet files",
        lambda d: (d / "log").mkdir(),
        ("inspect-data", "{dir}/log"),
        ("log: directory holds no *.parquet",),
    ),
    Case(
        "glob-matches-nothing",
        "a glob that matches no file",
        _nothing,
        ("inspect-data", "{dir}/logs/*.parquet"),
        ("the glob matches no files",),
    ),
    Case(
        "unknown-extension",
        "a file name that says no format",
        _file("log.txt", lambda: csv_text(good_rows())),
        ("inspect-data", "{dir}/log.txt"),
        ("log.txt: cannot tell the input format", "set data.format"),
    ),
    Case(
        "truncated-parquet",
        "the first half of a Parquet file (caught mid-copy)",
        _truncated_parquet,
        ("inspect-data", "{dir}/log.parquet"),
        ("log.parquet: not a readable Parquet file", "truncated"),
        subprocess=True,
    ),
    Case(
        "csv-named-parquet",
        "a CSV file named .parquet",
        _file("log.parquet", lambda: csv_text(good_rows())),
        ("inspect-data", "{dir}/log.parquet"),
        ("log.parquet: not a readable Parquet file",),
    ),
    Case(
        "binary-csv",
        "random bytes named .csv",
        _file("log.csv", lambda: bytes(range(256)) * 8),
        INSPECT,
        ("log.csv",),
    ),
    # --- columns ----------------------------------------------------------------------------------
    Case(
        "missing-user-column",
        "no user_id column (it is called customer)",
        _file(
            "log.csv", lambda: csv_text(good_rows(), header=("customer", "item_id", "timestamp", "rating"))
        ),
        INSPECT,
        (
            "log.csv: required column user_id",
            "columns present: ['customer', 'item_id', 'timestamp', 'rating']",
            "set data.columns.user_id",
        ),
    ),
    Case(
        "missing-item-column-parquet",
        "a Parquet log without item_id",
        _parquet("log.parquet", lambda: frame(good_rows()).rename({"item_id": "product"})),
        ("inspect-data", "{dir}/log.parquet"),
        ("log.parquet: required column item_id", "set data.columns.item_id"),
    ),
    Case(
        "semicolon-csv",
        "a ;-separated file read as CSV",
        _file("log.csv", lambda: csv_text(good_rows(), sep=";")),
        INSPECT,
        ("log.csv: required column user_id", "set data.csv_separator to ';'"),
    ),
    Case(
        "tab-csv",
        "a tab-separated file named .csv",
        _file("log.csv", lambda: csv_text(good_rows(), sep="\t")),
        INSPECT,
        ("set data.csv_separator to '\\t'",),
    ),
    Case(
        "ragged-csv-line",
        "a line with more fields than the header",
        _file("log.csv", lambda: csv_text(good_rows()) + "1,2,3,4,5\n"),
        INSPECT,
        ("log.csv: reading the interaction log failed", "more fields than the header"),
    ),
    Case(
        "list-ids",
        "ids that are lists (Parquet)",
        _parquet("log.parquet", lambda: pl.DataFrame({"user_id": [[1], [2]], "item_id": [1, 2]})),
        ("inspect-data", "{dir}/log.parquet"),
        ("column user_id has dtype List", "ids must be integers or strings"),
    ),
    Case(
        "boolean-timestamps",
        "a timestamp column of booleans (Parquet)",
        _parquet("log.parquet", lambda: frame(good_rows()).with_columns(timestamp=pl.lit(True))),
        ("inspect-data", "{dir}/log.parquet"),
        ("column timestamp has dtype Boolean",),
    ),
    Case(
        "partition-dtypes",
        "partitions with string and integer user ids",
        _partitions(lambda: frame(good_rows()[60:]).with_columns(pl.col("user_id").cast(pl.String))),
        ("inspect-data", "{dir}/log"),
        ("part-1.parquet: column 'user_id' has dtype String but Int64 in",),
    ),
    Case(
        "partition-columns",
        "one partition lacks the rating column",
        _partitions(lambda: frame(good_rows()[60:]).drop("rating")),
        ("inspect-data", "{dir}/log"),
        ("part-1.parquet: column 'rating' (rating) is missing but",),
    ),
    # --- JSON lines --------------------------------------------------------------------------------
    Case(
        "jsonl-broken-line",
        "a JSON line missing its closing brace",
        _file("log.jsonl", _jsonl(GOOD_JSON[:3] + ['{"user_id": 9, "item_id": 3'] + GOOD_JSON[3:])),
        ("inspect-data", "{dir}/log.jsonl"),
        ("log.jsonl: line 4 is not valid JSON", "fix or remove that line"),
    ),
    Case(
        "jsonl-array-line",
        "a JSON line that is an array",
        _file("log.jsonl", _jsonl(GOOD_JSON[:5] + ["[1, 2]"] + GOOD_JSON[5:])),
        ("inspect-data", "{dir}/log.jsonl"),
        ("log.jsonl: line 6 is a JSON list, not an object",),
    ),
    Case(
        "jsonl-half-written",
        "the last JSON line cut off (no newline yet)",
        _file("log.jsonl", _jsonl(GOOD_JSON + ['{"user_id": 3, "it'], end="")),
        ("inspect-data", "{dir}/log.jsonl"),
        ("line 31 is not valid JSON", "may still be being written"),
    ),
    Case(
        "jsonl-missing-column",
        "JSON lines without item_id",
        _file("log.jsonl", _jsonl([json.dumps({"user_id": 1, "sku": 2})] * 3)),
        ("inspect-data", "{dir}/log.jsonl"),
        ("log.jsonl: required column item_id", "columns present: ['user_id', 'sku']"),
    ),
    # --- rows: too many bad ones fail, a few are quarantined ---------------------------------------
    Case(
        "null-users-over-limit",
        "5 of 120 rows without a user (limit 1%)",
        _file("log.csv", _with_bad(5, lambda i: ("", 1, BASE_TS + i, 4.0))),
        INSPECT,
        (
            "log.csv: 5 of 120 rows rejected (4.17%)",
            "'null or empty user_id': 5",
            "rerun with --out DIR to keep the rejected rows",
            "check data.columns",
        ),
    ),
    Case(
        "null-items-over-limit",
        "3 of 120 rows without an item, prepared with --out",
        _file("log.csv", _with_bad(3, lambda i: (1, "", BASE_TS + i, 4.0))),
        ("prepare", "--interactions", "{dir}/log.csv", "--out", "{dir}/p"),
        ("log.csv: 3 of 120 rows rejected (2.50%)", "rejected rows are in", "/p/rejects.parquet"),
    ),
    Case(
        "ms-timestamps-as-seconds",
        "epoch milliseconds read as seconds",
        _file("log.csv", lambda: csv_text([(u, i, t * 1000, r) for u, i, t, r in good_rows()])),
        INSPECT,
        ("120 of 120 rows rejected", "'timestamp outside 1900..2199': 120", "check data.timestamp_unit"),
    ),
    Case(
        "ratings-outside-scale",
        "ratings on a 0-10 scale",
        _file("log.csv", _with_bad(6, lambda i: (i % 20, 3, BASE_TS + i, 9.0))),
        INSPECT,
        ("'rating outside [1.0, 5.0]': 6", "check data.rating_scale"),
    ),
    Case(
        "unparsable-ratings",
        "ratings written as words",
        _file("log.csv", _with_bad(4, lambda i: (i % 20, 3, BASE_TS + i, "five"))),
        INSPECT,
        ("'unparsable rating': 4",),
    ),
    Case(
        "movielens-dat-garbage",
        "a ratings.dat that is a CSV",
        _file("ratings.dat", lambda: csv_text(good_rows())),
        ("inspect-data", "{dir}/ratings.dat"),
        ("ratings.dat: 121 of 121 rows rejected",),
    ),
    Case(
        "one-user",
        "every row from one user",
        _file("log.csv", lambda: csv_text([(1, i, BASE_TS + i, 4.0) for i in range(10)])),
        INSPECT,
        ("1 distinct user(s) and 10 distinct item(s)", "at least 2 users and 2 items"),
    ),
    Case(
        "one-item",
        "every row about one item",
        _file("log.csv", lambda: csv_text([(u, 1, BASE_TS + u, 4.0) for u in range(10)])),
        INSPECT,
        ("10 distinct user(s) and 1 distinct item(s)",),
    ),
    Case(
        "far-future-timestamp",
        "one timestamp of 9.9e12 seconds (quarantined: outside range)",
        _file("log.csv", _with_bad(1, lambda i: (1, 2, 9_900_000_000_000, 4.0))),
        INSPECT + WITH_OUT,
        quarantine={"timestamp outside 1900..2199": [3]},
    ),
    Case(
        "one-bad-rating",
        "one rating 'n/a' of 120 (quarantined)",
        _file("log.csv", _with_bad(1, lambda i: (1, 2, BASE_TS, "n/a"))),
        INSPECT + WITH_OUT,
        quarantine={"unparsable rating": [3]},
    ),
    Case(
        "fractional-id",
        "one user id 1.5 in a float column (quarantined)",
        _parquet(
            "log.parquet",
            lambda: frame(good_rows()).with_columns(
                pl.when(pl.int_range(pl.len()) == 10).then(1.5).otherwise(pl.col("user_id")).alias("user_id")
            ),
        ),
        ("inspect-data", "{dir}/log.parquet", *WITH_OUT),
        quarantine={"unparsable user_id": [10]},
    ),
    Case(
        "one-unparsable-timestamp",
        "one timestamp 'yesterday' (quarantined)",
        _file("log.csv", _with_bad(1, lambda i: (1, 2, "yesterday", 4.0))),
        INSPECT + WITH_OUT,
        quarantine={"unparsable timestamp": [3]},
    ),
    # --- the config ---------------------------------------------------------------------------------
    Case(
        "malformed-yaml",
        "an unclosed [ in the YAML config",
        _config("c.yaml", "train:\n  epochs: [1\neval: 3\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("c.yaml is not valid YAML: line 3, column 5",),
        subprocess=True,
    ),
    Case(
        "malformed-toml",
        "a TOML config missing a value",
        _config("c.toml", "[train]\nepochs =\n"),
        (*INSPECT, "--config", "{dir}/c.toml"),
        ("c.toml is not valid TOML",),
    ),
    Case(
        "config-not-a-mapping",
        "a YAML config that is a list",
        _config("c.yaml", "- 1\n- 2\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("top level must be a mapping of sections, got list",),
    ),
    Case(
        "config-missing",
        "a config path that does not exist",
        _config("unused.yaml", ""),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("config file", "c.yaml does not exist"),
    ),
    Case(
        "config-extension",
        "a JSON config",
        _config("c.json", "{}"),
        (*INSPECT, "--config", "{dir}/c.json"),
        ("use a .yaml, .yml or .toml file",),
    ),
    Case(
        "unknown-key",
        "a misspelt key",
        _config("c.yaml", "train:\n  epochz: 1\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("train.epochz: unknown key",),
    ),
    Case(
        "wrong-type",
        "epochs: many",
        _config("c.yaml", "train: {epochs: many}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("train.epochs: Input should be a valid integer",),
    ),
    Case(
        "bad-format-name",
        "data.format: excel",
        _config("c.yaml", "data: {format: excel}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("data.format: Input should be 'auto', 'parquet'",),
    ),
    Case(
        "eval-ks-zero",
        "eval.ks: [0] (used to fail after training)",
        _config("c.yaml", "eval: {ks: [0]}\n"),
        ("run", "--interactions", "{dir}/log.csv", "--artifacts", "{dir}/art", "--config", "{dir}/c.yaml"),
        ("eval: ks [0]: cut-offs must be at least 1",),
    ),
    Case(
        "gate-k-not-evaluated",
        "publish.gate_k 20 with eval.ks [10]",
        _config("c.yaml", "eval: {ks: [10]}\npublish: {gate_k: 20}\n"),
        ("run", "--interactions", "{dir}/log.csv", "--artifacts", "{dir}/art", "--config", "{dir}/c.yaml"),
        ("publish.gate_k 20 is not one of eval.ks [10]",),
    ),
    Case(
        "gate-k-huge",
        "publish.gate_k: 100000",
        _config("c.yaml", "publish: {gate_k: 100000}\n"),
        ("run", "--interactions", "{dir}/log.csv", "--artifacts", "{dir}/art", "--config", "{dir}/c.yaml"),
        ("publish.gate_k 100000 is not one of eval.ks [10, 20, 50]",),
    ),
    Case(
        "thresholds-crossed",
        "dislike_threshold above like_threshold",
        _config("c.yaml", "label: {like_threshold: 2, dislike_threshold: 4}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("dislike_threshold 4.0 must be below like_threshold 2.0",),
    ),
    Case(
        "rating-scale-reversed",
        "rating_scale [5, 1]",
        _config("c.yaml", "data: {rating_scale: [5, 1]}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("rating_scale low 5.0 is above high 1.0",),
    ),
    Case(
        "one-column-two-fields",
        "data.columns maps user_id and item_id to one column",
        _config("c.yaml", "data: {columns: {user_id: id, item_id: id}}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("data.columns: user_id and item_id are both mapped to the source column 'id'",),
    ),
    Case(
        "numba-with-adam",
        "train.kernel numba with the adam optimiser",
        _config("c.yaml", "train: {kernel: numba, optimizer: adam}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("train.kernel numba cannot run: train.optimizer adam",),
    ),
    Case(
        "cutoff-without-temporal",
        "split.cutoff with a per-user holdout",
        _config("c.yaml", "split: {method: user_holdout, cutoff: 2024-01-01}\n"),
        (*INSPECT, "--config", "{dir}/c.yaml"),
        ("split.cutoff is set but split.method is 'user_holdout'",),
    ),
    Case(
        "item-features-without-table",
        "model.item_features but no --items table",
        _config("c.yaml", ONE_EPOCH + "model: {item_features: [genre]}\n"),
        ("run", "--interactions", "{dir}/log.csv", "--artifacts", "{dir}/art", "--config", "{dir}/c.yaml"),
        ("model.item_features ['genre'] needs an item table: pass items=PATH",),
    ),
    # --- the query commands ---------------------------------------------------------------------------
    Case(
        "recommend-k-zero",
        "recommend -k 0",
        _nothing,
        ("recommend", "1", "-k", "0", "--artifacts", "{store}"),
        ("-k must be a positive number of results, got 0",),
        needs_store=True,
        subprocess=True,
    ),
    Case(
        "recommend-k-negative",
        "recommend -k -1",
        _nothing,
        ("recommend", "1", "-k", "-1", "--artifacts", "{store}"),
        ("-k must be a positive number of results, got -1",),
        needs_store=True,
    ),
    Case(
        "similar-k-zero",
        "similar -k 0",
        _nothing,
        ("similar", "1", "-k", "0", "--artifacts", "{store}"),
        ("-k must be a positive number of results, got 0",),
        needs_store=True,
    ),
    Case(
        "batch-k-zero",
        "batch -k 0",
        _nothing,
        ("batch", "--out", "{dir}/recs", "-k", "0", "--artifacts", "{store}"),
        ("-k must be a positive number of items per user, got 0",),
        needs_store=True,
    ),
    Case(
        "serve-k-zero",
        "serve -k 0 (before any server is asked)",
        _nothing,
        ("serve", "-k", "0", "--artifacts", "{dir}/art"),
        ("-k must be a positive number of items per user, got 0",),
    ),
    Case(
        "serve-bad-cron",
        "serve --retrain-cron 'every night'",
        _nothing,
        ("serve", "--artifacts", "{dir}/art", "--retrain-cron", "every night"),
        ("--retrain-cron 'every night' is not a valid cron",),
    ),
    Case(
        "unknown-user",
        "recommend a user the run never saw",
        _nothing,
        ("recommend", "999999", "--artifacts", "{store}"),
        ("999999",),
        needs_store=True,
    ),
    Case(
        "unknown-item",
        "similar to an item the run never saw",
        _nothing,
        ("similar", "999999", "--artifacts", "{store}"),
        ("999999",),
        needs_store=True,
    ),
    Case(
        "no-store",
        "recommend from a directory that holds no run",
        lambda d: (d / "empty").mkdir(),
        ("recommend", "1", "--artifacts", "{dir}/empty"),
        ("empty",),
    ),
    Case(
        "batch-users-missing",
        "batch --users naming a file that does not exist",
        _nothing,
        ("batch", "--out", "{dir}/recs", "--users", "{dir}/users.txt", "--artifacts", "{store}"),
        ("users.txt: no such file or directory",),
        needs_store=True,
    ),
]
