import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sglmesh.router.v1 import router_admin_pb2 as _router_admin_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerLease(_message.Message):
    __slots__ = ("id", "url", "connection_mode", "model_id", "attempt", "expire_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    url: str
    connection_mode: _router_admin_pb2.ConnectionMode
    model_id: str
    attempt: int
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., url: _Optional[str] = ..., connection_mode: _Optional[_Union[_router_admin_pb2.ConnectionMode, str]] = ..., model_id: _Optional[str] = ..., attempt: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AcquireWorkerRequest(_message.Message):
    __slots__ = ("model_id", "request_id", "routing_key", "routing_text", "exclude_urls", "attempt", "target_worker")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    ROUTING_TEXT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_URLS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_WORKER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    request_id: str
    routing_key: str
    routing_text: str
    exclude_urls: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    target_worker: str
    def __init__(self, model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., routing_key: _Optional[str] = ..., routing_text: _Optional[str] = ..., exclude_urls: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ..., target_worker: _Optional[str] = ...) -> None: ...

class AcquireWorkerResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: WorkerLease
    def __init__(self, lease: _Optional[_Union[WorkerLease, _Mapping]] = ...) -> None: ...

class ReleaseWorkerRequest(_message.Message):
    __slots__ = ("id", "status_code", "relayed", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    RELAYED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status_code: str
    relayed: bool
    message: str
    def __init__(self, id: _Optional[str] = ..., status_code: _Optional[str] = ..., relayed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ReleaseWorkerResponse(_message.Message):
    __slots__ = ("retry", "backoff")
    RETRY_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_FIELD_NUMBER: _ClassVar[int]
    retry: bool
    backoff: _duration_pb2.Duration
    def __init__(self, retry: _Optional[bool] = ..., backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
