"""The floor of a Python HTTP gateway, for ``gateway_overhead.py --floor``: FastAPI on uvicorn
with the gateway's settings (uvloop, httptools, no access log, FastAPI's own telemetry off), one
route that parses the chat request's JSON and answers a fixed chat.completion. No validation
model, no middleware, no gRPC: what any Python gateway pays before doing its work.

    python benchmarks/bare_http_app.py PORT
"""

from __future__ import annotations

import json
import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

REPLY = {"id": "chatcmpl-floor", "object": "chat.completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "It is sunny today."}}],
         "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}

app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False,
                         "operation_spans": False})


@app.get("/v1/models")
async def models() -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})


@app.post("/v1/chat/completions")
async def chat(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    return JSONResponse({**REPLY, "model": body.get("model", "m")})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
