"""Databases at both ends, against a real PostgreSQL 16 server (the session's ``postgres`` fixture)
and real DuckDB files: URIs and credentials, reads into validation and quarantine, fingerprints,
the table sink's atomic swap, the CLI's errors and a whole CLI run from a database log to a
database table."""

import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pyarrow as pa
import pytest

from recsys_metric.cli import main
from recsys_metric.config import DataConfig, config_from_dict
from recsys_metric.data.validate import read_interactions
from recsys_metric.db import DatabaseError, DatabaseUnreachable, database_fingerprint
from recsys_metric.db.sink import check_postgres, load_parquet_table, write_postgres_table
from recsys_metric.db.source import quote_identifier, read_database
from recsys_metric.db.uri import DatabaseURI, postgres_connect_uri, redact, scrub
from recsys_metric.errors import ConfigError, DataError, is_transient
from recsys_metric.registry import ArtifactStore, input_fingerprint

pgdb = pytest.importorskip("adbc_driver_postgresql.dbapi")
duckdb = pytest.importorskip("duckdb")

SECRET = "Tr0ub4dor&3-not-in-any-file"
READER = "recsys_reader"


# ---------------------------------------------------------------- helpers


def _put(uri: str, name: str, frame: pl.DataFrame) -> None:
    """Create table ``name`` (replacing it) holding ``frame``, through ADBC's bulk ingest."""
    with pgdb.connect(uri) as conn, conn.cursor() as cur:
        cur.adbc_ingest(name, frame.to_arrow(compat_level=pl.CompatLevel.oldest()), mode="replace")
        conn.commit()


def _sql(uri: str, sql: str) -> list[tuple]:
    with pgdb.connect(uri, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall() if cur.description else []


def _duck(path: Path, name: str, frame: pl.DataFrame) -> str:
    with duckdb.connect(str(path)) as conn:
        arrow = frame.to_arrow(compat_level=pl.CompatLevel.oldest())  # noqa: F841 - read by name below
        conn.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM arrow")
    return f"duckdb://{path}"


def _as_user(uri: str, user: str) -> str:
    """The pgserver URI (``postgresql://postgres:@/postgres?host=DIR``) for another user."""
    parts = urlsplit(uri)
    return f"postgresql://{user}@/postgres?{parts.query}"


@pytest.fixture(scope="module")
def pg(postgres):
    """The session server's URI, plus a login role that needs the password ``SECRET``."""
    server, uri = postgres
    server.psql(
        f"DROP ROLE IF EXISTS {READER}; CREATE ROLE {READER} LOGIN PASSWORD '{SECRET}'; "
        f"GRANT ALL ON SCHEMA public TO {READER};"
    )
    hba = Path(server.pgdata) / "pg_hba.conf"
    text = hba.read_text()
    rule = f"local all {READER} scram-sha-256\n"
    if rule not in text:
        hba.write_text(rule + text)  # the first matching line wins: this role must give a password
    server.psql("SELECT pg_reload_conf();")
    return uri


def _log(id_type: str = "int", n_users: int = 40, n_items: int = 25, per_user: int = 12) -> pl.DataFrame:
    rows = [
        (u, (u * 7 + j * 3) % n_items, 1_700_000_000 + u * 1000 + j, float(1 + (u + j) % 5))
        for u in range(n_users)
        for j in range(per_user)
    ]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "rating"], orient="row")
    if id_type == "str":
        frame = frame.with_columns(
            ("u" + pl.col("user_id").cast(pl.String)).alias("user_id"),
            ("item-" + pl.col("item_id").cast(pl.String)).alias("item_id"),
        )
    return frame


BAD_ROWS = pl.DataFrame(
    {
        "user_id": ["u1", None, "u2", "  ", "u3", "u4"],
        "item_id": ["a", "b", None, "c", "d", "e"],
        "timestamp": [1_700_000_000, 1_700_000_001, 1_700_000_002, 1_700_000_003, None, 1_700_000_005],
        "rating": [4.0, 3.0, 5.0, 1.0, 7.5, float("nan")],
    }
)


# ---------------------------------------------------------------- URIs, config, names


