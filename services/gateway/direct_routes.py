"""POST routes whose endpoint takes only the Request, called without FastAPI's per-request work.

FastAPI runs every request through its exception middleware, an AsyncExitStack, the route
table, dependency solving and a response wrapper. The gateway's POST endpoints read and
validate their own bodies (``parse_body``) and take nothing but the ``Request``, so none of
that does anything for them; skipping it (with one-pass body validation) cut the embedded
gateway's CPU per request by ~10 % (docs/overhead.md). :class:`DirectRoutes` sits innermost among the
middlewares (after authentication, telemetry and the HTTP-backend relay) and calls those
endpoints directly, with the app's own exception handlers. Every route stays declared on the
app: the OpenAPI document, other methods (405) and all other paths are FastAPI's as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


def direct_endpoints(app: FastAPI) -> dict[str, tuple[APIRoute, Endpoint]]:
    """POST routes without path parameters whose endpoint's one parameter is the Request."""
    found: dict[str, tuple[APIRoute, Endpoint]] = {}
    for route in app.router.routes:
        if (not isinstance(route, APIRoute) or route.methods != {"POST"}
                or route.param_convertors or route.dependencies):
            continue
        params = list(inspect.signature(route.endpoint).parameters.values())
        if len(params) == 1 and params[0].annotation in (Request, "Request"):
            found[route.path] = (route, route.endpoint)
    return found


class DirectRoutes:
    """See the module docstring. ``app`` is FastAPI's inner ASGI app; ``fastapi`` the app."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        self.routes: dict[str, tuple[APIRoute, Endpoint]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if self.routes is None:  # routes are all declared by the first request
                self.routes = direct_endpoints(self.fastapi)
            hit = self.routes.get(scope["path"])
            if hit is not None:
                route, endpoint = hit
                scope["route"] = route
                scope["endpoint"] = endpoint
                scope["path_params"] = {}
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as exc:
                    response = await self._handled(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The app's exception handler for ``exc`` (nearest class first), as FastAPI's would."""
        handlers = self.fastapi.exception_handlers
        for cls in type(exc).__mro__:
            handler = handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc
