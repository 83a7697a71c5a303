"""Thin typed async clients over the generated stubs, for programs that call the sglmesh
services directly (without installing the suite).

    async with RouterAdminClient("127.0.0.1:30100") as router:
        job = await router.add_worker("grpc://10.0.0.7:30000", wait=True)
        print([w.url for w in await router.list_workers()])

    async with TokenizerClient("127.0.0.1:30200") as tokenizer:
        ids = await tokenizer.tokenize("my-model", "Hello")

Every method returns the service's own messages (typed by the generated ``.pyi`` files) or
plain Python values, and raises :class:`SglmeshError` — the status code plus the service's
``google.rpc.ErrorInfo`` (which field or worker was wrong) — instead of a bare AioRpcError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from sglmesh.history.v1 import history_pb2 as hist_pb
from sglmesh.history.v1 import history_pb2_grpc as hist_grpc
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc

T = TypeVar("T")
_DETAILS_KEY = "grpc-status-details-bin"
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]


@dataclass
class SglmeshError(Exception):
    """A failed call: its gRPC status and, when the service sent one, its ErrorInfo."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        why = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}: {self.message}{why}"

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> SglmeshError:
        error = cls(exc.code(), exc.details() or "")
        for key, value in exc.trailing_metadata() or ():
            if key != _DETAILS_KEY or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    error.reason, error.domain = info.reason, info.domain
                    error.metadata = dict(info.metadata)
        return error


async def _call(rpc: Awaitable[T]) -> T:
    try:
        return await rpc
    except grpc.aio.AioRpcError as exc:
        raise SglmeshError.from_rpc(exc) from exc


def _target(address: str) -> str:
    for scheme in ("grpc://", "dns:///"):
        if address.startswith(scheme):
            return address[len(scheme):]
    return address


class _Client:
    """Owns its channel when given an address; uses a given channel as it is."""

    def __init__(self, target: str | grpc.aio.Channel, timeout: float | None = 30.0) -> None:
        self._owned = isinstance(target, str)
        self.channel: grpc.aio.Channel = (
            grpc.aio.insecure_channel(_target(target), options=_CHANNEL_OPTIONS)
            if isinstance(target, str) else target)
        self.timeout = timeout

    async def close(self) -> None:
        if self._owned:
            await self.channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    # (services.common.structs is the suite's faster one; this package installs without it)
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


@dataclass
class RenderedChat:
    prompt: str
    token_ids: list[int]


class TokenizerClient(_Client):
    """``sglmesh.tokenizer.v1.TokenizerService``."""

    def __init__(self, target: str | grpc.aio.Channel, timeout: float | None = 30.0) -> None:
        super().__init__(target, timeout)
        self.stub = tok_grpc.TokenizerServiceStub(self.channel)

    async def list_tokenizers(self) -> list[tok_pb.TokenizerInfo]:
        reply = await _call(self.stub.ListTokenizers(tok_pb.ListTokenizersRequest(),
                                                     timeout=self.timeout))
        return list(reply.tokenizers)

    async def tokenize(self, model: str, texts: str | Sequence[str],
                       add_special_tokens: bool = True) -> list[int] | list[list[int]]:
        """Token ids of one text, or one list per text."""
        single = isinstance(texts, str)
        reply = await _call(self.stub.Tokenize(tok_pb.TokenizeRequest(
            model=model, texts=[texts] if single else list(texts),
            add_special_tokens=add_special_tokens), timeout=self.timeout))
        results = [list(r.token_ids) for r in reply.results]
        return results[0] if single else results

    async def detokenize(self, model: str, sequences: Sequence[Sequence[int]],
                         skip_special_tokens: bool = True) -> list[str]:
        reply = await _call(self.stub.Detokenize(tok_pb.DetokenizeRequest(
            model=model, sequences=[tok_pb.TokenIds(token_ids=list(s)) for s in sequences],
            skip_special_tokens=skip_special_tokens), timeout=self.timeout))
        return list(reply.texts)

    async def render_chat(self, model: str, messages: Sequence[Mapping[str, Any]], *,
                          tools: Sequence[Mapping[str, Any]] = (),
                          add_generation_prompt: bool = True,
                          template_kwargs: Mapping[str, Any] | None = None) -> RenderedChat:
        """The model's chat template applied to OpenAI-style messages, and its token ids."""
        request = tok_pb.RenderChatRequest(
            model=model, messages=[_struct(m) for m in messages],
            tools=[_struct(t) for t in tools], add_generation_prompt=add_generation_prompt)
        if template_kwargs:
            request.template_kwargs.CopyFrom(_struct(template_kwargs))
        reply = await _call(self.stub.RenderChat(request, timeout=self.timeout))
        return RenderedChat(reply.prompt, list(reply.token_ids))


class RouterAdminClient(_Client):
    """``sglmesh.router.v1.RouterAdminService``: the router's control plane."""

    WORKER_TYPES = {"regular": admin_pb.WORKER_TYPE_REGULAR,
                    "prefill": admin_pb.WORKER_TYPE_PREFILL,
                    "decode": admin_pb.WORKER_TYPE_DECODE}
    _DONE = (admin_pb.JOB_STATE_SUCCEEDED, admin_pb.JOB_STATE_FAILED)

    def __init__(self, target: str | grpc.aio.Channel, timeout: float | None = 30.0) -> None:
        super().__init__(target, timeout)
        self.stub = admin_grpc.RouterAdminServiceStub(self.channel)

    async def add_worker(self, url: str, *, worker_type: str = "regular", model_id: str = "",
                         bootstrap_port: int | None = None,
                         labels: Mapping[str, str] | None = None, wait: bool = False,
                         wait_timeout: float = 120.0) -> admin_pb.Job:
        """Queues the registration; with ``wait`` returns the finished job (a failed one
        raises SglmeshError with the job's message)."""
        if worker_type not in self.WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {sorted(self.WORKER_TYPES)}")
        request = admin_pb.AddWorkerRequest(url=url, worker_type=self.WORKER_TYPES[worker_type],
                                            model_id=model_id, labels=dict(labels or {}))
        if bootstrap_port is not None:
            request.bootstrap_port = bootstrap_port
        reply = await _call(self.stub.AddWorker(request, timeout=self.timeout))
        return await self.wait_job(reply.job.id, wait_timeout) if wait else reply.job

    async def remove_worker(self, url: str, wait: bool = False,
                            wait_timeout: float = 120.0) -> admin_pb.Job:
        reply = await _call(self.stub.RemoveWorker(admin_pb.RemoveWorkerRequest(url=url),
                                                   timeout=self.timeout))
        return await self.wait_job(reply.job.id, wait_timeout) if wait else reply.job

    async def get_job(self, job_id: str) -> admin_pb.Job:
        reply = await _call(self.stub.GetJob(admin_pb.GetJobRequest(id=job_id),
                                             timeout=self.timeout))
        return reply.job

    async def wait_job(self, job_id: str, timeout: float = 120.0,
                       poll_secs: float = 0.1) -> admin_pb.Job:
        """The job once it has succeeded; SglmeshError if it failed or outlived ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job.state == admin_pb.JOB_STATE_SUCCEEDED:
                return job
            if job.state == admin_pb.JOB_STATE_FAILED:
                raise SglmeshError(grpc.StatusCode.FAILED_PRECONDITION, job.message,
                                   "JOB_FAILED", metadata={"job_id": job.id,
                                                           "worker": job.worker_url})
            if time.monotonic() > deadline:
                raise SglmeshError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"job {job_id} still {admin_pb.JobState.Name(job.state)} "
                                   f"after {timeout} s", "JOB_TIMEOUT",
                                   metadata={"job_id": job.id})
            await asyncio.sleep(poll_secs)

    async def list_workers(self, model_id: str = "", worker_type: str = "") -> list[admin_pb.Worker]:
        request = admin_pb.ListWorkersRequest(model_id=model_id)
        if worker_type:
            request.worker_type = self.WORKER_TYPES[worker_type]
        reply = await _call(self.stub.ListWorkers(request, timeout=self.timeout))
        return list(reply.workers)

    async def get_worker(self, url: str) -> admin_pb.Worker:
        reply = await _call(self.stub.GetWorker(admin_pb.GetWorkerRequest(url=url),
                                                timeout=self.timeout))
        return reply.worker

    async def list_models(self) -> list[admin_pb.Model]:
        reply = await _call(self.stub.ListModels(admin_pb.ListModelsRequest(),
                                                 timeout=self.timeout))
        return list(reply.models)

    async def loads(self, model_id: str = "") -> list[admin_pb.WorkerLoad]:
        reply = await _call(self.stub.GetLoads(admin_pb.GetLoadsRequest(model_id=model_id),
                                               timeout=self.timeout))
        return list(reply.loads)

    async def flush_cache(self, url: str = "") -> list[admin_pb.FlushCacheResult]:
        """Flushes one worker's prefix cache, or every worker's when ``url`` is empty."""
        reply = await _call(self.stub.FlushCache(admin_pb.FlushCacheRequest(url=url),
                                                 timeout=self.timeout))
        return list(reply.results)


def message_item(role: str, text: str, **extra: Any) -> hist_pb.Item:
    """A conversation item: a message with one text part (OpenAI's item shape)."""
    kind = "output_text" if role == "assistant" else "input_text"
    return hist_pb.Item(type="message", role=role, data=_struct(
        {"content": [{"type": kind, "text": text}], **extra}))


class HistoryClient(_Client):
    """``sglmesh.history.v1.HistoryService``: conversations, their items, stored responses.
    Every call is scoped to ``tenant`` (the gateway uses one per API key)."""

    def __init__(self, target: str | grpc.aio.Channel, tenant: str = "default",
                 timeout: float | None = 30.0) -> None:
        super().__init__(target, timeout)
        self.tenant = tenant
        self.stub = hist_grpc.HistoryServiceStub(self.channel)

    async def create_conversation(self, items: Sequence[hist_pb.Item] = (),
                                  metadata: Mapping[str, str] | None = None,
                                  request_id: str = "") -> hist_pb.Conversation:
        """``request_id`` makes a retry return the first call's conversation."""
        reply = await _call(self.stub.CreateConversation(hist_pb.CreateConversationRequest(
            tenant=self.tenant, metadata=dict(metadata or {}), items=list(items),
            request_id=request_id), timeout=self.timeout))
        return reply.conversation

    async def get_conversation(self, conversation_id: str) -> hist_pb.Conversation:
        reply = await _call(self.stub.GetConversation(hist_pb.GetConversationRequest(
            tenant=self.tenant, conversation_id=conversation_id), timeout=self.timeout))
        return reply.conversation

    async def update_metadata(self, conversation_id: str,
                              metadata: Mapping[str, str]) -> hist_pb.Conversation:
        reply = await _call(self.stub.UpdateConversation(hist_pb.UpdateConversationRequest(
            tenant=self.tenant,
            conversation=hist_pb.Conversation(id=conversation_id, metadata=dict(metadata)),
            update_mask=field_mask_pb2.FieldMask(paths=["metadata"])), timeout=self.timeout))
        return reply.conversation

    async def delete_conversation(self, conversation_id: str) -> None:
        await _call(self.stub.DeleteConversation(hist_pb.DeleteConversationRequest(
            tenant=self.tenant, conversation_id=conversation_id), timeout=self.timeout))

    async def add_items(self, conversation_id: str, items: Sequence[hist_pb.Item],
                        request_id: str = "") -> list[hist_pb.Item]:
        reply = await _call(self.stub.CreateConversationItems(
            hist_pb.CreateConversationItemsRequest(
                tenant=self.tenant, conversation_id=conversation_id, items=list(items),
                request_id=request_id), timeout=self.timeout))
        return list(reply.items)

    async def items(self, conversation_id: str, newest_first: bool = False,
                    page_size: int = 100) -> AsyncIterator[hist_pb.Item]:
        """Every item of the conversation, page by page."""
        token = ""
        order = hist_pb.SORT_ORDER_DESC if newest_first else hist_pb.SORT_ORDER_ASC
        while True:
            reply = await _call(self.stub.ListConversationItems(
                hist_pb.ListConversationItemsRequest(
                    tenant=self.tenant, conversation_id=conversation_id, page_size=page_size,
                    page_token=token, order=order), timeout=self.timeout))
            for item in reply.items:
                yield item
            token = reply.next_page_token
            if not token:
                return

    async def delete_item(self, conversation_id: str, item_id: str) -> None:
        await _call(self.stub.DeleteConversationItem(hist_pb.DeleteConversationItemRequest(
            tenant=self.tenant, conversation_id=conversation_id, item_id=item_id),
            timeout=self.timeout))

    async def get_response(self, response_id: str) -> hist_pb.StoredResponse:
        reply = await _call(self.stub.GetResponse(hist_pb.GetResponseRequest(
            tenant=self.tenant, response_id=response_id), timeout=self.timeout))
        return reply.response

    async def response_chain(self, response_id: str, max_depth: int = 0
                             ) -> list[hist_pb.StoredResponse]:
        """The response and its ``previous_response_id`` ancestors (``max_depth`` 0: the
        service's limit)."""
        reply = await _call(self.stub.GetResponseChain(hist_pb.GetResponseChainRequest(
            tenant=self.tenant, response_id=response_id, max_depth=max_depth),
            timeout=self.timeout))
        return list(reply.responses)

    async def delete_response(self, response_id: str) -> None:
        await _call(self.stub.DeleteResponse(hist_pb.DeleteResponseRequest(
            tenant=self.tenant, response_id=response_id), timeout=self.timeout))


__all__ = ["HistoryClient", "RenderedChat", "RouterAdminClient", "SglmeshError",
           "TokenizerClient", "message_item"]