def test_uris_are_parsed_and_passwords_are_refused_and_redacted():
    pg = DatabaseURI.parse("postgresql://app@db.internal:5432/events")
    assert (pg.kind, pg.uri, pg.path) == ("postgresql", "postgresql://app@db.internal:5432/events", None)
    assert DatabaseURI.parse("postgres://app@h/db").kind == "postgresql"
    assert DatabaseURI.parse("duckdb:///data/log.duckdb").path == "/data/log.duckdb"
    assert DatabaseURI.parse("duckdb://rel/log.duckdb").path == "rel/log.duckdb"
    # pgserver's empty password is no password
    assert DatabaseURI.parse("postgresql://postgres:@/postgres?host=/tmp/x").kind == "postgresql"
    for bad in ("postgresql://app:hunter2@h/db", "postgresql://app@h/db?password=hunter2"):
        with pytest.raises(ConfigError, match="carries a password") as err:
            DatabaseURI.parse(bad)
        assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="not a database URI"):
        DatabaseURI.parse("mysql://app@h/db")
    assert redact("x postgresql://a:b@h/db and ?password=c&sslmode=1") == (
        "x postgresql://a:***@h/db and ?password=***&sslmode=1"
    )
    assert scrub("line one\n  pw=s3cr%t (s3cr%25t)", ("s3cr%t",)) == "line one pw=*** (***)"
    connect = postgres_connect_uri(DatabaseURI.parse("postgresql://app@h/db?sslmode=require"), "p&w d")
    assert connect == "postgresql://app@h/db?sslmode=require&password=p%26w+d"


def test_config_checks_the_database_fields_at_load():
    cfg = config_from_dict({"data": {"source": "postgresql://app@h/db", "table": "public.events"}})
    assert (cfg.data.source, cfg.data.table, cfg.data.password_env) == (
        "postgresql://app@h/db",
        "public.events",
        "PGPASSWORD",
    )
    with pytest.raises(ConfigError, match="data.query or data.table, not both"):
        config_from_dict({"data": {"query": "SELECT 1", "table": "t"}})
    with pytest.raises(ConfigError, match="data.source holds a password") as err:
        config_from_dict({"data": {"source": "postgresql://app:hunter2@h/db"}})
    assert "hunter2" not in str(err.value)
    assert quote_identifier("analytics.events") == '"analytics"."events"'
    for bad in ("events; DROP TABLE x", "a.b.c", "1events", ""):
        with pytest.raises(DataError, match="not a table name"):
            quote_identifier(bad)
    with pytest.raises(DataError, match="needs data.table .* or data.query"):
        read_database("duckdb:///nowhere.duckdb", DataConfig())


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("id_type", ["int", "str"])
def test_postgres_and_duckdb_logs_read_exactly_like_the_parquet_file(pg, tmp_path, id_type):
    frame = _log(id_type)
    frame.write_parquet(tmp_path / "log.parquet")
    _put(pg, f"events_{id_type}", frame)
    duck = _duck(tmp_path / "log.duckdb", "events", frame)
    want, want_report = read_interactions(tmp_path / "log.parquet", DataConfig(), tmp_path / "r0.parquet")
    for i, (uri, table) in enumerate([(pg, f"events_{id_type}"), (duck, "events")]):
        got, report = read_interactions(uri, DataConfig(table=table), tmp_path / f"r{i + 1}.parquet")
        assert got.schema == want.schema
        assert got.sort("user_id", "timestamp").equals(want.sort("user_id", "timestamp"))
        assert {**report.to_dict(), "source": None, "rejects_path": None} == {
            **want_report.to_dict(),
            "source": None,
            "rejects_path": None,
        }
        assert report.source == f"{uri} [table {table}]"
    assert want["user_id"].dtype == (pl.Int64 if id_type == "int" else pl.String)


def test_a_query_with_renamed_columns_reads_through_data_columns(pg, tmp_path):
    _put(pg, "raw_events", _log().rename({"user_id": "customer", "item_id": "sku", "timestamp": "ts"}))
    cfg = DataConfig.model_validate(
        {
            "query": "SELECT customer, sku, to_timestamp(ts) AS ts, rating FROM raw_events WHERE rating >= 2;",
            "columns": {"user_id": "customer", "item_id": "sku", "timestamp": "ts"},
        }
    )
    got, report = read_interactions(pg, cfg, None)
    want = _log().filter(pl.col("rating") >= 2)
    assert report.n_valid == want.height and report.has_timestamp
    assert got["timestamp"].dtype == pl.Datetime("ms")
    assert got["timestamp"].max().timestamp() == want["timestamp"].max()


