"""``--engine sglang``: real SGLang, wrapped without patching it.

    python -m services.worker --engine sglang --host 0.0.0.0 --port 30000 -- \\
        --model-path /models/llama --tp-size 2 --mem-fraction-static 0.8

Design (the subprocess form recommended in ``worker_contract.md``):

1. **Parse.** SGLang's flags (after ``--``) are parsed by SGLang's own
   ``ServerArgs.add_cli_args`` / ``from_cli_args`` (imported lazily; ``check_server_args`` runs on
   that probe copy), so every SGLang flag and alias works and a bad one fails before anything
   starts. Without sglang installed, or without a GPU, the worker exits with one line.
2. **Pre-flight** the model path (:mod:`services.worker.preflight`) and warn when
   ``tp_size x dp_size`` exceeds the visible GPUs.
3. **Child.** ``python -m sglang.launch_server <user flags> --grpc-mode --host 127.0.0.1 --port
   <private> --kv-events-config <json> [--log-level L]`` in its own session, with
   ``no_proxy``/``no_grpc_proxy`` covering loopback. The child always binds loopback, so SGLang's
   own warm-up (which dials ``host:port`` literally in smg-grpc-servicer < 0.13.6) never dials
   0.0.0.0 and never goes through a proxy. KV events are on explicitly: on versions whose
   ``KVEventsConfig`` has ``bind`` (checked in the installed source, not by version number) the
   publisher binds ``tcp://127.0.0.1:PORT`` with ``bind: true``; on older ones (0.5.17) it must
   be the wildcard ``tcp://*:PORT``, the only form that binds there.
4. **Proxy.** sglmesh's own gRPC server listens on the user's ``--host/--port`` and forwards
   every ``SglangScheduler`` RPC (raw bytes, streams, metadata, deadlines, status codes) to the
   child, except two that it fixes on the way: ``GetModelInfo`` (SGLang's gRPC mode reports
   placeholders: vocab 128256, no EOS ids, the KV pool size as context length; the real values
   come from the model's ``config.json`` / ``generation_config.json``) and ``GetServerInfo``
   (adds the structured ``kv_events`` descriptor, and the public host/port).
5. **Readiness** = the child's ``grpc.health`` reports ``sglang.grpc.scheduler.SglangScheduler``
   SERVING over a proxy-less loopback channel; only then is sglmesh's health SERVING.
6. **Teardown.** On SIGTERM/SIGINT, or when the child dies, sglmesh stops serving, sends SIGTERM
   to the child's process group, waits, then SIGKILLs every process left in the child's tree
   (found through /proc, so grandchildren that started their own session go too). The child
   also gets ``PR_SET_PDEATHSIG`` so it dies if the wrapper is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"
LOOPBACK = "127.0.0.1"
NO_PROXY_HOSTS = ("127.0.0.1", "localhost", "::1")
EXIT_UNAVAILABLE = 3


class SglangUnavailable(Exception):
    """SGLang cannot run here (not installed, no GPU, bad flags): a one-line reason."""


# ----------------------------------------------------------------------------- SGLang flags


@dataclass
class SglangSettings:
    """What the wrapper needs to know from SGLang's flags."""

    model_path: str = ""
    tokenizer_path: str = ""
    tp_size: int = 1
    dp_size: int = 1
    host: str = ""
    port: int = 0
    log_level: str = ""
    kv_events_config: str = ""
    page_size: int = 1
    context_length: int = 0
    served_model_name: str = ""
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998
    load_format: str = "auto"
    argv: list[str] = field(default_factory=list)
    # "--smg-grpc-mode" where SGLang's parser has it (0.5.2x; "--grpc-mode" is its deprecated
    # alias there), else "--grpc-mode" (0.5.17)
    grpc_mode_flag: str = "--grpc-mode"


