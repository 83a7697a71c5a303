"""``/dashboard``: a small live status page for operators, and the JSON it polls.

The page is static HTML + a few lines of JavaScript; every 2 s it reads ``/dashboard/data``
(workers, health, load and breaker state from the router's admin API; the gateway's own request
and token counters) and derives rates between two polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import REGISTRY
from sglmesh.router.v1 import router_admin_pb2 as admin_pb

from services.gateway.backends import Backends

_COUNTERS = {
    "requests": "sglmesh_gateway_requests_total",
    "prompt_tokens": "sglmesh_gateway_prompt_tokens_total",
    "cached_tokens": "sglmesh_gateway_cached_tokens_total",
    "output_tokens": "sglmesh_gateway_output_tokens_total",
}


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def gateway_counters() -> dict[str, float]:
    """Cumulative totals of the gateway's own counters (API routes only for requests)."""
    totals = dict.fromkeys(_COUNTERS, 0.0)
    names = {f"{metric}_total" if not metric.endswith("_total") else metric: key
             for key, metric in _COUNTERS.items()}
    for family in REGISTRY.collect():
        for sample in family.samples:
            key = names.get(sample.name)
            if key is None:
                continue
            if key == "requests" and not sample.labels.get("route", "").startswith("/v1/"):
                continue
            totals[key] += sample.value
    return totals


async def dashboard_data(backends: Backends) -> dict[str, Any]:
    data: dict[str, Any] = {"time": time.time(), "counters": gateway_counters(), "workers": [],
                            "models": [], "router": "ok"}
    try:
        workers = await backends.router_admin.ListWorkers(admin_pb.ListWorkersRequest(), timeout=3)
        loads = await backends.router_admin.GetLoads(admin_pb.GetLoadsRequest(), timeout=3)
        models = await backends.router_admin.ListModels(admin_pb.ListModelsRequest(), timeout=3)
    except grpc.aio.AioRpcError as exc:
        data["router"] = f"{exc.code().name}: {exc.details()}"
        return data
    by_url = {load.url: load for load in loads.loads}
    for w in workers.workers:
        load = by_url.get(w.url)
        data["workers"].append({
            "url": w.url, "model": w.model_id,
            "type": _enum_name(admin_pb.WorkerType, w.worker_type, "WORKER_TYPE_"),
            "health": _enum_name(admin_pb.WorkerHealth, w.health, "WORKER_HEALTH_"),
            "breaker": _enum_name(admin_pb.CircuitState, w.circuit_state, "CIRCUIT_STATE_"),
            "in_flight": w.in_flight_requests, "processed": w.processed_requests,
            "running": load.running_requests if load else 0,
            "waiting": load.waiting_requests if load else 0,
            "token_usage": round(load.token_usage, 4) if load else 0.0,
            "gen_throughput": round(load.gen_throughput, 1) if load else 0.0,
        })
    data["models"] = [{"id": m.id, "workers": m.worker_count, "ready": m.ready_worker_count,
                       "policy": m.policy} for m in models.models]
    return data


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sglmesh dashboard</title>
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222}
 h1{font-size:20px;margin:0 0 4px} .muted{color:#777}
 .cards{display:flex;gap:12px;margin:16px 0} .card{border:1px solid #ddd;border-radius:6px;
 padding:10px 14px;min-width:130px} .card b{display:block;font-size:22px}
 table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #eee;padding:6px 8px;
 text-align:left} th{background:#fafafa}
 .ready,.closed{color:#087f23} .not_ready,.open{color:#c62828} .pending,.half_open{color:#b26a00}
</style></head>
<body>
<h1>sglmesh</h1>
<div class="muted">refreshes every 2 s &middot; <span id="updated">loading</span>
 &middot; refresh <span id="refreshes">0</span></div>
<div class="cards">
 <div class="card">requests/s<b id="rps">-</b></div>
 <div class="card">output tokens/s<b id="tps">-</b></div>
 <div class="card">cache hit rate<b id="hit">-</b></div>
 <div class="card">requests served<b id="total">-</b></div>
</div>
<div id="router" class="muted"></div>
<table><thead><tr><th>worker</th><th>model</th><th>type</th><th>health</th><th>breaker</th>
<th>in flight</th><th>running</th><th>waiting</th><th>KV usage</th><th>tok/s</th>
<th>processed</th></tr></thead><tbody id="workers"></tbody></table>
<script>
let previous = null, refreshes = 0;
function pct(x) { return (100 * x).toFixed(1) + "%"; }
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td; }
async function refresh() {
  try {
    const data = await (await fetch("dashboard/data", {cache: "no-store"})).json();
    const c = data.counters;
    if (previous) {
      const dt = Math.max(data.time - previous.time, 1e-3), p = previous.counters;
      document.getElementById("rps").textContent = ((c.requests - p.requests) / dt).toFixed(2);
      document.getElementById("tps").textContent =
        ((c.output_tokens - p.output_tokens) / dt).toFixed(1);
      const prompt = c.prompt_tokens - p.prompt_tokens;
      document.getElementById("hit").textContent = prompt > 0
        ? pct((c.cached_tokens - p.cached_tokens) / prompt)
        : (c.prompt_tokens > 0 ? pct(c.cached_tokens / c.prompt_tokens) : "-");
    }
    document.getElementById("total").textContent = c.requests;
    document.getElementById("router").textContent =
      data.router === "ok" ? "" : "router: " + data.router;
    const body = document.getElementById("workers");
    body.replaceChildren(...data.workers.map(w => {
      const tr = document.createElement("tr");
      tr.dataset.url = w.url;
      tr.append(cell(w.url), cell(w.model), cell(w.type), cell(w.health, w.health),
        cell(w.breaker, w.breaker), cell(w.in_flight), cell(w.running), cell(w.waiting),
        cell(pct(w.token_usage)), cell(w.gen_throughput), cell(w.processed));
      return tr; }));
    previous = data;
    refreshes += 1;
    document.getElementById("refreshes").textContent = refreshes;
    document.getElementById("updated").textContent =
      "updated " + new Date(data.time * 1000).toLocaleTimeString();
  } catch (err) {
    document.getElementById("updated").textContent = "error: " + err;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""


def install_dashboard(app: FastAPI, backends: Callable[[], Backends]) -> None:
    """Adds ``GET /dashboard`` (the page) and ``GET /dashboard/data`` (what it polls)."""

    @app.get("/dashboard", response_class=HTMLResponse, tags=["operations"])
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(_PAGE)

    @app.get("/dashboard/data", tags=["operations"])
    async def dashboard_json() -> JSONResponse:
        return JSONResponse(await dashboard_data(backends()))
