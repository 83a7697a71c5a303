"""``--engine sglang``: everything of the wrapper that runs without a GPU.

SGLang itself cannot run here (no GPU, no sglang wheel), so the process-level tests start the
wrapper with ``--sglang-launcher`` pointing at ``FAKE_SGLANG`` below: a STAND-IN for
``python -m sglang.launch_server --grpc-mode``, written for these tests. It serves the same
``SglangScheduler`` contract with the placeholders real SGLang's gRPC mode reports (vocab
128256, no EOS ids, the KV pool size as context length), turns grpc.health SERVING after a
short "warm-up", and spawns grandchildren (one in its own session) so the teardown of the whole
process tree is tested for real.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import CHANNEL_OPTIONS
from services.worker import sglang_engine as se
from services.worker.preflight import gpu_fit_warning
from tests.procs import ROOT, ServiceProcess

FAKE_SGLANG = textwrap.dedent('''
    """STAND-IN for SGLang's gRPC mode (tests only): not SGLang."""
    import argparse, asyncio, json, os, signal, subprocess, sys
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from google.protobuf import struct_pb2
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    p = argparse.ArgumentParser()
    p.add_argument("--model-path"); p.add_argument("--host"); p.add_argument("--port", type=int)
    p.add_argument("--kv-events-config"); p.add_argument("--log-level")
    p.add_argument("--grpc-mode", action="store_true")
    args, rest = p.parse_known_args()
    report = os.environ["FAKE_SGLANG_REPORT"]
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]),
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True)]
    with open(report, "w") as fh:
        json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "kids": [k.pid for k in kids],
                   "no_grpc_proxy": os.environ.get("no_grpc_proxy", ""),
                   "no_proxy": os.environ.get("no_proxy", "")}, fh)
    if args.host != "127.0.0.1" or not args.grpc_mode:
        sys.exit(9)

    class Servicer(pb_grpc.SglangSchedulerServicer):
        async def GetModelInfo(self, request, context):
            return pb.GetModelInfoResponse(
                model_path=args.model_path, tokenizer_path=args.model_path, is_generation=True,
                vocab_size=128256, eos_token_ids=[], pad_token_id=0, bos_token_id=1,
                max_context_length=1930514, max_req_input_len=8186,
                id2label_json='{"0":"LABEL_0","1":"LABEL_1"}', num_labels=2)
        async def GetServerInfo(self, request, context):
            sa = struct_pb2.Struct()
            sa.update({"kv_events_config": args.kv_events_config, "tp_size": 1,
                       "host": args.host, "port": args.port})
            return pb.GetServerInfoResponse(server_args=sa, server_type="grpc",
                                            sglang_version="0.0-stand-in")
        async def Generate(self, request, context):
            ids = list(request.tokenized.input_ids)
            if not ids:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input_ids is empty")
            md = dict(context.invocation_metadata())
            n = request.sampling_params.max_new_tokens or 3
            for i in range(n):
                yield pb.GenerateResponse(request_id=md.get("x-echo", request.request_id),
                    chunk=pb.GenerateStreamChunk(token_ids=[ids[i % len(ids)]],
                                                 prompt_tokens=len(ids), completion_tokens=i + 1))
            yield pb.GenerateResponse(request_id=request.request_id, complete=pb.GenerateComplete(
                output_ids=[ids[i % len(ids)] for i in range(n)], finish_reason="length"))

    async def main():
        server = grpc.aio.server()
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        pb_grpc.add_SglangSchedulerServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"{args.host}:{args.port}")
        await server.start()
        name = "sglang.grpc.scheduler.SglangScheduler"
        await hs.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(0.5)  # "warm-up"
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)   # exits, leaving its children behind for the wrapper to reap

    asyncio.run(main())
