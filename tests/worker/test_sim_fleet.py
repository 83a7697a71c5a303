"""``python -m services.worker`` with ``--engine sim`` and the one-process sim fleet, as real
processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import CHANNEL_OPTIONS
from tests.procs import ROOT, ServiceProcess


def generate(target: str, rid: str, ids: list[int]) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        return list(stub.Generate(pb.GenerateRequest(
            request_id=rid, stream=True, tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=pb.SamplingParams(temperature=0, max_new_tokens=3)), timeout=10))


def test_sim_worker_process(embedded_model_dir: Path) -> None:
    with ServiceProcess("worker", ["--engine", "sim", "--sim-decode-ms", "1",
                                   "--model-path", str(embedded_model_dir)]) as worker:
        replies = generate(worker.target, "p1", [5, 6, 7, 8])
        assert replies[-1].complete.completion_tokens == 3
        with grpc.insecure_channel(worker.target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.SglangSchedulerStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.model_path == str(embedded_model_dir)
            bundle = b"".join(c.data for c in stub.GetTokenizer(
                common_pb2.GetTokenizerRequest(), timeout=10))
            assert bundle[:2] == b"PK"  # a zip of the real tokenizer directory


def test_fleet_of_workers_in_one_process(tmp_path: Path) -> None:
    ports = tmp_path / "fleet.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker.sim_fleet", "--count", "6", "--prefill-count",
         "2", "--bootstrap-port", "0", "--ports-file", str(ports), "--sim-decode-ms", "1",
         "--log-level", "warning"], cwd=ROOT, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ports.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads(ports.read_text())
        workers = info["workers"]
        assert [w["role"] for w in workers] == ["prefill"] * 2 + ["decode"] * 4
        assert all(w["bootstrap_port"] for w in workers[:2])
        assert len({w["port"] for w in workers}) == 6
        for w in workers:
            target = w["url"].removeprefix("grpc://")
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
                    service="sglang.grpc.scheduler.SglangScheduler"), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert generate(target, "f1", [9, 9, 9])[-1].complete.completion_tokens == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
