"""DirectRoutes: the plain POST endpoints are called without FastAPI's per-request machinery,
and answer exactly as FastAPI would (errors through the app's handlers, other methods and
paths untouched). Driven through the ASGI interface with httpx's in-process transport."""

from __future__ import annotations

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.gateway.direct_routes import DirectRoutes, direct_endpoints
from services.gateway.errors import OpenAIError


def make_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(DirectRoutes, fastapi=app)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"bug": str(exc)}, status_code=500)

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("fail") == "client":
            raise OpenAIError(400, "bad input", param="fail")
        if body.get("fail") == "bug":
            raise RuntimeError("boom")
        route = request.scope["route"]
        return JSONResponse({"route": route.path, "got": body})

    @app.post("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    @app.post("/typed")
    async def typed(payload: dict[str, int]) -> dict[str, int]:
        return payload

    return app


def test_only_request_only_post_routes_are_direct() -> None:
    assert set(direct_endpoints(make_app())) == {"/echo"}


async def test_direct_routes_answer_as_fastapi_would() -> None:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.post("/echo", json={"a": 1})
        assert ok.status_code == 200
        assert ok.json() == {"route": "/echo", "got": {"a": 1}}  # the route is on the scope
        failed = await client.post("/echo", json={"fail": "client"})
        assert failed.status_code == 400 and failed.json()["error"]["param"] == "fail"
        bug = await client.post("/echo", json={"fail": "bug"})
        assert bug.status_code == 500 and bug.json() == {"bug": "boom"}
        assert (await client.get("/echo")).status_code == 405  # FastAPI's, as before
        assert (await client.post("/items/7")).json() == {"item": "7"}
        assert (await client.post("/typed", json={"n": 2})).json() == {"n": 2}
        assert (await client.post("/nowhere", json={})).status_code == 404