def test_bad_rows_in_the_database_are_quarantined_exactly_as_from_a_file(pg, tmp_path):
    good = _log("str", n_users=30, per_user=10).with_columns(pl.col("timestamp").cast(pl.Int64))
    frame = pl.concat([good, BAD_ROWS])
    frame.write_parquet(tmp_path / "bad.parquet")
    _put(pg, "events_bad", frame)
    duck = _duck(tmp_path / "bad.duckdb", "events_bad", frame)
    cfg = DataConfig(max_reject_fraction=0.05)
    want, want_report = read_interactions(tmp_path / "bad.parquet", cfg, tmp_path / "file_rejects.parquet")
    want_rejects = pl.read_parquet(tmp_path / "file_rejects.parquet")
    assert want_report.n_rejected == 5 and want_rejects.height == 5
    for i, uri in enumerate([pg, duck]):
        got, report = read_interactions(
            uri, DataConfig(table="events_bad", max_reject_fraction=0.05), tmp_path / f"db{i}.parquet"
        )
        rejects = pl.read_parquet(tmp_path / f"db{i}.parquet")
        assert got.equals(want)
        assert report.rejected_by_reason == want_report.rejected_by_reason
        # row_number is the position in the result as the server sent it: here the insert order
        assert rejects.equals(want_rejects)


def test_the_fingerprint_records_query_rows_max_timestamp_and_an_order_free_checksum(pg, tmp_path):
    frame = _log()
    _put(pg, "fp_a", frame)
    _put(pg, "fp_b", frame.reverse())
    _put(
        pg,
        "fp_c",
        frame.with_columns(
            pl.when(pl.int_range(pl.len()) == 7).then(5.0).otherwise(pl.col("rating")).alias("rating")
        ),
    )
    prints = {}
    for name in ("fp_a", "fp_b", "fp_c"):
        read_interactions(pg, DataConfig(table=name), None)
        prints[name] = database_fingerprint(pg)
    a = prints["fp_a"]
    assert (
        a["query"]
        == 'SELECT "user_id", "item_id", "timestamp", "rating" FROM (SELECT * FROM "fp_a") AS recsys_source'
    )
    assert (a["n_rows"], a["max_timestamp"], a["method"]) == (
        frame.height,
        frame["timestamp"].max(),
        "database-rows",
    )
    assert a["path"] == pg
    assert a["checksum"] == prints["fp_b"]["checksum"], "row order does not change the checksum"
    assert a["checksum"] != prints["fp_c"]["checksum"], "one changed rating changes it"
    assert input_fingerprint(pg) == prints["fp_c"], "the store records the last read of the source"
    with pytest.raises(DataError, match="has not read the database source"):
        database_fingerprint("postgresql://nobody@/never-read")


# ---------------------------------------------------------------- errors


def test_errors_name_the_uri_say_what_to_do_and_never_show_the_password(pg, tmp_path, monkeypatch):
    _put(pg, "events_ok", _log())
    reader = _as_user(pg, READER)
    _sql(pg, f"GRANT SELECT ON events_ok TO {READER}")
    cases = [
        (
            "postgresql://app@127.0.0.1:1/db",
            DataConfig(table="t"),
            DatabaseUnreachable,
            "cannot reach the PostgreSQL server",
        ),
        (pg, DataConfig(query="SELEKT 1"), DatabaseError, "the query is not valid SQL"),
        (pg, DataConfig(table="no_such_table"), DatabaseError, "a table or view in the query does not exist"),
        (
            pg,
            DataConfig(query="SELECT nope FROM events_ok"),
            DatabaseError,
            "a column in the query does not exist",
        ),
        (
            pg,
            DataConfig(query="SELECT user_id AS u, item_id FROM events_ok"),
            DatabaseError,
            r"required column user_id \(source column 'user_id'\) is missing; columns the query returns: \['u', 'item_id'\]",
        ),
        (
            duckdb_uri := f"duckdb://{tmp_path}/absent.duckdb",
            DataConfig(table="t"),
            DatabaseUnreachable,
            "does not exist",
        ),
    ]
    for uri, cfg, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            read_database(uri, cfg)
        assert str(err.value).startswith(uri) and "\n" not in str(err.value)
        # the flows retry an unreachable server, never a bad query, table or column
        assert is_transient(err.value) == (kind is DatabaseUnreachable)
    assert duckdb_uri.startswith("duckdb://")

    monkeypatch.setenv("PGPASSWORD", SECRET + "-wrong")
    with pytest.raises(DatabaseError, match="wrong credentials") as err:
        read_database(reader, DataConfig(table="events_ok"))
    assert SECRET not in str(err.value) and str(err.value).startswith(reader)
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(DatabaseError, match="asks for a password and none was given"):
        read_database(reader, DataConfig(table="events_ok"))
    monkeypatch.setenv("RECSYS_DB_PASSWORD", SECRET)
    got = read_database(reader, DataConfig(table="events_ok", password_env="RECSYS_DB_PASSWORD"))
    assert got.height == _log().height


