"""``python -m services.worker [sglmesh flags] [-- SGLang flags]``: the worker service.

``--engine torch`` (default) serves the embedded transformers engine, ``--engine sim`` the
simulated engine, ``--engine sglang`` real SGLang as a supervised subprocess (everything after
``--`` goes to SGLang). The model path is checked first (:mod:`services.worker.preflight`):
a bad path ends the process with one clear line and exit status 2.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from services.common.config import parse_config
from services.common.grpc_server import run
from services.common.logs import setup_logging
from services.common.telemetry import setup_tracing
from services.worker.config import WorkerConfig
from services.worker.preflight import PreflightError, preflight_model_path

log = logging.getLogger("services.worker")

EXIT_PREFLIGHT = 2


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(sglmesh flags, SGLang flags): everything after the first ``--`` is SGLang's."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def fail(message: str, status: int = EXIT_PREFLIGHT) -> None:
    print(f"worker: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    ours, extra = split_argv(list(sys.argv[1:] if argv is None else argv))
    config = parse_config(WorkerConfig, ours)
    if extra:
        config.sglang_args = " ".join(filter(None, [config.sglang_args, shlex.join(extra)]))
    if config.sglang_args and config.engine != "sglang":
        fail(f"SGLang flags (after `--` or --sglang-args) need --engine sglang, not "
             f"--engine {config.engine}")
    setup_logging(config.service_name, config.log_level, config.log_json, config.error_log)
    setup_tracing(config.service_name, config.trace_file, config.otlp_endpoint)

    if config.engine == "sglang":
        from services.worker.sglang_engine import main_sglang

        raise SystemExit(main_sglang(config))

    model_dir: Path | None = None
    if config.model_path:
        try:
            model_dir = preflight_model_path(
                config.model_path, require_weights=config.engine != "sim")
        except PreflightError as exc:
            fail(str(exc))
        assert model_dir is not None
        config.model_path = str(model_dir)

    if config.engine == "sim":
        from services.worker.sim_server import serve as serve_sim

        def sim_main():  # type: ignore[no-untyped-def]
            return serve_sim(config, model_dir.resolve() if model_dir else None)

        main_coro = sim_main
    else:
        from services.worker.server import serve

        def main_coro():  # type: ignore[no-untyped-def]
            return serve(config)
    try:
        run(main_coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
