"""Config: flags, environment, precedence and validation errors that name the flag."""

from __future__ import annotations

import pytest

from services.common.config import parse_config
from services.router.config import RouterConfig


def test_defaults() -> None:
    config = parse_config(RouterConfig, [], env={})
    assert config.host == "127.0.0.1"
    assert config.policy == "cache_aware"  # SMG's default
    assert config.worker_urls == []


def test_flags_override_env_and_env_overrides_defaults() -> None:
    env = {"SGLMESH_ROUTER_POLICY": "random", "SGLMESH_ROUTER_PORT": "4001",
           "SGLMESH_ROUTER_WORKER_URLS": "grpc://a:1, grpc://b:2", "SGLMESH_ROUTER_LOG_JSON": "true"}
    config = parse_config(RouterConfig, ["--port", "4002"], env=env)
    assert config.policy == "random"
    assert config.port == 4002
    assert config.worker_urls == ["grpc://a:1", "grpc://b:2"]
    assert config.log_json is True


def test_list_flag_takes_several_values() -> None:
    config = parse_config(RouterConfig, ["--worker-urls", "grpc://a:1", "grpc://b:2"], env={})
    assert config.worker_urls == ["grpc://a:1", "grpc://b:2"]


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--policy", "fastest"], {}, "--policy"),
    (["--port", "70000"], {}, "--port"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--health-check-interval-secs", "0"], {}, "--health-check-interval-secs"),
    (["--kv-pressure-window-secs", "-1"], {}, "--kv-pressure-window-secs"),
    ([], {"SGLMESH_ROUTER_PORT": "eighty"}, "SGLMESH_ROUTER_PORT"),
])
def test_invalid_values_exit_with_a_message_naming_the_flag(
        argv: list[str], env: dict[str, str], needle: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(RouterConfig, argv, env=env)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_gateway_sse_keepalive_flag() -> None:
    from services.gateway.config import GatewayConfig

    assert parse_config(GatewayConfig, [], env={}).sse_keepalive_secs == 15  # SMG's default
    assert parse_config(GatewayConfig, ["--sse-keepalive-secs", "0"], env={}
                        ).sse_keepalive_secs == 0
    with pytest.raises(SystemExit):
        parse_config(GatewayConfig, ["--sse-keepalive-secs", "-1"], env={})