def test_cli_database_errors_are_one_line_exit_2_and_publish_nothing(pg, tmp_path, capsys, monkeypatch):
    artifacts = tmp_path / "artifacts"
    (tmp_path / "c.yaml").write_text("data: {table: no_such_table}\n")
    monkeypatch.setenv("PGPASSWORD", SECRET + "-wrong")
    for uri, expected in [
        (pg, "a table or view in the query does not exist"),
        (_as_user(pg, READER), "wrong credentials"),
        ("postgresql://app@127.0.0.1:1/db", "cannot reach the PostgreSQL server"),
    ]:
        code = main(
            [
                "run",
                "--interactions",
                uri,
                "--artifacts",
                str(artifacts),
                "--config",
                str(tmp_path / "c.yaml"),
            ]
        )
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and err.startswith(f"recsys-metric run: error: {uri}") and expected in err
        assert SECRET not in err
        assert ArtifactStore(artifacts).current() is None
    code = main(["run", "--interactions", "postgresql://app:hunter2@h/db", "--artifacts", str(artifacts)])
    err = capsys.readouterr().err
    assert code == 2 and "carries a password" in err and "hunter2" not in err


# ---------------------------------------------------------------- the sink


def _recs(run_id: str, n_users: int, k: int, id_type: str = "int") -> pa.Table:
    users = pl.int_range(n_users, eager=True).repeat_by(k).explode()
    frame = pl.DataFrame(
        {
            "user_id": users,
            "rank": pl.Series(list(range(1, k + 1)) * n_users, dtype=pl.Int32),
            "item_id": (users * 31 + pl.int_range(n_users * k, eager=True)) % 997,
            "score": pl.Series([1.0 / (1 + i % k) for i in range(n_users * k)], dtype=pl.Float32),
            "run_id": [run_id] * (n_users * k),
        }
    )
    if id_type == "str":
        frame = frame.with_columns(
            ("u" + pl.col("user_id").cast(pl.String)).alias("user_id"),
            ("i" + pl.col("item_id").cast(pl.String)).alias("item_id"),
        )
    return frame.to_arrow()


def _read_table(uri: str, table: str) -> pl.DataFrame:
    with pgdb.connect(uri) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {table} ORDER BY user_id, rank")
        return pl.from_arrow(cur.fetch_arrow_table())


@pytest.mark.parametrize("id_type", ["int", "str"])
def test_the_sink_round_trips_the_table_keeps_the_previous_one_and_indexes_it(pg, id_type):
    table = f"recs_rt_{id_type}"
    first, second = _recs("run-a", 50, 5, id_type), _recs("run-b", 60, 5, id_type)
    out = write_postgres_table(
        pg, table, first.to_batches(max_chunksize=70), first.schema, comment={"run_id": "run-a"}
    )
    assert (out["n_rows"], out["previous_table"], out["table"]) == (250, None, table)
    out = write_postgres_table(
        pg, table, second.to_batches(max_chunksize=70), second.schema, comment={"run_id": "run-b"}
    )
    assert out["previous_table"] == f"{table}_previous" and out["n_rows"] == 300
    now = _read_table(pg, table)
    assert now.equals(pl.from_arrow(second).sort("user_id", "rank"))
    assert _read_table(pg, f"{table}_previous").equals(pl.from_arrow(first).sort("user_id", "rank"))
    types = dict(
        _sql(
            pg, f"SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{table}'"
        )
    )
    assert types == {
        "user_id": "bigint" if id_type == "int" else "text",
        "rank": "integer",
        "item_id": "bigint" if id_type == "int" else "text",
        "score": "real",
        "run_id": "text",
    }
    indexes = dict(_sql(pg, f"SELECT indexname, indexdef FROM pg_indexes WHERE tablename LIKE '{table}%'"))
    assert indexes[f"{table}_user_rank"].endswith(f"ON public.{table} USING btree (user_id, rank)")
    assert f"{table}_previous_user_rank" in indexes and len(indexes) == 2
    assert json.loads(_sql(pg, f"SELECT obj_description('{table}'::regclass)")[0][0]) == {"run_id": "run-b"}
    assert _sql(pg, f"SELECT to_regclass('{table}_staging')") == [(None,)]


