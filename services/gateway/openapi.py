"""What /openapi.json says of the routes' bodies, answers and errors.

The routes read their bodies themselves, so that a bad body is OpenAI's 400 naming the
parameter rather than FastAPI's 422; FastAPI's generated document then has no request bodies
(and a 422 the gateway never sends).
``documented(...)`` gives a route decorator the body (a protocol model), the answer and the
error statuses, and :func:`install_openapi` adds the body models to the document's schemas.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from services.gateway.protocol import ErrorResponse

_ERRORS = {
    400: "Invalid request; `error.param` names the parameter.",
    401: "Missing or wrong API key (when the gateway has --api-keys).",
    404: "Unknown model or resource.",
    413: "Body over --max-payload-size.",
    429: "Back-pressure (admission queue full); retry after Retry-After seconds.",
    503: "No ready worker, or a service is unavailable; retry after Retry-After seconds.",
}
_SSE = {"text/event-stream": {"schema": {
    "type": "string", "description": "Server-sent events, one JSON object per `data:` line."}}}
_REF = "#/components/schemas/{model}"
# Every body model a route documents, by name (the schemas the $refs above point to).
_BODIES: dict[str, type[BaseModel]] = {}


def documented(body: type[BaseModel] | None = None, answer: type[BaseModel] | None = None,
               stream: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``@app.post(...)`` and friends."""
    ok: dict[str, Any] = {"description": "The answer" + (
        "; with `stream: true`, server-sent events." if stream else ".")}
    if answer is not None:
        ok["model"] = answer
    if stream:
        ok["content"] = _SSE
    out: dict[str, Any] = {"responses": {
        200: ok, **{s: {"model": ErrorResponse, "description": d} for s, d in _ERRORS.items()}}}
    if body is not None:
        out["openapi_extra"] = {
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF.format(model=body.__name__)}}}}}
        _BODIES[body.__name__] = body
    return out


def install_openapi(app: FastAPI) -> None:
    """Adds the documented body models (and what they refer to) to the document's schemas."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _BODIES.items():
            schema = model.model_json_schema(ref_template=_REF)
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        # FastAPI documents a 422 for routes with parameters; the gateway never answers one
        # (query parameters are read as text and checked by the serving classes: 400).
        for path in document.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
