"""Gateway flags: API key aliases, payload size alias, tenants from keys."""

from __future__ import annotations

import pytest

from services.common.config import parse_config
from services.gateway.config import GatewayConfig, expand_aliases
from services.gateway.storage import DEFAULT_TENANT, tenant_for_key


def test_api_key_flag_is_repeatable() -> None:
    argv = expand_aliases(["--api-key", "a", "--port", "1", "--api-key=b"])
    assert argv == ["--port", "1", "--api-keys", "a", "b"]
    assert parse_config(GatewayConfig, argv, env={}).api_keys == ["a", "b"]


def test_short_env_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLMESH_API_KEYS", "k1, k2,")
    assert parse_config(GatewayConfig, [], env={}).api_keys == ["k1", "k2"]
    # The flag wins over the environment.
    assert parse_config(GatewayConfig, ["--api-keys", "x"], env={}).api_keys == ["x"]


def test_max_payload_size_alias() -> None:
    assert parse_config(GatewayConfig, ["--max-request-bytes", "10"], env={}
                        ).max_payload_size == 10
    assert parse_config(GatewayConfig, ["--max-payload-size", "20"], env={}
                        ).max_payload_size == 20


def test_tenants_are_key_hashes() -> None:
    assert tenant_for_key(None) == DEFAULT_TENANT
    a, b = tenant_for_key("secret-a"), tenant_for_key("secret-b")
    assert a != b and a.startswith("key-") and "secret" not in a
    assert tenant_for_key("secret-a") == a


def test_embedded_services_flags_are_checked_before_serving(
        capsys: pytest.CaptureFixture[str]) -> None:
    from services.gateway.embedded import check_flags

    check_flags("embedded", "--policy cache_aware --worker-urls grpc://10.0.0.5:30000",
                "embedded", "--workers 2")
    with pytest.raises(SystemExit) as exc:
        check_flags("embedded", "--policy nope", "127.0.0.1:30200", "")
    assert exc.value.code == 2 and "--policy: invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_flags("127.0.0.1:30100", "", "embedded", "--no-such-flag")
    # Not embedded: its args are not ours to parse (the gateway's config rejects them).
    check_flags("127.0.0.1:30100", "--policy nope", "127.0.0.1:30200", "")
