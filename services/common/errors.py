"""Errors as gRPC status codes carrying one ``google.rpc.ErrorInfo`` (AIP-193).

Domain code raises :class:`ServiceError`; servicers let it propagate and the server
interceptor turns it into a rich status. Clients read it back with :func:`error_details`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class ErrorCode(enum.Enum):
    """The gRPC status codes sglmesh uses, with the HTTP status the gateway maps them to."""

    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400)
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401)
    PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, 403)
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404)
    ALREADY_EXISTS = (grpc.StatusCode.ALREADY_EXISTS, 409)
    FAILED_PRECONDITION = (grpc.StatusCode.FAILED_PRECONDITION, 400)
    OUT_OF_RANGE = (grpc.StatusCode.OUT_OF_RANGE, 400)
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
    CANCELLED = (grpc.StatusCode.CANCELLED, 499)
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504)
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503)
    UNIMPLEMENTED = (grpc.StatusCode.UNIMPLEMENTED, 501)
    INTERNAL = (grpc.StatusCode.INTERNAL, 500)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode) -> ErrorCode:
        for member in cls:
            if member.grpc_code == code:
                return member
        return cls.INTERNAL


@dataclass
class ServiceError(Exception):
    """A failure with a status code, a stable UPPER_SNAKE reason and a human message."""

    code: ErrorCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    domain: str = "sglmesh"

    def __str__(self) -> str:
        return self.message

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain, metadata=self.metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.grpc_code.name),
            message=self.message,
            details=[detail],
        )
        return rpc_status.to_status(status)


def invalid_argument(field_name: str, message: str, reason: str = "INVALID_ARGUMENT",
                     domain: str = "sglmesh") -> ServiceError:
    """An INVALID_ARGUMENT naming the offending field (``metadata["field"]``)."""
    return ServiceError(ErrorCode.INVALID_ARGUMENT, reason, message, {"field": field_name}, domain)


def not_found(what: str, ident: str, domain: str = "sglmesh") -> ServiceError:
    return ServiceError(
        ErrorCode.NOT_FOUND, f"{what.upper()}_NOT_FOUND", f"{what} {ident!r} not found",
        {what: ident}, domain,
    )


@dataclass
class RemoteError:
    """What a client learns from a failed call."""

    code: ErrorCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def error_details(exc: grpc.aio.AioRpcError | grpc.RpcError) -> RemoteError:
    """Reads code, message and the ErrorInfo (if any) out of a failed call."""
    code = ErrorCode.from_grpc(exc.code())  # type: ignore[union-attr]
    message = exc.details() or ""  # type: ignore[union-attr]
    result = RemoteError(code=code, message=message)
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except Exception:  # a malformed trailer never hides the original error
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                result.reason, result.domain = info.reason, info.domain
                result.metadata = dict(info.metadata)
    return result