def _light_parser() -> argparse.ArgumentParser:
    """The few SGLang flags the wrapper reads, for when SGLang itself is not importable
    (a stand-in launcher in tests); SGLang's own parser is used otherwise."""
    p = argparse.ArgumentParser(prog="sglang", add_help=False)
    p.add_argument("--model-path", "--model", dest="model_path", default="")
    p.add_argument("--tokenizer-path", dest="tokenizer_path", default="")
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1)
    p.add_argument("--host", default="")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log-level", dest="log_level", default="")
    p.add_argument("--kv-events-config", dest="kv_events_config", default="")
    p.add_argument("--page-size", dest="page_size", type=int, default=1)
    p.add_argument("--context-length", dest="context_length", type=int, default=0)
    p.add_argument("--served-model-name", dest="served_model_name", default="")
    p.add_argument("--disaggregation-mode", dest="disaggregation_mode", default="null")
    p.add_argument("--disaggregation-bootstrap-port", dest="disaggregation_bootstrap_port",
                   type=int, default=8998)
    p.add_argument("--load-format", dest="load_format", default="auto")
    return p


def _settings_from(ns: Any, argv: Sequence[str]) -> SglangSettings:
    def get(name: str, default: Any) -> Any:
        value = getattr(ns, name, None)
        return default if value is None else value

    return SglangSettings(
        model_path=str(get("model_path", "")), tokenizer_path=str(get("tokenizer_path", "")),
        tp_size=int(get("tp_size", 1)), dp_size=int(get("dp_size", 1)),
        host=str(get("host", "")), port=int(get("port", 0) or 0),
        log_level=str(get("log_level", "") or ""),
        kv_events_config=str(get("kv_events_config", "") or ""),
        page_size=int(get("page_size", 1) or 1), context_length=int(get("context_length", 0) or 0),
        served_model_name=str(get("served_model_name", "") or ""),
        disaggregation_mode=str(get("disaggregation_mode", "null") or "null"),
        disaggregation_bootstrap_port=int(get("disaggregation_bootstrap_port", 8998) or 8998),
        load_format=str(get("load_format", "auto") or "auto"),
        argv=list(argv))


def _user_gave(argv: Sequence[str], *flags: str) -> bool:
    return any(a in flags or any(a.startswith(f + "=") for f in flags) for a in argv)


def parse_sglang_args(argv: Sequence[str], server_args_cls: Any = None,
                      use_sglang: bool = True) -> SglangSettings:
    """Parses SGLang's flags with SGLang's own ``ServerArgs`` (or ``server_args_cls``);
    :class:`SglangUnavailable` with SGLang's message when they are invalid."""
    argv = list(argv)
    if server_args_cls is None and use_sglang:
        try:
            from sglang.srt.server_args import ServerArgs  # lazy: needs torch + a GPU stack
        except Exception as exc:  # ImportError, or anything SGLang's import chain raises
            raise SglangUnavailable(f"cannot import SGLang's ServerArgs: {exc}") from exc
        with contextlib.suppress(Exception):
            from sglang.srt.plugins import load_plugins  # type: ignore[import-not-found]

            load_plugins()
        server_args_cls = ServerArgs
    if server_args_cls is None:
        ns, _unknown = _light_parser().parse_known_args(argv)
        return _settings_from(ns, argv)
    parser = argparse.ArgumentParser(prog="sglang flags (after --)", exit_on_error=False)
    server_args_cls.add_cli_args(parser)
    try:
        ns = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise SglangUnavailable(f"invalid SGLang flags: {exc}") from None
    if not getattr(ns, "model_path", None):
        raise SglangUnavailable("SGLang needs --model-path (after `--`)")
    flags = {opt for action in parser._actions for opt in action.option_strings}
    try:
        probe = server_args_cls.from_cli_args(ns)
        if hasattr(probe, "resolve_once"):  # sglang >= 0.5.20: a sealed msgspec record
            probe.resolve_once()
        if hasattr(probe, "check_server_args"):
            probe.check_server_args()
    except SglangUnavailable:
        raise
    except Exception as exc:
        raise SglangUnavailable(f"SGLang rejected its flags: {type(exc).__name__}: {exc}") from None
    settings = _settings_from(ns, argv)
    if "--smg-grpc-mode" in flags:
        settings.grpc_mode_flag = "--smg-grpc-mode"
    return settings


# ----------------------------------------------------------------------------- environment


def sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def servicer_version() -> str | None:
    """smg-grpc-servicer's version (it serves SGLang's gRPC mode since 0.5.2x)."""
    try:
        return importlib.metadata.version("smg-grpc-servicer")
    except importlib.metadata.PackageNotFoundError:
        return None


