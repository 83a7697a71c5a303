"""Prefill/decode disaggregation against real ``sim`` workers in prefill and decode roles.

The sim decode worker waits (through the prefill worker's bootstrap server) until the prefill
worker has finished the request's bootstrap room, as SGLang's PD transfer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from services.common.config import parse_config
from services.router.config import RouterConfig, merge_repeated_flags, parse_prefill
from services.router.router import DispatchState, RequestHints, Router
from services.router.workers import WorkerType
from services.worker.sim_server import SimWorker
from tests.router.fleet import gen, router_config, sim_config, sim_fleet, url, wait_registered


@asynccontextmanager
async def pd_router(prefills: list[SimWorker], decodes: list[SimWorker],
                    **kw: object) -> AsyncIterator[Router]:
    prefill_args: list[str] = []
    for w in prefills:
        assert w.bootstrap is not None
        prefill_args += [url(w), str(w.bootstrap.port)]
    router = Router(router_config(pd_disaggregation=True, prefill=prefill_args,
                                  decode=[url(w) for w in decodes], **kw))
    await router.start()
    try:
        await wait_registered(router, len(prefills) + len(decodes))
        yield router
    finally:
        await router.stop()


def test_prefill_flag_parsing() -> None:
    assert parse_prefill(["grpc://a:1", "8998", "grpc://b:1", "none", "grpc://c:1"]) == [
        ("grpc://a:1", 8998), ("grpc://b:1", None), ("grpc://c:1", None)]
    with pytest.raises(ValueError, match="--prefill"):
        parse_prefill(["8998"])
    argv = merge_repeated_flags(["--pd-disaggregation", "--prefill", "grpc://a:1", "9000",
                                 "--decode", "grpc://d:1", "--prefill", "grpc://b:1",
                                 "--decode", "grpc://e:1", "--policy", "random"])
    config = parse_config(RouterConfig, argv, env={})
    assert config.prefill_workers == [("grpc://a:1", 9000), ("grpc://b:1", None)]
    assert config.decode == ["grpc://d:1", "grpc://e:1"] and config.policy == "random"
    with pytest.raises(ValueError, match="--pd-disaggregation"):
        RouterConfig(pd_disaggregation=True, prefill=["grpc://a:1"])


async def test_pd_request_uses_both_legs_and_returns_the_decode_stream() -> None:
    async with sim_fleet(sim_config(disaggregation_mode="prefill", bootstrap_port=0),
                         sim_config(disaggregation_mode="prefill", bootstrap_port=0),
                         sim_config(disaggregation_mode="decode")) as (p1, p2, d), \
            pd_router([p1, p2], [d], prefill_policy="round_robin",
                      decode_policy="power_of_two") as router:
        types = {w.url: w.worker_type for w in router.registry.all()}
        assert types == {url(p1): WorkerType.PREFILL, url(p2): WorkerType.PREFILL,
                         url(d): WorkerType.DECODE}
        assert router.policy_for(router.registry.all()[0].model_id, WorkerType.PREFILL).name \
            == "round_robin"
        prompt = list(range(10, 74))
        rooms, prefills = set(), set()
        before = [w.engine.total_requests for w in (p1, p2, d)]  # health probes count too
        for i in range(4):
            state = DispatchState()
            out = [r async for r in router.generate(gen(prompt, f"pd{i}", max_new=5),
                                                    RequestHints(), state)]
            assert out[-1].WhichOneof("response") == "complete"
            assert len(out[-1].complete.output_ids) == 5
            # the decode worker got the whole prompt's KV from its prefill peer
            assert out[-1].complete.cached_tokens == len(prompt) - 1
            assert state.worker is not None and state.worker.url == url(d)
            assert state.prefill_worker is not None
            prefills.add(state.prefill_worker.url)
            rooms.add(state.bootstrap_room)
        assert prefills == {url(p1), url(p2)} and len(rooms) == 4
        assert all(w.in_flight == 0 for w in router.registry.all())
        after = [w.engine.total_requests for w in (p1, p2, d)]
        assert after[2] - before[2] == 4
        assert after[0] + after[1] - before[0] - before[1] == 4


async def test_failed_prefill_leg_cancels_the_decode_leg() -> None:
    async with sim_fleet(sim_config(disaggregation_mode="prefill", bootstrap_port=0,
                                    sim_error_rate=1.0),
                         sim_config(disaggregation_mode="decode",
                                    sim_bootstrap_timeout=30.0)) as (p, d), \
            pd_router([p], [d], disable_retries=True) as router:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in router.generate(gen(range(10, 40), "bad-prefill"), RequestHints()):
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The decode leg was cancelled and aborted at once: it is not left waiting 30 s.
        for _ in range(200):
            loads = d.engine.loads()
            if loads.num_running == 0 and loads.num_waiting == 0 and \
                    not router.workers_of_request("bad-prefill"):
                break
            await asyncio.sleep(0.01)
        assert d.engine.loads().num_running == 0 and d.engine.loads().num_waiting == 0
        assert all(w.in_flight == 0 for w in router.registry.all())


async def test_failed_decode_leg_is_retried_on_a_new_pair() -> None:
    async with sim_fleet(sim_config(disaggregation_mode="prefill", bootstrap_port=0),
                         sim_config(disaggregation_mode="decode", sim_error_rate=1.0),
                         sim_config(disaggregation_mode="decode")) as (p, bad, good), \
            pd_router([p], [bad, good], decode_policy="round_robin") as router:
        for i in range(3):
            state = DispatchState()
            out = [r async for r in router.generate(gen(range(10, 40), f"r{i}", max_new=3),
                                                    RequestHints(), state)]
            assert out[-1].WhichOneof("response") == "complete"
            assert state.worker is not None and state.worker.url == url(good)
        assert all(w.in_flight == 0 for w in router.registry.all())