def test_an_unlogged_load_swaps_in_an_unlogged_table_and_a_logged_one_replaces_it(pg):
    table = "recs_unlogged"
    first, second, third = _recs("run-a", 30, 4), _recs("run-b", 35, 4), _recs("run-c", 20, 4)

    def persistence(name: str) -> str:  # p: permanent (logged), u: unlogged
        return _sql(pg, f"SELECT relpersistence FROM pg_class WHERE oid = '{name}'::regclass")[0][0]

    assert write_postgres_table(pg, table, first.to_batches(), first.schema)["unlogged"] is False
    out = write_postgres_table(pg, table, second.to_batches(max_chunksize=50), second.schema, unlogged=True)
    assert (out["n_rows"], out["unlogged"], out["previous_table"]) == (140, True, f"{table}_previous")
    assert (persistence(table), persistence(f"{table}_user_rank"), persistence(f"{table}_previous")) == (
        "u",
        "u",
        "p",
    )
    assert _read_table(pg, table).equals(pl.from_arrow(second).sort("user_id", "rank"))
    assert _read_table(pg, f"{table}_previous").equals(pl.from_arrow(first).sort("user_id", "rank"))
    write_postgres_table(pg, table, third.to_batches(), third.schema)
    assert (persistence(table), persistence(f"{table}_previous")) == ("p", "u")
    assert _read_table(pg, table).equals(pl.from_arrow(third).sort("user_id", "rank"))
    assert _sql(pg, f"SELECT to_regclass('{table}_staging')") == [(None,)]


def test_a_failed_load_leaves_the_old_table_serving_and_no_staging_table(pg):
    table = "recs_fail"
    old = _recs("run-old", 20, 3)
    write_postgres_table(pg, table, old.to_batches(), old.schema)
    new = _recs("run-new", 40, 3)

    def broken():
        yield new.to_batches(max_chunksize=30)[0]
        raise OSError("disk full while exporting")

    with pytest.raises(DatabaseError) as err:
        write_postgres_table(pg, table, broken(), new.schema)
    assert str(err.value) == (
        f"{pg}: bulk-loading {table}_staging failed (IO: nanoarrow call failed: ArrowArrayStreamGetNext(&bind.value, "
        "&current.value, &na_error) = (5) Input/output error. IOError: disk full while exporting.); see the "
        "server log for more; rolled back: nothing changed"
    )
    assert _read_table(pg, table).equals(pl.from_arrow(old).sort("user_id", "rank"))
    assert _sql(pg, f"SELECT to_regclass('{table}_staging'), to_regclass('{table}_previous')") == [
        (None, None)
    ]
    with pytest.raises(DatabaseError, match="bulk-loading recs_fail_staging failed .* rolled back"):
        write_postgres_table(pg, table, broken(), new.schema, unlogged=True)
    assert _read_table(pg, table).equals(pl.from_arrow(old).sort("user_id", "rank"))
    assert _sql(pg, f"SELECT to_regclass('{table}_staging')") == [(None,)]
    with pytest.raises(DatabaseError, match="stored 60 rows, expected 61; rolled back"):
        write_postgres_table(pg, table, old.to_batches(), old.schema, expected_rows=61)
    assert _read_table(pg, table).equals(pl.from_arrow(old).sort("user_id", "rank"))
    with pytest.raises(DatabaseError, match="the name is too long"):
        write_postgres_table(pg, "r" * 45, old.to_batches(), old.schema)
    with pytest.raises(DatabaseError, match="the schema no_schema does not exist; create it"):
        write_postgres_table(pg, "no_schema.recs", old.to_batches(), old.schema)