def kv_events_supports_bind() -> bool:
    """Whether the installed SGLang's ``KVEventsConfig`` has a ``bind`` field (0.5.17 has
    not: there a loopback tcp endpoint makes the publisher *connect*, so nothing arrives).
    Read from the installed source without importing it."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(list(spec.submodule_search_locations)[0]) / "srt" / "disaggregation" / \
        "kv_events.py"
    try:
        text = source.read_text()
    except OSError:
        return False
    match = re.search(r"class KVEventsConfig\b.*?(?=\nclass |\Z)", text, re.S)
    return bool(match and re.search(r"^\s+bind\s*:", match.group(0), re.M))


def check_environment(gpus: int | None = None) -> str:
    """SGLang's version, or :class:`SglangUnavailable` when it cannot run here."""
    version = sglang_version()
    if version is None or importlib.util.find_spec("sglang") is None:
        raise SglangUnavailable(
            f"--engine sglang needs SGLang, which is not installed for {sys.executable} "
            "(pip install 'sglmesh[sglang]' on a GPU host; sglang>=0.5.17)")
    if gpus is None:
        from services.worker.preflight import count_gpus

        gpus = count_gpus()
    if gpus == 0:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f"CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None else "no /dev/nvidia*"
        raise SglangUnavailable(f"--engine sglang needs a CUDA GPU and none is visible ({where})")
    return version


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: proxies bypassed for loopback, unbuffered output."""
    env = dict(os.environ if base is None else base)
    for key in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        current = [h.strip() for h in env.get(key, "").split(",") if h.strip()]
        env[key] = ",".join(current + [h for h in NO_PROXY_HOSTS if h not in current])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kv_events_config(port_base: int, supports_bind: bool, topic: str = "") -> dict[str, Any]:
    """A KV-events config that really delivers on this SGLang (see the module docstring)."""
    if supports_bind:
        config: dict[str, Any] = {"publisher": "zmq", "endpoint": f"tcp://{LOOPBACK}:{port_base}",
                                  "bind": True}
    else:
        config = {"publisher": "zmq", "endpoint": f"tcp://*:{port_base}"}
    if topic:
        config["topic"] = topic
    return config


def fix_user_kv_events(raw: str, supports_bind: bool) -> tuple[str, str | None]:
    """A user's ``--kv-events-config``, rewritten when it could never deliver on this SGLang
    (a non-wildcard tcp endpoint without ``bind`` on 0.5.17); returns (config, warning)."""
    try:
        config = json.loads(raw)
    except ValueError:
        return raw, None  # SGLang reports it
    if not isinstance(config, dict) or config.get("publisher") != "zmq":
        return raw, None
    endpoint = str(config.get("endpoint", "tcp://*:5557"))
    m = re.fullmatch(r"tcp://(\[[^\]]*\]|[^:]*):(\d+)", endpoint)
    if not m or m.group(1) in ("*", "0.0.0.0", "[::]") or supports_bind:
        return raw, None
    config["endpoint"] = f"tcp://*:{m.group(2)}"
    return json.dumps(config), (
        f"--kv-events-config endpoint {endpoint} would make this SGLang's publisher connect "
        f"instead of bind (no 'bind' option in its KVEventsConfig), so no event would arrive; "
        f"using {config['endpoint']}")


def free_port_block(count: int, host: str = LOOPBACK, tries: int = 50) -> int:
    """The first of ``count`` consecutive ports that were all free a moment ago."""
    import socket

    for _ in range(tries):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no block of {count} free ports on {host}")


_OVERRIDDEN = ("--host", "--port", "--grpc-mode", "--smg-grpc-mode", "--kv-events-config")
_NO_VALUE = ("--grpc-mode", "--smg-grpc-mode")


def merge_args(user_argv: Sequence[str], *, child_port: int, log_level: str,
               kv_config: str, grpc_mode_flag: str = "--grpc-mode") -> list[str]:
    """The child's SGLang flags: the user's, minus host/port/gRPC-mode/KV-events (which the
    wrapper owns), plus ``--grpc-mode --host 127.0.0.1 --port P --kv-events-config J`` and
    sglmesh's log level unless the user set SGLang's."""
    out: list[str] = []
    skip = False
    for arg in user_argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OVERRIDDEN:
            skip = "=" not in arg and name not in _NO_VALUE
            continue
        out.append(arg)
    out += [grpc_mode_flag, "--host", LOOPBACK, "--port", str(child_port),
            "--kv-events-config", kv_config]
    if log_level and not _user_gave(user_argv, "--log-level"):
        out += ["--log-level", log_level]
    return out


def build_command(launcher: str, args: Sequence[str]) -> list[str]:
    """``python -m sglang.launch_server ARGS`` (or the ``--sglang-launcher`` command)."""
    prefix = shlex.split(launcher) if launcher else [sys.executable, "-m", "sglang.launch_server"]
    return [*prefix, *args]


# ----------------------------------------------------------------------------- model facts


@dataclass
class ModelFacts:
    """What SGLang's gRPC GetModelInfo gets wrong, read from the model directory."""

    vocab_size: int = 0
    context_length: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = ""
    architectures: list[str] = field(default_factory=list)
    id2label: dict[str, str] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def model_facts(model_path: str, tokenizer_path: str = "", context_length: int = 0) -> ModelFacts:
    """Facts from ``config.json`` (+ ``text_config``), ``generation_config.json``."""
    facts = ModelFacts()
    candidates = [Path(p).expanduser() for p in (model_path, tokenizer_path) if p]
    directory = next((p if p.is_dir() else p.parent for p in candidates
                      if (p if p.is_dir() else p.parent).joinpath("config.json").is_file()), None)
    if directory is None:
        facts.context_length = context_length
        return facts
    config = _read_json(directory / "config.json")
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else {}
    gen = _read_json(directory / "generation_config.json")

    def pick(*keys: str) -> Any:
        for source in (config, text):
            for key in keys:
                if isinstance(source.get(key), int) and not isinstance(source.get(key), bool):
                    return source[key]
        return None

    facts.vocab_size = int(pick("vocab_size") or 0)
    model_context = int(pick("max_position_embeddings", "n_positions", "max_seq_len",
                             "seq_length", "max_sequence_length") or 0)
    facts.context_length = context_length or model_context
    eos = _ids(gen.get("eos_token_id")) or _ids(config.get("eos_token_id")) or \
        _ids(text.get("eos_token_id"))
    facts.eos_token_ids = list(dict.fromkeys(eos))
    for name in ("bos_token_id", "pad_token_id"):
        ids = _ids(gen.get(name)) or _ids(config.get(name)) or _ids(text.get(name))
        setattr(facts, name, ids[0] if ids else None)
    facts.model_type = str(config.get("model_type", "") or "")
    archs = config.get("architectures")
    facts.architectures = [str(a) for a in archs] if isinstance(archs, list) else []
    labels = config.get("id2label")
    facts.id2label = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) \
        and config.get("num_labels", len(labels)) and _is_classifier(facts.architectures) else None
    return facts


