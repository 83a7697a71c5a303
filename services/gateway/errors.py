"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` + status code."""

from __future__ import annotations

from typing import Any

import grpc

from services.common.errors import ErrorCode, error_details

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    501: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error the gateway answers with; ``param`` names the offending request field."""

    retry_after = 1  # seconds; the gateway sets it from --retry-after-secs

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        # The SDKs retry 408/409/429/5xx; deterministic failures say so.
        if self.status in (429, 503):
            return {"retry-after": str(OpenAIError.retry_after),
                    "retry-after-ms": str(OpenAIError.retry_after * 1000)}
        if 400 <= self.status < 500:
            return {"x-should-retry": "false"}
        return {}


def invalid(param: str | None, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


_REASON_CODES = {
    "MODEL_NOT_FOUND": "model_not_found",
    "NO_HEALTHY_WORKER": "no_healthy_worker",
    "STORAGE_UNAVAILABLE": "storage_unavailable",
}


def from_grpc(exc: grpc.aio.AioRpcError | grpc.RpcError, service: str) -> OpenAIError:
    """Maps a failed internal call to the error the client sees."""
    remote = error_details(exc)
    status = remote.code.http_status
    if remote.code is ErrorCode.UNAVAILABLE and not remote.reason:
        message = f"{service} is unavailable: {remote.message}"
    else:
        message = remote.message or f"{service} failed ({remote.code.name})"
    param = remote.metadata.get("field")
    code = _REASON_CODES.get(remote.reason, remote.reason.lower() or None)
    if remote.code is ErrorCode.CANCELLED:
        status = 499
    if remote.code is ErrorCode.RESOURCE_EXHAUSTED and not code:
        code = "rate_limit_exceeded"
    if remote.code is ErrorCode.UNAVAILABLE and not code:
        code = "service_unavailable"
    return OpenAIError(status, message, param=param, code=code)


def from_history(exc: grpc.aio.AioRpcError | grpc.RpcError) -> OpenAIError:
    """History failures: storage outages are 503 ``storage_unavailable`` (retryable)."""
    error = from_grpc(exc, "history")
    if error.status in (503, 504) or exc.code() in (  # type: ignore[union-attr]
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return OpenAIError(503, f"Conversation and response storage is unavailable: "
                                f"{error.message}", code="storage_unavailable")
    return error
