"""Logging setup shared by every service: plain or JSON lines, optional error sink."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra fields given via ``extra=`` are kept."""

    _standard = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._standard and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(service: str, level: str = "info", json_lines: bool = False,
                  error_log: str = "") -> None:
    """Configures the root logger for one service process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter: logging.Formatter
    if json_lines:
        formatter = JsonFormatter(service)
    else:
        formatter = logging.Formatter(
            f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s"
        )
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if error_log:
        errors = logging.FileHandler(error_log)
        errors.setLevel(logging.WARNING)
        errors.setFormatter(formatter)
        root.addHandler(errors)
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless debugging.
    if level != "debug":
        for noisy in ("httpx", "httpcore", "urllib3", "asyncio", "aiosqlite"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