def _is_classifier(architectures: list[str]) -> bool:
    return any(a.endswith(("ForSequenceClassification", "ForTokenClassification"))
               for a in architectures)


def fix_model_info(info: Any, facts: ModelFacts, served_model_name: str = "") -> Any:
    """Replaces SGLang's gRPC placeholders in a ``GetModelInfoResponse`` with real values."""
    if facts.vocab_size:
        info.vocab_size = facts.vocab_size
    if facts.eos_token_ids:
        del info.eos_token_ids[:]
        info.eos_token_ids.extend(facts.eos_token_ids)
    if facts.context_length:
        info.max_context_length = facts.context_length
        if info.max_req_input_len <= 0 or info.max_req_input_len >= facts.context_length:
            info.max_req_input_len = max(1, facts.context_length - 1)
    if facts.bos_token_id is not None:
        info.bos_token_id = facts.bos_token_id
    if facts.pad_token_id is not None:
        info.pad_token_id = facts.pad_token_id
    if facts.model_type and not info.model_type:
        info.model_type = facts.model_type
    if facts.architectures and not list(info.architectures):
        info.architectures.extend(facts.architectures)
    if facts.id2label is not None:
        info.id2label_json = json.dumps(facts.id2label)
        info.num_labels = len(facts.id2label)
    elif info.is_generation:
        info.id2label_json = ""  # HF's LABEL_0/LABEL_1 defaults mean nothing for a causal LM
        info.num_labels = 0
    if served_model_name and not info.served_model_name:
        info.served_model_name = served_model_name
    return info