''')


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


# ----------------------------------------------------------------------------- pure functions


def test_merge_args_owns_host_port_grpc_mode_and_kv_events() -> None:
    user = ["--model-path", "/m", "--host", "0.0.0.0", "--port=30000", "--smg-grpc-mode",
            "--kv-events-config", '{"publisher":"zmq"}', "--tp-size", "2"]
    out = se.merge_args(user, child_port=41000, log_level="warning", kv_config="{J}")
    assert out == ["--model-path", "/m", "--tp-size", "2", "--grpc-mode", "--host", "127.0.0.1",
                   "--port", "41000", "--kv-events-config", "{J}", "--log-level", "warning"]
    kept = se.merge_args(["--model-path", "/m", "--log-level", "debug"], child_port=1,
                         log_level="info", kv_config="{}")
    assert kept.count("--log-level") == 1 and "debug" in kept


def test_command_and_env() -> None:
    assert se.build_command("", ["--a"]) == [sys.executable, "-m", "sglang.launch_server", "--a"]
    assert se.build_command("python3 /x/fake.py", ["--a"]) == ["python3", "/x/fake.py", "--a"]
    env = se.child_env({"no_proxy": "corp.internal", "http_proxy": "http://proxy:3128"})
    for key in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        assert {"127.0.0.1", "localhost", "::1"} <= set(env[key].split(","))
    assert env["no_proxy"].startswith("corp.internal,") and env["PYTHONUNBUFFERED"] == "1"
    assert env["http_proxy"] == "http://proxy:3128"  # other traffic keeps its proxy


def test_kv_events_config_binds_where_it_delivers() -> None:
    old = se.kv_events_config(5557, supports_bind=False)  # sglang 0.5.17: bind only wildcard
    assert old == {"publisher": "zmq", "endpoint": "tcp://*:5557"}
    new = se.kv_events_config(5557, supports_bind=True)
    assert new == {"publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", "bind": True}
    fixed, warning = se.fix_user_kv_events(
        '{"publisher":"zmq","endpoint":"tcp://127.0.0.1:6000"}', supports_bind=False)
    assert json.loads(fixed)["endpoint"] == "tcp://*:6000" and warning and "connect" in warning
    same, none = se.fix_user_kv_events(
        '{"publisher":"zmq","endpoint":"tcp://127.0.0.1:6000"}', supports_bind=True)
    assert none is None and json.loads(same)["endpoint"] == "tcp://127.0.0.1:6000"
    assert se.kv_events_supports_bind() is False  # no sglang installed here


def test_descriptor_from_the_kv_config() -> None:
    w = se.Wrapper(se.SglangSettings(page_size=16, dp_size=2), [], [], {}, 1,
                   se.kv_events_config(7000, supports_bind=False), se.ModelFacts())
    assert w.descriptor() == {"publisher": "zmq", "endpoint_host": "*",
                              "endpoint_port_base": 7000, "topic": "", "block_size": 16,
                              "dp_size": 2}


class StandInServerArgs:
    """A STAND-IN for sglang.srt.server_args.ServerArgs (SGLang is not installed here)."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model-path", "--model", dest="model_path")
        parser.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int,
                            default=1)
        parser.add_argument("--dp-size", dest="dp_size", type=int, default=1)
        parser.add_argument("--page-size", dest="page_size", type=int, default=1)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> StandInServerArgs:
        return cls(ns)

    def check_server_args(self) -> None:
        if self.ns.tp_size not in (1, 2, 4, 8):
            raise ValueError(f"tp_size {self.ns.tp_size} is not a power of two")


def test_parse_with_sglangs_own_parser_interface() -> None:
    s = se.parse_sglang_args(["--model", "/m", "--tensor-parallel-size", "4", "--page-size", "16"],
                             server_args_cls=StandInServerArgs)
    assert (s.model_path, s.tp_size, s.page_size) == ("/m", 4, 16)
    assert s.grpc_mode_flag == "--grpc-mode"  # the stand-in has no --smg-grpc-mode

    class Newer(StandInServerArgs):  # 0.5.2x: --smg-grpc-mode exists, --grpc-mode is its alias
        @staticmethod
        def add_cli_args(parser: argparse.ArgumentParser) -> None:
            StandInServerArgs.add_cli_args(parser)
            parser.add_argument("--smg-grpc-mode", "--grpc-mode", action="store_true")

    newer = se.parse_sglang_args(["--model", "/m"], server_args_cls=Newer)
    assert newer.grpc_mode_flag == "--smg-grpc-mode"
    assert se.merge_args([], child_port=1, log_level="", kv_config="{}",
                         grpc_mode_flag=newer.grpc_mode_flag)[0] == "--smg-grpc-mode"
    with pytest.raises(se.SglangUnavailable, match="power of two"):
        se.parse_sglang_args(["--model", "/m", "--tp-size", "3"], server_args_cls=StandInServerArgs)
    with pytest.raises(se.SglangUnavailable, match="invalid SGLang flags"):
        se.parse_sglang_args(["--model", "/m", "--no-such-flag"], server_args_cls=StandInServerArgs)
    with pytest.raises(se.SglangUnavailable, match="ServerArgs"):
        se.parse_sglang_args(["--model", "/m"])  # the real one: not importable here


def test_environment_checks() -> None:
    with pytest.raises(se.SglangUnavailable, match="not installed"):
        se.check_environment(gpus=1)


def test_gpu_fit_warning_names_both_numbers() -> None:
    warning = gpu_fit_warning(2, 2, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert warning and "2 x 2 = 4" in warning and "only 2 visible" in warning
    assert "CUDA_VISIBLE_DEVICES" in warning
    assert gpu_fit_warning(2, 1, env={"CUDA_VISIBLE_DEVICES": "0,1"}) is None
    assert gpu_fit_warning(1, 1, env={"CUDA_VISIBLE_DEVICES": ""}) is not None


def test_model_info_placeholders_are_fixed(embedded_model_dir: Path) -> None:
    facts = se.model_facts(str(embedded_model_dir))
    assert facts.vocab_size == 49152 and facts.eos_token_ids == [2] and facts.context_length == 8192
    info = pb.GetModelInfoResponse(vocab_size=128256, max_context_length=1930514, is_generation=True,
                                   max_req_input_len=8186, pad_token_id=0, bos_token_id=1,
                                   id2label_json='{"0":"LABEL_0","1":"LABEL_1"}', num_labels=2)
    se.fix_model_info(info, facts, "SmolLM2")
    assert (info.vocab_size, list(info.eos_token_ids), info.max_context_length) == (49152, [2], 8192)
    assert info.max_req_input_len == 8186 and info.num_labels == 0 and not info.id2label_json
    assert info.served_model_name == "SmolLM2" and info.architectures == ["LlamaForCausalLM"]
    ctx = se.model_facts(str(embedded_model_dir), context_length=4096)
    assert ctx.context_length == 4096


def test_process_tree_teardown(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    pids = tmp_path / "pids.json"
    script.write_text(textwrap.dedent(f'''
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a child that ignores SIGTERM
        kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]),
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                 start_new_session=True)]
        json.dump([k.pid for k in kids], open({str(pids)!r}, "w"))
        time.sleep(300)
    '''))
    child = se.ChildProcess([sys.executable, str(script)])
    child.start()
    deadline = time.monotonic() + 10
    while not pids.exists() or not pids.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)
    kids = json.loads(pids.read_text())
    tree = [child.pid, *kids]
    assert all(alive(p) for p in tree)
    assert set(kids) <= set(se.process_tree(child.pid))
    child.terminate_tree(grace=1.0)
    assert wait_gone(tree, 5) == []


# ----------------------------------------------------------------------------- real processes


def test_without_sglang_the_engine_exits_with_one_line(embedded_model_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.worker", "--engine", "sglang", "--", "--model-path",
         str(embedded_model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SGLang" in lines[0] and "not installed" in lines[0], proc.stderr


@pytest.fixture
def fake_launcher(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "fake_sglang.py"
    script.write_text(FAKE_SGLANG)
    return f"{sys.executable} {script}", tmp_path / "report.json"


def test_wrapper_proxies_fixes_and_tears_down(embedded_model_dir: Path,
                                              fake_launcher: tuple[str, Path]) -> None:
    launcher, report = fake_launcher
    dead_proxy = "http://127.0.0.1:9"
    env = {"FAKE_SGLANG_REPORT": str(report), "grpc_proxy": dead_proxy, "http_proxy": dead_proxy,
           "https_proxy": dead_proxy, "no_proxy": "", "no_grpc_proxy": ""}
    worker = ServiceProcess("worker", ["--engine", "sglang", "--sglang-launcher", launcher,
                                       "--log-level", "info", "--", "--model-path",
                                       str(embedded_model_dir), "--port", "1234",
                                       "--host", "0.0.0.0"],
                            host="0.0.0.0", env=env, ready_timeout=60)
    with worker:
        facts = json.loads(report.read_text())
        argv = facts["argv"]
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--grpc-mode" in argv
        assert "1234" not in argv and "0.0.0.0" not in argv
        kv = json.loads(argv[argv.index("--kv-events-config") + 1])
        assert kv["publisher"] == "zmq" and kv["endpoint"].startswith("tcp://*:")
        assert "127.0.0.1" in facts["no_grpc_proxy"].split(",")
        with grpc.insecure_channel(worker.target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.SglangSchedulerStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert (info.vocab_size, list(info.eos_token_ids), info.max_context_length) == \
                (49152, [2], 8192)
            assert info.served_model_name == embedded_model_dir.name
            server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            desc = server.server_args["kv_events"]
            assert desc["publisher"] == "zmq" and desc["endpoint_host"] == "*"
            assert desc["endpoint_port_base"] == int(kv["endpoint"].rsplit(":", 1)[1])
            assert server.server_args["port"] == worker.port
            replies = list(stub.Generate(pb.GenerateRequest(
                request_id="r1", tokenized=pb.TokenizedInput(input_ids=[7, 8]), stream=True,
                sampling_params=pb.SamplingParams(max_new_tokens=3)),
                metadata=[("x-echo", "via-metadata")], timeout=10))
            assert [r.chunk.token_ids[0] for r in replies[:3]] == [7, 8, 7]
            assert replies[0].request_id == "via-metadata"  # metadata is forwarded
            assert replies[-1].complete.finish_reason == "length"
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(request_id="bad"), timeout=5))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # status relayed
        tree = [facts["pid"], *facts["kids"]]
        assert all(alive(p) for p in tree)
    assert worker.proc is not None and worker.proc.returncode == 0
    assert wait_gone(tree) == []


def test_wrapper_exits_when_sglang_dies(embedded_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "dies.py"
    script.write_text("import sys; print('boom', file=sys.stderr); sys.exit(7)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "services.worker", "--engine", "sglang", "--port", "0",
         "--sglang-launcher", f"{sys.executable} {script}", "--", "--model-path",
         str(embedded_model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "SGLang exited with status 7 before it was ready" in proc.stderr


def test_sigterm_while_sglang_loads(embedded_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import time; time.sleep(300)\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--engine", "sglang", "--port", "0",
         "--sglang-launcher", f"{sys.executable} {script}", "--", "--model-path",
         str(embedded_model_dir)], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 20
    kids: list[int] = []
    while time.monotonic() < deadline and not kids:
        kids = [p for p in se.process_tree(proc.pid) if p != proc.pid]
        time.sleep(0.1)
    assert kids, "the wrapper never started its child"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0
    assert wait_gone(kids) == []


def test_unused_namespace_helper() -> None:
    s = se._settings_from(SimpleNamespace(model_path="/m", tp_size=None), ["--model-path", "/m"])
    assert s.model_path == "/m" and s.tp_size == 1
