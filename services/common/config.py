"""Typed service configuration built from CLI flags and ``SGLMESH_<SERVICE>_*`` env vars.

Each service declares one dataclass deriving from :class:`ServiceConfig`; every field has a
``help`` in its metadata. :func:`parse_config` turns the dataclass into an argparse parser
(``--field-name``), takes defaults from the environment, and validates via ``__post_init__``.
Precedence: CLI flag > environment variable > dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

LOG_LEVELS = ("debug", "info", "warning", "error")

C = TypeVar("C", bound="ServiceConfig")


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    metadata = {"help": help, **kwargs.pop("metadata", {})}
    if isinstance(default, list | dict):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ServiceConfig:
    """Options every service has."""

    service_name: ClassVar[str] = "service"

    host: str = option("127.0.0.1", help="Address to bind (0.0.0.0 or :: for all interfaces).")
    port: int = option(0, help="Port to bind (0 picks a free one).")
    metrics_port: int = option(
        -1, help="Port of the Prometheus /metrics endpoint (0 picks one; -1 disables it)."
    )
    log_level: str = option("info", help="Log level: debug, info, warning or error.")
    log_json: bool = option(False, help="Log one JSON object per line.")
    error_log: str = option("", help="Also write warnings and errors to this file.")
    trace_file: str = option(
        "", help="Append finished OpenTelemetry spans to this file as JSON lines."
    )
    otlp_endpoint: str = option("", help="OTLP/gRPC collector address for traces (host:port).")
    trace_console: bool = option(False, help="Print finished spans to stdout.")

    def __post_init__(self) -> None:
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        self.log_level = self.log_level.lower()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0-65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be -1-65535, got {self.metrics_port}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(config_cls: type[ServiceConfig], name: str) -> str:
    return f"SGLMESH_{config_cls.service_name.upper()}_{name.upper()}"


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Returns (inner type, optional) for ``X``, ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _convert(raw: str, kind: Any, flag: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{flag}: expected a boolean, got {raw!r}")
    if typing.get_origin(kind) is list:
        inner = typing.get_args(kind)[0]
        return [_convert(p.strip(), inner, flag) for p in raw.split(",") if p.strip()]
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{flag}: expected {kind.__name__}, got {raw!r}") from exc


def build_parser(config_cls: type[ServiceConfig], prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, defaults shown."""
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m services.{config_cls.service_name}",
        description=(config_cls.__doc__ or "").strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        kind, _ = _base_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_text = f.metadata.get("help", "") + f" [env {_env_name(config_cls, f.name)}]"
        if kind is bool:
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(kind) is list:
            inner = typing.get_args(kind)[0]
            parser.add_argument(
                _flag(f.name), nargs="*", type=inner, default=default, help=help_text,
                metavar=f.name.upper(),
            )
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(
                _flag(f.name), type=kind, default=default, help=help_text, choices=choices
            )
    return parser


def parse_config(
    config_cls: type[C], argv: list[str] | None = None, env: typing.Mapping[str, str] | None = None
) -> C:
    """Builds a config from flags and the environment; exits with a usage error when invalid."""
    env = os.environ if env is None else env
    parser = build_parser(config_cls)
    hints = typing.get_type_hints(config_cls)
    env_defaults: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        raw = env.get(_env_name(config_cls, f.name))
        if raw is not None and f.init:
            kind, _ = _base_type(hints[f.name])
            try:
                env_defaults[f.name] = _convert(raw, kind, _env_name(config_cls, f.name))
            except ValueError as exc:
                parser.error(str(exc))
    parser.set_defaults(**env_defaults)
    namespace = parser.parse_args(argv)
    try:
        return config_cls(**vars(namespace))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