# ----------------------------------------------------------------------------- processes


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children = _proc_children()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChildProcess:
    """The supervised SGLang process (own session; the whole tree is torn down)."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.known: set[int] = set()

    def start(self) -> int:
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True,
                                     preexec_fn=_set_pdeathsig)  # noqa: PLW1509
        return self.proc.pid

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def remember_tree(self) -> None:
        """Records the current descendants (so ones that re-parent to init are still found)."""
        if self.proc is not None and self.proc.poll() is None:
            self.known.update(process_tree(self.proc.pid))

    def terminate_tree(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the child's group, then SIGKILL whatever of its tree is left."""
        if self.proc is None:
            return None
        self.remember_tree()
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        for p in list(self.known):
            if p != pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()
            if not any(_alive(p) for p in self.known | {pid}):
                break
            time.sleep(0.05)
        leftovers = {p for p in self.known | set(process_tree(pid)) if _alive(p)}
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None


# ----------------------------------------------------------------------------- the proxy


def _forward_metadata(context: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in (context.invocation_metadata() or ())
            if not k.startswith(":") and not k.startswith("grpc-") and k not in (
                "user-agent", "content-type", "te")]


def _timeout(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.001)


class ForwardingHandler:
    """A ``grpc.GenericRpcHandler`` forwarding every SglangScheduler RPC to the child (raw
    bytes), with hooks that rewrite chosen unary responses."""

    def __init__(self, channel: Any, fixers: Mapping[str, Callable[[bytes], bytes]]) -> None:
        import grpc
        from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

        self._grpc = grpc
        self.channel = channel
        self.fixers = dict(fixers)
        service = pb.DESCRIPTOR.services_by_name["SglangScheduler"]
        self.handlers: dict[str, Any] = {}
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.server_streaming and not method.client_streaming:
                self.handlers[path] = grpc.unary_stream_rpc_method_handler(
                    self._unary_stream(path))
            elif not method.client_streaming:
                self.handlers[path] = grpc.unary_unary_rpc_method_handler(
                    self._unary_unary(path, self.fixers.get(method.name)))

    def service(self, details: Any) -> Any:
        return self.handlers.get(details.method)

    def _unary_unary(self, path: str, fixer: Callable[[bytes], bytes] | None) -> Any:
        call = self.channel.unary_unary(path)

        async def handler(request: bytes, context: Any) -> bytes:
            reply = await call(request, metadata=_forward_metadata(context),
                               timeout=_timeout(context))
            return fixer(reply) if fixer is not None else reply

        return handler

    def _unary_stream(self, path: str) -> Any:
        call = self.channel.unary_stream(path)

        async def handler(request: bytes, context: Any) -> AsyncIterator[bytes]:
            stream = call(request, metadata=_forward_metadata(context), timeout=_timeout(context))
            try:
                async for item in stream:
                    yield item
            finally:
                stream.cancel()  # the client went away: the child aborts the request

        return handler


class LoadsFallback:
    """``GetLoads`` that survives servicers failing on some sections.

    smg-grpc-servicer 0.8.0 on sglang 0.5.17 raises ``AttributeError`` (gRPC UNKNOWN) whenever
    the disaggregation section is built, i.e. for a request without ``include`` (= all), which
    is what routers send. On UNKNOWN for such a request, the same request is retried with the
    narrower section lists below, and the first list that works is used from then on (so the
    child logs one traceback, not one per load poll). Requests naming sections explicitly are
    forwarded unchanged. Plain Python: each request's ``call(request_bytes) -> reply_bytes``
    does the I/O, and ``is_unknown(exc)`` recognises the UNKNOWN status.
    """

    LADDER: tuple[tuple[str, ...], ...] = (("core", "memory", "spec", "lora", "queues"), ("core",))

    def __init__(self, is_unknown: Callable[[BaseException], bool]) -> None:
        self.is_unknown = is_unknown
        self.step = 0  # 0: forward as asked; n: LADDER[n - 1]

    @staticmethod
    def _wants_all(request: Any) -> bool:
        return not request.include or any(s in ("all", "disagg") for s in request.include)

    def _narrowed(self, request: Any, step: int) -> bytes:
        narrowed = type(request)()
        narrowed.CopyFrom(request)
        del narrowed.include[:]
        narrowed.include.extend(self.LADDER[step - 1])
        return narrowed.SerializeToString()

    async def __call__(self, raw: bytes, call: Callable[[bytes], Awaitable[bytes]]) -> bytes:
        from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

        request = pb.GetLoadsRequest.FromString(raw)
        if not self._wants_all(request):
            return await call(raw)
        step = self.step
        while True:
            try:
                reply = await call(raw if step == 0 else self._narrowed(request, step))
            except Exception as exc:
                if not self.is_unknown(exc) or step >= len(self.LADDER):
                    raise
                step += 1
                getter = getattr(exc, "details", None)
                details = getter() if callable(getter) else exc
                log.warning("GetLoads failed in SGLang's servicer (%s); asking for sections %s "
                            "from now on", str(details)[:200],
                            ",".join(self.LADDER[step - 1]))
                continue
            self.step = step
            return reply


