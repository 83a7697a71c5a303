"""``/v1/responses``: OpenAI's Responses API on the chat pipeline, state in the history service.

A response's prompt is: instructions, then the items of its ``previous_response_id`` chain
(GetResponseChain, oldest first) or of its ``conversation``, then its own input. Nothing is
kept in the gateway except the tasks of background responses it is running, so any replica
(or a restarted gateway) continues a chain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sglmesh.history.v1 import history_pb2 as hpb

from services.common.structs import from_struct, to_struct
from services.gateway.errors import OpenAIError, invalid
from services.gateway.items import items_to_messages, list_page, new_id, normalize_input
from services.gateway.protocol import ChatCompletionRequest, ResponsesRequest
from services.gateway.serving_chat import ChatCompletionService, Delta, Generation
from services.gateway.serving_conversations import (
    ConversationService,
    check_metadata,
    list_call,
    page_params,
)
from services.gateway.storage import Storage, item_from_proto, item_to_proto

log = logging.getLogger(__name__)

# Chat parameter names -> the Responses names a client sent.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text.format", "top_logprobs": "top_logprobs",
           "tool_choice.function.name": "tool_choice.name"}
_LOGPROBS = "message.output_text.logprobs"
# Chat-completion fields a Responses request may carry as extras (SGLang's and OpenAI's).
_CHAT_EXTRAS = ("ignore_eos", "min_tokens", "stop", "frequency_penalty", "presence_penalty",
                "separate_reasoning", "stream_interval")


@dataclass
class Context:
    """One response being produced."""

    tenant: str
    request: ResponsesRequest
    response_id: str
    created_at: int
    input_items: list[dict[str, Any]]
    store: bool
    generation: Generation | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    error: OpenAIError | None = None
    idempotency_key: str = ""


class OutputBuilder:
    """Turns deltas into output items and the typed stream events that build them."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._open: tuple[str, int] | None = None  # (kind, tool index)
        self._calls: dict[int, int] = {}  # tool index -> output index
        # Logprobs of tokens whose text has not come out yet (held back by a stop string's
        # prefix, say): they go with the next text, or with the message when it closes.
        self._logprobs: list[dict[str, Any]] = []

    @property
    def _item(self) -> dict[str, Any]:
        return self.output[-1]

    def _emit(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, **fields})

    def _start(self, kind: str, item: dict[str, Any], tool_index: int = -1) -> None:
        self.close()
        self.output.append(item)
        self._open = (kind, tool_index)
        self._emit("response.output_item.added", output_index=len(self.output) - 1,
                   item=json.loads(json.dumps(item)))
        if kind == "message":
            self._emit("response.content_part.added", item_id=item["id"],
                       output_index=len(self.output) - 1, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [],
                             "logprobs": []})

    def add(self, delta: Delta) -> None:
        self._logprobs += delta.logprobs
        if delta.reasoning:
            if self._open is None or self._open[0] != "reasoning":
                self._start("reasoning", {"id": new_id("rs"), "type": "reasoning",
                                          "status": "in_progress", "summary": [],
                                          "content": [{"type": "reasoning_text", "text": ""}]})
            self._item["content"][0]["text"] += delta.reasoning
            self._emit("response.reasoning_text.delta", item_id=self._item["id"],
                       output_index=len(self.output) - 1, content_index=0,
                       delta=delta.reasoning)
        if delta.text:
            if self._open is None or self._open[0] != "message":
                self._start("message", {"id": new_id("msg"), "type": "message",
                                        "status": "in_progress", "role": "assistant",
                                        "content": [{"type": "output_text", "text": "",
                                                     "annotations": [], "logprobs": []}]})
            part = self._item["content"][0]
            part["text"] += delta.text
            logprobs, self._logprobs = self._logprobs, []
            part["logprobs"] += logprobs
            self._emit("response.output_text.delta", item_id=self._item["id"],
                       output_index=len(self.output) - 1, content_index=0, delta=delta.text,
                       logprobs=logprobs)
        for part in delta.tool_calls:
            if self._open != ("call", part.index):
                if part.index in self._calls:  # a fragment of an earlier call: append quietly
                    self.output[self._calls[part.index]]["arguments"] += part.arguments
                    continue
                self._start("call", {"id": new_id("fc"), "type": "function_call",
                                     "status": "in_progress", "call_id": part.id or new_id("call"),
                                     "name": part.name, "arguments": ""}, part.index)
                self._calls[part.index] = len(self.output) - 1
            if part.arguments:
                self._item["arguments"] += part.arguments
                self._emit("response.function_call_arguments.delta", item_id=self._item["id"],
                           output_index=len(self.output) - 1, delta=part.arguments)

    def close(self) -> None:
        if self._open is None:
            return
        kind = self._open[0]
        index = len(self.output) - 1
        item = self._item
        item["status"] = "completed"
        if kind == "reasoning":
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=item["content"][0]["text"])
        elif kind == "message":
            part = item["content"][0]
            part["logprobs"] += self._logprobs
            self._logprobs = []
            self._emit("response.output_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=part["text"], logprobs=part["logprobs"])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                       content_index=0, part=dict(part))
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"],
                       output_index=index, name=item["name"], arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=index,
                   item=json.loads(json.dumps(item)))
        self._open = None

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def _tools(request: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not request.tools:
        return None
    out = []
    for i, tool in enumerate(request.tools):
        if tool.get("type") != "function":
            raise invalid(f"tools[{i}].type", f"Invalid value for 'tools[{i}].type': only "
                                              "'function' tools are supported.")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid(f"tools[{i}].name", f"Missing required parameter: 'tools[{i}].name'.")
        fn = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object"}}
        if tool.get("description"):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """The chat form; the chat checks (a tool choice needs tools, a named tool must be one of
    them) then name the Responses field (``_PARAMS``)."""
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise invalid("tool_choice", "Invalid 'tool_choice': expected none, auto, required "
                                         "or {\"type\": \"function\", \"name\": ...}.")
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise invalid("tool_choice.name", "Missing required parameter: 'tool_choice.name'.")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    return fmt


def usage_json(generation: Generation | None) -> dict[str, Any]:
    r = generation.result if generation else None
    prompt = r.prompt_tokens if r else 0
    output = r.completion_tokens if r else 0
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": r.cached_tokens if r else 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output}


class ResponsesService:
    def __init__(self, chat: ChatCompletionService, storage: Storage,
                 conversations: ConversationService) -> None:
        self.chat = chat
        self.storage = storage
        self.conversations = conversations
        self.background: dict[str, asyncio.Task[None]] = {}

    # ---- create ------------------------------------------------------------------------------

    async def prepare(self, tenant: str, request: ResponsesRequest, request_id: str,
                      idempotency_key: str = "") -> Context:
        if request.previous_response_id and request.conversation is not None:
            raise invalid("previous_response_id", "'previous_response_id' and 'conversation' "
                                                  "cannot be used together.")
        if request.background and not request.store:
            raise invalid("background", "background responses need store=true.")
        if request.background and request.stream:
            raise invalid("stream", "Streaming a background response is not supported; poll "
                                    "GET /v1/responses/{id} instead.")
        if request.conversation is not None and not request.conversation_id:
            raise invalid("conversation", "Invalid 'conversation': expected an id or {\"id\"}.")
        check_metadata(request.metadata)
        input_items = normalize_input(request.input)
        history: list[dict[str, Any]] = []
        if request.previous_response_id:
            reply = await self.storage.call("GetResponseChain", hpb.GetResponseChainRequest(
                tenant=tenant, response_id=request.previous_response_id), request_id)
            for stored in reply.responses:
                history += [item_from_proto(i) for i in stored.input_items]
                history += [item_from_proto(i) for i in stored.output_items]
        elif request.conversation_id:
            history = await self.conversations.all_items(tenant, request.conversation_id,
                                                         request_id)
        messages = items_to_messages(history + input_items)
        if request.instructions:
            messages.insert(0, {"role": "system", "content": request.instructions})
        if not messages:
            raise invalid("input", "Invalid 'input': expected at least one item.")
        try:
            chat_request = ChatCompletionRequest.model_validate({
                "model": request.model, "messages": messages,
                "max_tokens": request.max_output_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "top_k": request.top_k, "min_p": request.min_p,
                "repetition_penalty": request.repetition_penalty, "seed": request.seed,
                "tools": _tools(request),
                "tool_choice": _tool_choice(request.tool_choice),
                "parallel_tool_calls": request.parallel_tool_calls,
                "response_format": _response_format(request.text),
                # OpenAI returns them when asked through include; top_logprobs says how many
                # alternatives each token gets.
                "logprobs": bool(request.top_logprobs) or _LOGPROBS in (request.include or ()),
                "top_logprobs": request.top_logprobs,
                **{k: v for k, v in (request.model_extra or {}).items() if k in _CHAT_EXTRAS},
            })
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            if field in _CHAT_EXTRAS:  # the client's own extra field, named as sent
                raise invalid(field, f"Invalid '{field}': {first['msg']}.") from exc
            raise invalid("input", f"Invalid 'input': {first['msg']}.") from exc
        response_id = new_id("resp")
        try:
            generations, _ = await self.chat.prepare(chat_request, response_id)
        except OpenAIError as exc:
            exc.param = _PARAMS.get(exc.param or "", exc.param)
            raise
        return Context(tenant, request, response_id, int(time.time()), input_items,
                       request.store or request.conversation_id is not None, generations[0],
                       idempotency_key=idempotency_key)

    def body(self, ctx: Context, status: str, output: list[dict[str, Any]] | None = None,
             error: dict[str, Any] | None = None) -> dict[str, Any]:
        r = ctx.request
        incomplete = ({"reason": "max_output_tokens"} if status == "incomplete" else None)
        return {
            "id": ctx.response_id, "object": "response", "created_at": ctx.created_at,
            "status": status, "background": r.background, "error": error,
            "incomplete_details": incomplete, "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens, "model": r.model,
            "output": output or [], "parallel_tool_calls": r.parallel_tool_calls,
            "previous_response_id": r.previous_response_id,
            "conversation": {"id": r.conversation_id} if r.conversation_id else None,
            "reasoning": {"effort": None, "summary": None}, "store": ctx.store,
            "temperature": r.temperature,
            "text": r.text or {"format": {"type": "text"}},
            "tool_choice": r.tool_choice, "tools": r.tools or [], "top_p": r.top_p,
            "truncation": r.truncation,
            "usage": usage_json(ctx.generation) if status not in ("in_progress", "queued")
            else None,
            "user": r.user, "metadata": r.metadata or {},
        }

    async def events(self, ctx: Context, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """The typed events of one response, storing it before the terminal event."""
        builder = OutputBuilder()
        yield {"type": "response.created", "response": self.body(ctx, "in_progress")}
        yield {"type": "response.in_progress", "response": self.body(ctx, "in_progress")}
        assert ctx.generation is not None
        try:
            async for delta in ctx.generation.deltas():
                builder.add(delta)
                for event in builder.take():
                    yield event
        except OpenAIError as exc:
            ctx.error = exc
            builder.close()
            for event in builder.take():
                yield event
            body = self.body(ctx, "failed", builder.output,
                             {"code": exc.code or "server_error", "message": exc.message})
            if ctx.store:
                await self._store_quietly(ctx, body, request_id)
            yield {"type": "response.failed", "response": body}
            return
        builder.close()
        for event in builder.take():
            yield event
        finish = ctx.generation.result.finish_reason
        status = "incomplete" if finish == "length" else "completed"
        body = self.body(ctx, status, builder.output)
        ctx.output = builder.output
        if ctx.store:
            await self.store(ctx, body, request_id)
        yield {"type": f"response.{status}", "response": body}

    async def store(self, ctx: Context, body: dict[str, Any], request_id: str) -> None:
        r = ctx.request
        stored = hpb.StoredResponse(
            id=ctx.response_id, model=r.model, status=body["status"],
            previous_response_id=r.previous_response_id or "",
            conversation_id=r.conversation_id or "", instructions=r.instructions or "",
            input_items=[item_to_proto(i) for i in ctx.input_items],
            output_items=[item_to_proto(i) for i in body["output"]],
            usage=to_struct(body["usage"] or {}), body=to_struct(body),
            metadata=r.metadata or {})
        await self.storage.call("CreateResponse", hpb.CreateResponseRequest(
            tenant=ctx.tenant, response=stored,
            append_to_conversation=r.conversation_id is not None,
            request_id=ctx.idempotency_key), request_id)

    async def _store_quietly(self, ctx: Context, body: dict[str, Any], request_id: str) -> None:
        try:
            await self.store(ctx, body, request_id)
        except OpenAIError as exc:
            log.warning("response %s: could not store the failed response: %s",
                        ctx.response_id, exc.message)

    async def complete(self, ctx: Context, request_id: str) -> dict[str, Any]:
        if ctx.generation is not None:
            ctx.generation.lockstep = False
        last: dict[str, Any] = {}
        async for event in self.events(ctx, request_id):
            last = event
        if ctx.error is not None:
            raise ctx.error
        return last["response"]  # type: ignore[no-any-return]

    async def stream(self, ctx: Context, request_id: str) -> AsyncIterator[str]:
        sequence = 0
        try:
            async for event in self.events(ctx, request_id):
                event["sequence_number"] = sequence
                sequence += 1
                yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
        except OpenAIError as exc:  # storage failed after the output: still one terminal event
            body = self.body(ctx, "failed", ctx.output,
                             {"code": exc.code or "server_error", "message": exc.message})
            event = {"type": "response.failed", "response": body, "sequence_number": sequence}
            yield f"event: response.failed\ndata: {json.dumps(event)}\n\n"

    # ---- background ----------------------------------------------------------------------------

    async def start_background(self, ctx: Context, request_id: str) -> dict[str, Any]:
        body = self.body(ctx, "in_progress")
        r = ctx.request
        await self.storage.call("CreateResponse", hpb.CreateResponseRequest(
            tenant=ctx.tenant, response=hpb.StoredResponse(
                id=ctx.response_id, model=r.model, status="in_progress",
                previous_response_id=r.previous_response_id or "",
                conversation_id=r.conversation_id or "", instructions=r.instructions or "",
                input_items=[item_to_proto(i) for i in ctx.input_items], body=to_struct(body),
                metadata=r.metadata or {}),
            append_to_conversation=r.conversation_id is not None,
            request_id=ctx.idempotency_key), request_id)
        task = asyncio.create_task(self._run_background(ctx, request_id))
        self.background[ctx.response_id] = task
        task.add_done_callback(lambda _: self.background.pop(ctx.response_id, None))
        return body

    async def _run_background(self, ctx: Context, request_id: str) -> None:
        assert ctx.generation is not None
        ctx.generation.lockstep = False
        builder = OutputBuilder()
        status, error = "completed", None
        try:
            async for delta in ctx.generation.deltas():
                builder.add(delta)
                builder.take()
            builder.close()
            if ctx.generation.result.finish_reason == "length":
                status = "incomplete"
        except asyncio.CancelledError:
            builder.close()
            status = "cancelled"
        except OpenAIError as exc:
            builder.close()
            status, error = "failed", {"code": exc.code or "server_error",
                                       "message": exc.message}
        except Exception as exc:  # a bug: still leave a terminal state behind
            log.exception("background response %s failed", ctx.response_id)
            status, error = "failed", {"code": "server_error", "message": str(exc)}
        body = self.body(ctx, status, builder.output, error)
        await self._update(ctx.tenant, ctx.response_id, body, builder.output, request_id)
        if ctx.request.conversation_id and builder.output:
            copies = [{k: v for k, v in item.items() if k != "id"} for item in builder.output]
            try:
                await self.storage.call("CreateConversationItems",
                                        hpb.CreateConversationItemsRequest(
                                            tenant=ctx.tenant,
                                            conversation_id=ctx.request.conversation_id,
                                            items=[item_to_proto(i) for i in copies]),
                                        request_id)
            except OpenAIError as exc:
                log.warning("response %s: output not appended to the conversation: %s",
                            ctx.response_id, exc.message)

    async def _update(self, tenant: str, response_id: str, body: dict[str, Any],
                      output: list[dict[str, Any]] | None, request_id: str) -> None:
        request = hpb.UpdateResponseRequest(tenant=tenant, response=hpb.StoredResponse(
            id=response_id, status=body["status"],
            output_items=[item_to_proto(i) for i in output or []],
            usage=to_struct(body.get("usage") or {}), body=to_struct(body)))
        request.update_mask.paths.extend(["status", "usage", "body"]
                                         + (["output_items"] if output else []))
        # The update must land even when the request that started it is being cancelled.
        await asyncio.shield(self.storage.call("UpdateResponse", request, request_id))

    async def cancel(self, tenant: str, response_id: str, request_id: str) -> dict[str, Any]:
        current = await self.get(tenant, response_id, request_id)
        if not current.get("background"):
            raise invalid(None, "Only background responses can be cancelled.",
                          code="not_background")
        task = self.background.get(response_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif current.get("status") in ("queued", "in_progress"):
            # Started by another (or a previous) gateway process: mark it; its worker request
            # ends with that process.
            current["status"] = "cancelled"
            await self._update(tenant, response_id, current, None, request_id)
        return await self.get(tenant, response_id, request_id)

    # ---- read / delete -------------------------------------------------------------------------

    async def get(self, tenant: str, response_id: str, request_id: str = "") -> dict[str, Any]:
        reply = await self.storage.call("GetResponse", hpb.GetResponseRequest(
            tenant=tenant, response_id=response_id), request_id)
        body = from_struct(reply.response.body)
        body["status"] = reply.response.status or body.get("status")
        return body

    async def delete(self, tenant: str, response_id: str, request_id: str) -> dict[str, Any]:
        task = self.background.get(response_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.storage.call("DeleteResponse", hpb.DeleteResponseRequest(
            tenant=tenant, response_id=response_id), request_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, tenant: str, response_id: str, after: str | None,
                          limit: str | None, order: str | None, request_id: str = ""
                          ) -> dict[str, Any]:
        size, sort = page_params(limit, order)
        reply = await list_call(self.storage, "ListResponseInputItems",
                                hpb.ListResponseInputItemsRequest(
                                    tenant=tenant, response_id=response_id, page_size=size,
                                    page_token=after or "", order=sort),
                                request_id)
        return list_page([item_from_proto(i) for i in reply.items], bool(reply.next_page_token))
