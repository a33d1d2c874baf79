"""QuickParamsRoute answers exactly as a plain FastAPI route (values, defaults, 422 bodies, OpenAPI),
and ``output="records"`` gives the rows of the polars frame."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient

from recsys_metric import Recommender
from recsys_metric.serving.api_routes import QuickParamsRoute, _plan
from tests.serving_runs import ITEM_IDS, USER_IDS, publish_hand_run


async def echo(
    item_id: str = Path(..., description="an id"),
    k: int = Query(10, ge=1, le=1000),
    flag: bool = Query(True),
    ratio: float | None = Query(None, gt=0),
    exclude: Annotated[list[str] | None, Query()] = None,
    need: int = Query(...),
) -> Response:
    return JSONResponse(
        {"item_id": item_id, "k": k, "flag": flag, "ratio": ratio, "exclude": exclude, "need": need}
    )


def echo_sync(
    item_id: str = Path(..., description="an id"),
    k: int = Query(10, ge=1, le=1000),
    exclude: Annotated[list[str] | None, Query()] = None,
) -> Response:
    return JSONResponse({"item_id": item_id, "k": k, "exclude": exclude, "sync": True})


@pytest.fixture(scope="module")
def clients():
    quick, plain = FastAPI(), FastAPI()
    for app, route_class in ((quick, QuickParamsRoute), (plain, None)):
        app.router.add_api_route(
            "/sync/{item_id:path}", echo_sync, methods=["GET"], route_class_override=route_class
        )
    quick.router.add_api_route(
        "/echo/{item_id:path}", echo, methods=["GET"], route_class_override=QuickParamsRoute
    )
    plain.router.add_api_route("/echo/{item_id:path}", echo, methods=["GET"])
    with TestClient(quick) as q, TestClient(plain) as p:
        yield q, p


@pytest.mark.parametrize(
    "url",
    [
        "/echo/a%2Fb?need=1",
        "/echo/x?need=2&k=5&flag=false&exclude=a&exclude=b%20c",
        "/echo/x?need=2&k=5&k=7",  # the last value wins
        "/echo/x?need=2&flag=yes&ratio=0.5",
        "/echo/x?k=0&need=1",
        "/echo/x?k=1001&need=1",
        "/echo/x?k=abc&need=1",
        "/echo/x?k=2.5&need=1",
        "/echo/x?k=&need=1",
        "/echo/x?flag=maybe&need=1",
        "/echo/x?ratio=-1&need=1",
        "/echo/x",  # need missing
        "/echo/x?k=0",  # two errors at once
        "/echo/x?need=1&exclude=",
        "/sync/a%2Fb?k=3&exclude=z",  # a plain def endpoint, run in the thread pool
        "/sync/a?k=0",
    ],
)
def test_quick_route_answers_as_the_plain_route(clients, url):
    quick, plain = clients
    got, want = quick.get(url), plain.get(url)
    assert (got.status_code, got.json()) == (want.status_code, want.json())


def test_quick_route_keeps_the_openapi_schema(clients):
    quick, plain = clients
    assert quick.get("/openapi.json").json() == plain.get("/openapi.json").json()


def test_routes_it_cannot_plan_use_fastapis_handler():
    app = FastAPI()

    def sync_endpoint(request: Request, k: int = 1) -> Response:  # a Request parameter
        return Response(str(k))

    async def listed(k: list[int] = Query([1, 2])) -> Response:  # noqa: B008 (a mutable default)
        return Response(str(k))

    for endpoint in (sync_endpoint, listed):
        app.router.add_api_route(f"/{endpoint.__name__}", endpoint, route_class_override=QuickParamsRoute)
    routes = [r for r in app.routes if isinstance(r, QuickParamsRoute)]
    assert [_plan(r) for r in routes] == [None, None]
    with TestClient(app) as client:
        assert client.get("/sync_endpoint?k=3").text == "3"
        assert client.get("/listed").text == "[1, 2]"


def test_records_output_is_the_rows_of_the_polars_frame(tmp_path):
    publish_hand_run(tmp_path, "run-a")
    frames = Recommender.load(tmp_path, output="polars")
    records = Recommender.load(tmp_path, output="records")
    item, user = ITEM_IDS[9], USER_IDS[3]
    pairs = [
        (
            frames.similar_items(item, k=5, exclude=[ITEM_IDS[8]]),
            records.similar_items(item, k=5, exclude=[ITEM_IDS[8]]),
        ),
        (frames.recommend(user, k=4), records.recommend(user, k=4)),
        (frames.recommend_batch(USER_IDS[:3], k=2), records.recommend_batch(USER_IDS[:3], k=2)),
        (frames.recommend_for_history(ITEM_IDS[1:3], k=3), records.recommend_for_history(ITEM_IDS[1:3], k=3)),
        (frames.explain(user, ITEM_IDS[10], k=2), records.explain(user, ITEM_IDS[10], k=2)),
    ]
    for frame, rows in pairs:
        assert isinstance(rows, list) and rows and rows == frame.to_dicts()
        assert all(type(r["score"]) is float and type(r["rank"]) is int for r in rows)
    assert list(pairs[2][1][0]) == ["user_id", "item_id", "score", "rank"]
    with pytest.raises(ValueError, match="'pandas', 'polars' or 'records'"):
        Recommender.load(tmp_path, output="arrow")