@dataclass
class Wrapper:
    """Everything ``serve_sglang`` needs, built (and testable) without running anything."""

    settings: SglangSettings
    child_argv: list[str]
    command: list[str]
    env: dict[str, str]
    child_port: int
    kv_config: dict[str, Any]
    facts: ModelFacts
    sglang_version: str = ""

    def descriptor(self) -> dict[str, Any] | None:
        from services.worker.kv_events import kv_events_descriptor

        return kv_events_descriptor(self.kv_config, block_size=max(1, self.settings.page_size),
                                    dp_size=max(1, self.settings.dp_size))


def prepare(config: Any, user_argv: Sequence[str], settings: SglangSettings,
            version: str = "", supports_bind: bool | None = None) -> Wrapper:
    """Child command line, environment, KV events config and model facts."""
    if supports_bind is None:
        supports_bind = kv_events_supports_bind()
    # SGLang 0.5.17 derives a gRPC port as --port + 10000 and rejects it above 65535.
    child_port = free_port_block(1)
    while child_port > 55535:
        child_port = free_port_block(1)
    if settings.kv_events_config:
        raw, warning = fix_user_kv_events(settings.kv_events_config, supports_bind)
        if warning:
            log.warning("%s", warning)
        kv = json.loads(raw) if raw.strip().startswith("{") else {}
    else:
        base = free_port_block(max(1, settings.dp_size))
        kv = kv_events_config(base, supports_bind)
        raw = json.dumps(kv)
    args = merge_args(user_argv, child_port=child_port, log_level=config.log_level,
                      kv_config=raw, grpc_mode_flag=settings.grpc_mode_flag)
    return Wrapper(settings, args, build_command(config.sglang_launcher, args), child_env(),
                   child_port, kv, model_facts(settings.model_path, settings.tokenizer_path,
                                               settings.context_length), version)


