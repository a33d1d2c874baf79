"""The HTTP face of serving: a FastAPI app over a (following) recommender.

Run it with ``recsys-metric api --artifacts DIR [--host 127.0.0.1] [--port 8000] [--workers N]``
or any ASGI server (``uvicorn --factory recsys_metric.serving.api:app_from_env`` with
``RECSYS_METRIC_ARTIFACTS`` set). Routes (JSON; the columns of the Python API):

- ``GET /similar/{item_id}?k=10&exclude=ID&exclude=ID``
- ``GET /recommend/{user_id}?k=10&exclude_seen=true&exclude=ID``
- ``POST /recommend`` ``{"user_ids": [...], "k": 10, "exclude_seen": true}``
- ``POST /recommend/history`` ``{"item_ids": [...], "k": 10, "exclude_seen": true}`` (fold-in for a
  user the model has not seen)
- ``GET /explain/{user_id}/{item_id}?k=5``
- ``POST /items`` ``{"items": [{"item_id": ..., FEATURE: VALUE, ...}], "separator": "|"}``: embed
  new items from their features and serve them at once (``Recommender.add_items``; 422 names a
  bad item); answers the ids ``added``, ``replaced``, ``skipped`` (known to the run)
- ``GET /health``: the serving run, when it was loaded, counts, reloads and refusals
- ``GET /metrics``: Prometheus text (requests, latency histogram, reloads, refused runs)
- ``GET /docs``: OpenAPI

Errors are JSON ``{"detail": ...}``: 404 names an unknown id, 422 a bad parameter (``k`` below 1
or above :data:`MAX_K`, a malformed body). Ids in paths may hold any character, URL-encoded
(``/`` as ``%2F``); for an integer vocabulary they are parsed as integers.

The app follows the artifact store's ``current`` (:class:`FollowingRecommender`) when given an
artifacts directory, and serves one run as is when given a run directory. Each worker process
loads its own copy of the run and keeps its own metrics.

Route handlers are plain functions: FastAPI runs them in its thread pool, and the queries
release the GIL in Annoy and in BLAS, so one worker uses more than one core under load (as
``async def`` handlers on the event loop they cost about 0.1 ms less CPU each but are confined to
one core, which lost a third of the requests/s at concurrency 8 on the 1M catalog here). The
parameters of ``/similar`` and ``/recommend/{user_id}`` are read by a plan made once
(:mod:`recsys_metric.serving.api_routes`), and the app loads the run with ``output="records"``:
answers go from numpy to JSON without a frame.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from recsys_metric import __version__
from recsys_metric.data.vocab import UnknownIdError
from recsys_metric.errors import DataError, RecsysMetricError, ServingError
from recsys_metric.registry import CURRENT_LINK
from recsys_metric.serving.api_routes import QuickParamsRoute
from recsys_metric.serving.cli_api import (
    ENV_ADDED_ITEMS,
    ENV_ARTIFACTS,
    ENV_INDEX,
    ENV_INTERVAL,
    ENV_VERIFY,
)
from recsys_metric.serving.follow import FollowingRecommender
from recsys_metric.serving.recommender import Recommender

MAX_K = 1000
"""Largest ``k`` a request may ask for."""


_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class UsersRequest(BaseModel):
    """Body of ``POST /recommend``."""

    user_ids: list[int | str] = Field(..., min_length=1, max_length=10_000, description="known user ids")
    k: int = Field(10, ge=1, le=MAX_K, description="items per user")
    exclude_seen: bool = Field(True, description="leave out items each user interacted with in the run")


class HistoryRequest(BaseModel):
    """Body of ``POST /recommend/history``."""

    item_ids: list[int | str] = Field(
        ..., min_length=1, max_length=10_000, description="items the (unknown) user liked; repeats count"
    )
    k: int = Field(10, ge=1, le=MAX_K, description="number of items")
    exclude_seen: bool = Field(True, description="leave the history items out of the answer")


class ItemsRequest(BaseModel):
    """Body of ``POST /items``."""

    items: list[dict[str, Any]] = Field(
        ...,
        min_length=1,
        max_length=10_000,
        description="items to embed and serve: item_id plus every feature column the run was trained "
        "with (null = missing; tags as a list or a delimited string)",
    )
    separator: str = Field("|", min_length=1, description="delimiter of tags given as one string")


class _Metrics:
    """Prometheus metrics of one app (its own registry, so that several apps in one process, as in
    tests, do not collide)."""

    def __init__(self, service: Callable[[], Any]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "recsys_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recsys_request_duration_seconds",
            "Request handling time by route template, seconds",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ServingCollector(service))


class _ServingCollector:
    """Reload and refusal counts, read from the recommender at scrape time."""

    def __init__(self, service: Callable[[], Any]):
        self._service = service

    def collect(self) -> Any:
        rec = self._service()
        if rec is None:
            return
        reloads = CounterMetricFamily("recsys_reloads", "Published runs swapped in since start")
        refused = CounterMetricFamily(
            "recsys_refused_runs", "Published runs refused (failed to load or verify)"
        )
        following = isinstance(rec, FollowingRecommender)
        reloads.add_metric([], rec.reloads if following else 0)
        refused.add_metric([], len(rec.refusals) if following else 0)
        info = GaugeMetricFamily("recsys_serving_run", "The run serving now (value 1)", labels=["run_id"])
        info.add_metric([rec.run_id], 1)
        items = GaugeMetricFamily("recsys_items", "Items in the serving run")
        items.add_metric([], rec.snapshot().n_items if following else rec.n_items)
        yield from (reloads, refused, info, items)


class _MetricsMiddleware:
    """Counts requests and times them by route template (``/similar/{item_id}``, not the id)."""

    def __init__(self, app: Any, metrics: _Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or "unmatched"
            self.metrics.requests.labels(template, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - started)


def _json(payload: dict[str, Any]) -> Response:
    """A JSON response serialised once by ``json.dumps``: answers are plain dicts, lists, str,
    int and finite floats, so FastAPI's validation and ``jsonable_encoder`` pass (about a
    millisecond of CPU per request here) buys nothing."""
    return Response(
        json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), media_type="application/json"
    )


def _rows(frame: Any) -> list[dict[str, Any]]:
    """Rows of a result: as they are from a recommender loaded with ``output="records"`` (what the
    app loads), else from a polars or pandas frame (a recommender passed to :func:`create_app`)."""
    if isinstance(frame, list):
        return frame
    return frame.to_dicts() if hasattr(frame, "to_dicts") else frame.to_dict(orient="records")


def _typed(text: str, id_type: type, column: str) -> int | str:
    """A path segment as an id of the vocabulary's type (URL text; integer vocabularies need ints)."""
    if id_type is int:
        try:
            return int(text)
        except ValueError:
            raise UnknownIdError(
                f"{column} {text!r} is not in the run's {column.removesuffix('_id')} vocabulary "
                f"(integer ids)",
                unknown=[text],
                n_unknown=1,
            ) from None
    return text