def test_a_concurrent_reader_sees_only_whole_tables_during_swaps(pg):
    """A thread counting rows per user in a loop while the table is swapped back and forth."""
    table, k = "recs_swap", 10
    tables = {"run-a": _recs("run-a", 20_000, k), "run-b": _recs("run-b", 30_000, k)}
    write_postgres_table(pg, table, tables["run-a"].to_batches(), tables["run-a"].schema)
    whole = {("run-a", 20_000, k, k), ("run-b", 30_000, k, k)}
    seen: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        try:
            with pgdb.connect(pg, autocommit=True) as conn, conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute(
                        f"SELECT run_id, count(*), min(n), max(n) FROM (SELECT user_id, min(run_id) AS run_id, "
                        f"count(*) AS n FROM {table} GROUP BY user_id) per_user GROUP BY run_id"
                    )
                    seen.append(tuple(tuple(r) for r in cur.fetchall()))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for run_id in ["run-b", "run-a", "run-b", "run-a"]:
            write_postgres_table(
                pg, table, tables[run_id].to_batches(max_chunksize=50_000), tables[run_id].schema
            )
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    states = {rows for rows in seen}
    assert all(len(rows) == 1 and rows[0] in whole for rows in states), states - {(w,) for w in whole}
    assert len(states) == 2, f"the reader saw both tables ({len(seen)} reads)"


# ---------------------------------------------------------------- end to end