async def wait_child_ready(target: str, child: ChildProcess, timeout: float) -> None:
    """Until the child's grpc.health reports SglangScheduler SERVING (proxy-less channel)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.net import CHANNEL_OPTIONS

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            code = child.poll()
            if code is not None:
                raise SglangUnavailable(f"SGLang exited with status {code} before it was ready")
            if time.monotonic() > deadline:
                raise SglangUnavailable(f"SGLang was not SERVING after {timeout:g} s")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                         timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)


async def serve_sglang(config: Any, wrapper: Wrapper) -> int:
    """Serves the contract on the user's port, forwarding to the supervised child."""
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    from services.common.grpc_server import GrpcServer
    from services.common.net import CHANNEL_OPTIONS

    target = f"{LOOPBACK}:{wrapper.child_port}"
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    server = GrpcServer(config)
    public: dict[str, Any] = {}

    def fix_model_info_bytes(raw: bytes) -> bytes:
        info = pb.GetModelInfoResponse.FromString(raw)
        name = wrapper.settings.served_model_name or Path(wrapper.settings.model_path).name
        return fix_model_info(info, wrapper.facts, name).SerializeToString()

    def fix_server_info_bytes(raw: bytes) -> bytes:
        info = pb.GetServerInfoResponse.FromString(raw)
        args = info.server_args
        if "kv_events" not in args.fields or \
                args.fields["kv_events"].WhichOneof("kind") == "null_value":
            args.update({"kv_events": wrapper.descriptor()})
        args.update({"host": config.host, "port": public.get("port", config.port),
                     "sglmesh_wrapper": {"child_port": wrapper.child_port,
                                         "sglang_version": wrapper.sglang_version,
                                         "smg_grpc_servicer_version": servicer_version() or "",
                                         "child_command": shlex.join(wrapper.command)}})
        return info.SerializeToString()

    handler = ForwardingHandler(channel, {"GetModelInfo": fix_model_info_bytes,
                                          "GetServerInfo": fix_server_info_bytes})
    loads_call = channel.unary_unary(f"/{SERVICE_NAME}/GetLoads")
    loads_fallback = LoadsFallback(lambda exc: isinstance(exc, grpc.aio.AioRpcError)
                                   and exc.code() == grpc.StatusCode.UNKNOWN)

    async def get_loads(request: bytes, context: Any) -> bytes:
        async def call(raw: bytes) -> bytes:
            return await loads_call(raw, metadata=_forward_metadata(context),
                                    timeout=_timeout(context))

        return await loads_fallback(request, call)

    handler.handlers[f"/{SERVICE_NAME}/GetLoads"] = grpc.unary_unary_rpc_method_handler(get_loads)
    server.add_service(lambda h, s: s.add_generic_rpc_handlers((h,)), handler, SERVICE_NAME)
    public["port"] = await server.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    child = ChildProcess(wrapper.command, wrapper.env)
    log.info("starting SGLang: %s", shlex.join(wrapper.command))
    child.start()
    status = 0
    try:
        ready = asyncio.create_task(wait_child_ready(target, child, config.sglang_ready_timeout))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            ready.cancel()
            return 0
        try:
            ready.result()
        except SglangUnavailable as exc:
            print(f"worker: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_UNAVAILABLE
        child.remember_tree()
        await server.set_serving(True)
        log.info("SGLang is SERVING; sglmesh serves it on %s:%d", config.host, public["port"])
        while not stop.is_set():
            code = child.poll()
            if code is not None:
                print(f"worker: error: SGLang exited with status {code}", file=sys.stderr,
                      flush=True)
                status = code or 1
                break
            child.remember_tree()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return status
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(2.0)
        await channel.close()
        await asyncio.to_thread(child.terminate_tree, 30.0)
        log.info("SGLang process tree stopped")


def main_sglang(config: Any) -> int:
    """``--engine sglang`` from a parsed :class:`WorkerConfig`; returns the exit status."""
    from services.common.grpc_server import run
    from services.worker.preflight import PreflightError, gpu_fit_warning, preflight_model_path

    user_argv = shlex.split(config.sglang_args)
    custom = bool(config.sglang_launcher)
    try:
        version = "" if custom else check_environment()
        settings = parse_sglang_args(user_argv, use_sglang=not custom)
    except SglangUnavailable as exc:
        print(f"worker: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNAVAILABLE
    if not settings.model_path:
        print("worker: error: --engine sglang needs SGLang's --model-path (after `--`)",
              file=sys.stderr, flush=True)
        return 2
    try:
        is_file = settings.model_path.endswith(".gguf")
        # --load-format dummy (random weights: smoke tests, benchmarks) needs no weight files
        preflight_model_path(settings.model_path, allow_gguf_file=True,
                             require_weights=settings.load_format != "dummy",
                             require_tokenizer=not is_file)
        if settings.tokenizer_path:
            preflight_model_path(settings.tokenizer_path, flag="--tokenizer-path",
                                 require_weights=False)
    except PreflightError as exc:
        print(f"worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not custom:
        log.info("SGLang %s, smg-grpc-servicer %s, KV events bind option: %s", version,
                 servicer_version() or "-", kv_events_supports_bind())
    warning = gpu_fit_warning(settings.tp_size, settings.dp_size)
    if warning:
        log.warning("%s", warning)
    wrapper = prepare(config, user_argv, settings, version,
                      supports_bind=None if not custom else False)
    result: list[int] = [1]

    async def go() -> None:
        result[0] = await serve_sglang(config, wrapper)

    try:
        run(go)
    except KeyboardInterrupt:
        pass
    return result[0]