def _typed_list(values: list[Any], id_type: type, column: str) -> list[Any]:
    """Ids from a query string or a JSON body: text parsed for an integer vocabulary."""
    if id_type is int:
        return [v if isinstance(v, int) else _typed(v, id_type, column) for v in values]
    return list(values)


def create_app(
    artifacts: str | os.PathLike[str] | None = None,
    *,
    interval: float = 30.0,
    index: str = "auto",
    verify: bool = True,
    added_items_dir: str | os.PathLike[str] | None = None,
    recommender: Recommender | FollowingRecommender | None = None,
) -> FastAPI:
    """The FastAPI app.

    Args:
        artifacts: an artifacts directory (followed: each published run is swapped in after it
            loads and verifies) or a run directory (served as is). Loaded at startup.
        interval: seconds between checks of ``current``.
        index, verify: as :meth:`Recommender.load`.
        added_items_dir: with a followed artifacts directory, the added-items journal that
            ``POST /items`` writes and every worker process applies
            (:mod:`~recsys_metric.serving.items_journal`); None: items posted stay in the process
            that received them.
        recommender: serve this one instead of loading ``artifacts`` (tests, embedding the app).

    Once started, ``app.state.recommender`` is the :class:`Recommender` or
    :class:`FollowingRecommender` it serves (``refresh()`` it to check ``current`` at once).

    Raises:
        ValueError: neither ``artifacts`` nor ``recommender`` given.
    """
    if artifacts is None and recommender is None:
        raise ValueError("create_app needs an artifacts directory or a recommender")
    state: dict[str, Any] = {"rec": recommender}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state["rec"] is None
        if owned:
            assert artifacts is not None
            link = os.path.join(os.fspath(artifacts), CURRENT_LINK)
            follow = os.path.lexists(link)
            state["rec"] = Recommender.load(
                artifacts,
                index=index,
                verify=verify,
                output="records",
                follow=follow,
                interval=interval,
                added_items_dir=added_items_dir if follow else None,
            )
        app.state.recommender = state["rec"]
        try:
            yield
        finally:
            if owned and isinstance(state["rec"], FollowingRecommender):
                state["rec"].close()

    def service() -> Any:
        return state["rec"]

    def snapshot() -> Recommender:
        rec = state["rec"]
        return rec.snapshot() if isinstance(rec, FollowingRecommender) else rec

    app = FastAPI(
        title="recsys-metric",
        version=__version__,
        summary="Recommendations, similar items and explanations from the published run",
        lifespan=lifespan,
    )
    metrics = _Metrics(service)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(UnknownIdError)
    @app.exception_handler(KeyError)
    async def unknown_id(request: Request, err: KeyError) -> JSONResponse:
        detail = err.args[0] if err.args and isinstance(err.args[0], str) else f"unknown id {err}"
        unknown = getattr(err, "unknown", None)
        return JSONResponse({"detail": detail, "unknown": unknown}, status_code=404)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(TypeError)
    async def bad_type(request: Request, err: TypeError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(ServingError)
    async def unavailable(request: Request, err: ServingError) -> JSONResponse:
        # Nothing changed (e.g. the added-items journal could not be written): try again later.
        return JSONResponse({"detail": str(err)}, status_code=503)

    @app.exception_handler(RecsysMetricError)
    async def run_error(request: Request, err: RecsysMetricError) -> JSONResponse:
        # A file the request needed (the fold-in model) is missing or damaged.
        return JSONResponse({"detail": str(err)}, status_code=500)

    k_query = Query(10, ge=1, le=MAX_K, description="number of results")

    def quick_get(path: str, **kwargs: Any) -> Callable[[Any], Any]:
        """``@app.get`` for the hot single-id routes: parameters read by a plan made once
        (:mod:`recsys_metric.serving.api_routes`); answers, 422 bodies and OpenAPI unchanged."""

        def register(endpoint: Any) -> Any:
            app.router.add_api_route(
                path, endpoint, methods=["GET"], route_class_override=QuickParamsRoute, **kwargs
            )
            return endpoint

        return register

    # The two hot routes run on the event loop (``async def``), not in the thread pool: a query
    # takes about half a millisecond of CPU, and handing each to a pool thread cost more than
    # the query itself (the hop, and up to 40 threads taking turns at the GIL). One uvicorn
    # worker on the 1M-item catalog, /similar at concurrency 8, quiet machine: 1,270-1,380
    # requests/s, p99 11-14 ms, 0.73 ms of server CPU per request, against 710-760 requests/s,
    # p99 19-20 ms and 1.5 ms in the pool (docs/serving.md). The other routes (batches, fold-in,
    # embedding new items) can take longer and stay in the pool.
    @quick_get("/similar/{item_id:path}", summary="Items nearest to an item")
    async def similar(
        item_id: str = Path(..., description="item id (URL-encoded)"),
        k: int = k_query,
        exclude: Annotated[
            list[str] | None, Query(description="item ids never to return (repeat the parameter)")
        ] = None,
    ) -> Response:
        rec = snapshot()
        item = _typed(item_id, rec.item_id_type, "item_id")
        frame = rec.similar_items(item, k=k, exclude=_typed_list(exclude or [], rec.item_id_type, "item_id"))
        return _json({"run_id": rec.run_id, "item_id": item, "items": _rows(frame)})

    @quick_get("/recommend/{user_id:path}", summary="Top items for a known user")
    async def recommend(
        user_id: str = Path(..., description="user id (URL-encoded)"),
        k: int = k_query,
        exclude_seen: bool = Query(True, description="leave out items the user interacted with"),
        exclude: Annotated[
            list[str] | None, Query(description="item ids never to return (repeat the parameter)")
        ] = None,
    ) -> Response:
        rec = snapshot()
        user = _typed(user_id, rec.user_id_type, "user_id")
        frame = rec.recommend(
            user,
            k=k,
            exclude_seen=exclude_seen,
            exclude=_typed_list(exclude or [], rec.item_id_type, "item_id"),
        )
        return _json({"run_id": rec.run_id, "user_id": user, "items": _rows(frame)})

    @app.post("/recommend", summary="Top items for each of many known users")
    def recommend_many(body: UsersRequest) -> Response:
        rec = snapshot()
        users = _typed_list(body.user_ids, rec.user_id_type, "user_id")
        frame = rec.recommend_batch(users, k=body.k, exclude_seen=body.exclude_seen)
        return _json({"run_id": rec.run_id, "recommendations": _rows(frame)})

    @app.post("/recommend/history", summary="Top items for an unknown user from the items they liked")
    def recommend_history(body: HistoryRequest) -> Response:
        rec = snapshot()
        items = _typed_list(body.item_ids, rec.item_id_type, "item_id")
        frame = rec.recommend_for_history(items, k=body.k, exclude_seen=body.exclude_seen)
        return _json({"run_id": rec.run_id, "items": _rows(frame)})

    @app.get("/explain/{ids:path}", summary="The user's liked items nearest to an item")
    def explain(
        request: Request,
        ids: str = Path(..., description="USER_ID/ITEM_ID, each URL-encoded (a '/' inside an id as %2F)"),
        k: int = Query(5, ge=1, le=MAX_K, description="number of liked items"),
    ) -> Response:
        # The raw path keeps %2F encoded, so ids with '/' split unambiguously.
        raw = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
        parts = raw.split("/")
        if len(parts) != 4 or parts[1] != "explain":
            raise ValueError(
                "the path must be /explain/USER_ID/ITEM_ID with each id URL-encoded ('/' inside an id as %2F)"
            )
        rec = snapshot()
        user = _typed(unquote(parts[2]), rec.user_id_type, "user_id")
        item = _typed(unquote(parts[3]), rec.item_id_type, "item_id")
        frame = rec.explain(user, item, k=k)
        return _json({"run_id": rec.run_id, "user_id": user, "item_id": item, "liked": _rows(frame)})

    @app.post("/items", summary="Embed new items from their features and serve them at once")
    def add_items(body: ItemsRequest) -> Response:
        from recsys_metric.serving.added_items import items_frame

        rec = service()
        try:
            now = snapshot()
            frame = items_frame(body.items, now._base[2], now._item_embedder(), separator=body.separator)
            result = rec.add_items(frame, separator=body.separator)
        except DataError as err:
            return JSONResponse({"detail": str(err)}, status_code=422)
        now = snapshot()
        return _json({"run_id": now.run_id, **result.to_dict(), "n_added_items": now.n_added})

    @app.get("/health", summary="What is serving: run, load time, counts, reloads, refusals")
    def health() -> dict[str, Any]:
        rec = state["rec"]
        if rec is None:
            return JSONResponse({"status": "loading"}, status_code=503)  # type: ignore[return-value]
        if isinstance(rec, FollowingRecommender):
            return {"status": "ok", "following": True, **rec.status()}
        return {
            "status": "ok",
            "following": False,
            "run_id": rec.run_id,
            "run_dir": str(rec.run_dir),
            "loaded_at": rec.loaded_at.isoformat(timespec="seconds"),
            "verified": rec.verified,
            "n_users": rec.n_users,
            "n_items": rec.n_items,
            "n_added_items": rec.n_added,
            "reloads": 0,
            "refused": 0,
            "last_refusal": None,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app


def app_from_env() -> FastAPI:
    """The app configured by environment variables (for ``uvicorn --factory`` and ``--workers``):
    ``RECSYS_METRIC_ARTIFACTS`` (required), ``RECSYS_METRIC_RELOAD_INTERVAL`` (seconds, default
    30), ``RECSYS_METRIC_INDEX`` (auto|annoy|exact), ``RECSYS_METRIC_VERIFY`` (1|0),
    ``RECSYS_METRIC_ADDED_ITEMS`` (the added-items journal's directory; unset or empty: none)."""
    # Reloads and refusals are logged by recsys_metric.serving.follow: make them visible beside
    # uvicorn's own lines in every worker process.
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("recsys_metric").setLevel(logging.INFO)
    artifacts = os.environ.get(ENV_ARTIFACTS)
    if not artifacts:
        raise RuntimeError(f"set {ENV_ARTIFACTS} to the artifacts directory to serve")
    return create_app(
        artifacts,
        interval=float(os.environ.get(ENV_INTERVAL, "30")),
        index=os.environ.get(ENV_INDEX, "auto"),
        verify=os.environ.get(ENV_VERIFY, "1") not in ("0", "false", "no"),
        added_items_dir=os.environ.get(ENV_ADDED_ITEMS) or None,
    )