def test_cli_run_from_a_database_log_to_a_database_table_leaks_no_password(
    pg, tmp_path, capsys, caplog, monkeypatch
):
    """`recsys-metric run` reads PostgreSQL as a password user; `batch --to` writes the table there;
    the password is in no output, log line or artifact file."""
    from recsys_metric.data.synthetic import generate_log

    log = generate_log(200, 120, 6000, n_clusters=5, seed=4).interactions
    _put(pg, "events_e2e", log)
    _sql(pg, f"GRANT SELECT ON events_e2e TO {READER}")
    reader = _as_user(pg, READER)
    monkeypatch.setenv("PGPASSWORD", SECRET)
    (tmp_path / "c.yaml").write_text(
        f"data: {{source: '{reader}', table: events_e2e}}\ntrain: {{epochs: 4, patience: 2, batch_size: 512}}\n"
    )
    artifacts, out = tmp_path / "artifacts", tmp_path / "recs"
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "run", "--artifacts", str(artifacts), "--config", str(tmp_path / "c.yaml")]) == 0
    store = ArtifactStore(artifacts)
    run_id = store.current()
    manifest = store.manifest(run_id)
    assert manifest.input["path"] == reader and manifest.input["n_rows"] == log.height
    assert manifest.input["query"].endswith('FROM (SELECT * FROM "events_e2e") AS recsys_source')

    code = main(
        [
            "batch",
            "--artifacts",
            str(artifacts),
            "--to",
            reader,
            "--table",
            "recs_e2e",
            "--unlogged",
            "-k",
            "7",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert _sql(pg, "SELECT relpersistence FROM pg_class WHERE oid = 'recs_e2e'::regclass") == [("u",)]
    table = _read_table(pg, "recs_e2e")
    assert table.height == 200 * 7 and table["user_id"].n_unique() == 200
    assert table["run_id"].unique().to_list() == [run_id]
    assert table.sort("user_id", "rank").equals(pl.read_parquet(out / "*.parquet").sort("user_id", "rank"))

    printed = capsys.readouterr()
    texts = [printed.out, printed.err, caplog.text]
    texts += [
        p.read_bytes().decode("latin-1")
        for p in Path(tmp_path).rglob("*")
        if p.is_file() and p.name != "c.yaml"
    ]
    assert len(texts) > 15
    assert not [t[:80] for t in texts if SECRET in t]


def test_batch_to_postgres_checks_the_database_before_scoring(pg, tmp_path, capsys):
    code = main(
        ["batch", "--artifacts", str(tmp_path / "nothing-here"), "--to", "postgresql://app@127.0.0.1:1/db"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the PostgreSQL server" in err
    code = main(["batch", "--artifacts", str(tmp_path / "nothing-here")])
    assert code == 2 and "give --out DIR" in capsys.readouterr().err
    with pytest.raises(DatabaseError, match="written to PostgreSQL only"):
        check_postgres(f"duckdb://{tmp_path}/x.duckdb", "recs")


def test_load_parquet_table_streams_the_part_files_and_counts_them(pg, tmp_path):
    table = _recs("run-p", 100, 4, "str")
    tdir = tmp_path / "t"
    tdir.mkdir()
    pl.from_arrow(table).slice(0, 150).write_parquet(tdir / "part-00000.parquet")
    pl.from_arrow(table).slice(150).write_parquet(tdir / "part-00001.parquet")
    (tdir / "_manifest.json").write_text(json.dumps({"run_id": "run-p", "k": 4, "n_users": 100, "extra": 1}))
    out = load_parquet_table(tdir, pg, "recs_parquet")
    assert out["n_rows"] == 400
    assert _read_table(pg, "recs_parquet").equals(pl.from_arrow(table).sort("user_id", "rank"))
    comment = json.loads(_sql(pg, "SELECT obj_description('recs_parquet'::regclass)")[0][0])
    assert comment == {"run_id": "run-p", "k": 4, "n_users": 100, "n_rows": 400}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatabaseError, match="no \\*.parquet files to load"):
        load_parquet_table(tmp_path / "empty", pg, "recs_parquet")


@pytest.mark.prefect
def test_nightly_and_batch_flows_from_a_database_log_to_a_database_table(
    prefect_api, pg, tmp_path, monkeypatch
):
    """The whole nightly flow reads the log from PostgreSQL (password from a Prefect Secret block,
    source from data.source), the batch flow writes the table there; a second batch keeps the first
    as <table>_previous; no artifact holds the password."""
    from prefect.blocks.system import Secret

    from flows.batch_recommendations import batch_recommendations
    from flows.nightly_retrain import nightly_retrain
    from recsys_metric.data.synthetic import generate_log

    log = generate_log(300, 150, 9000, n_clusters=6, seed=3).interactions
    _put(pg, "flow_events", log)
    _sql(pg, f"GRANT SELECT ON flow_events TO {READER}")
    reader = _as_user(pg, READER)
    Secret(value=SECRET).save("recsys-db-password", overwrite=True)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    config = tmp_path / "nightly.yaml"
    config.write_text(
        f"data: {{source: '{reader}', table: flow_events, password_secret: recsys-db-password}}\n"
        "train: {epochs: 6, patience: 2, batch_size: 512}\n"
    )
    artifacts, out = tmp_path / "artifacts", tmp_path / "recs"
    result = nightly_retrain(artifacts=str(artifacts), config_path=str(config))
    assert result["published"] and result["current_run_id"] == result["run_id"]
    manifest = ArtifactStore(artifacts).manifest(result["run_id"])
    assert (manifest.input["path"], manifest.input["n_rows"]) == (reader, log.height)

    first = batch_recommendations(
        artifacts=str(artifacts),
        out=str(out),
        k=5,
        to=reader,
        table="flow_recs",
        password_secret="recsys-db-password",
    )
    assert first["postgres"]["n_rows"] == 300 * 5 and first["postgres"]["previous_table"] is None
    table = _read_table(pg, "flow_recs")
    assert table.height == 300 * 5 and table["user_id"].n_unique() == 300
    assert table["run_id"].unique().to_list() == [result["run_id"]]
    assert table.sort("user_id", "rank").equals(
        pl.read_parquet(out / result["run_id"] / "*.parquet").sort("user_id", "rank")
    )
    second = batch_recommendations(
        artifacts=str(artifacts),
        out=str(out),
        k=3,
        to=reader,
        table="flow_recs",
        password_secret="recsys-db-password",
        unlogged=True,
    )
    assert second["postgres"]["previous_table"] == "flow_recs_previous" and second["postgres"]["unlogged"]
    assert _sql(pg, "SELECT relpersistence FROM pg_class WHERE oid = 'flow_recs'::regclass") == [("u",)]
    assert _read_table(pg, "flow_recs").height == 300 * 3
    assert _read_table(pg, "flow_recs_previous").equals(table)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_a_source_query_cannot_write(pg):
    _put(pg, "events_ro", _log())
    _sql(
        pg,
        "CREATE OR REPLACE FUNCTION wipe_events_ro() RETURNS bigint LANGUAGE sql AS "
        "'DELETE FROM events_ro; SELECT 1::bigint'",
    )
    with pytest.raises(DatabaseError, match="cannot execute DELETE in a read-only transaction"):
        read_database(pg, DataConfig(query="SELECT user_id, item_id, wipe_events_ro() AS w FROM events_ro"))
    assert _sql(pg, "SELECT count(*) FROM events_ro") == [(_log().height,)]
