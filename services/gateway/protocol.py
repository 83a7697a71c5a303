"""OpenAI request/response models (pydantic v2), fields in OpenAI's order.

Unknown fields are accepted (clients send provider-specific extras); SGLang extras follow the
OpenAI fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI's integers are 64-bit (a seed beyond them is a 400, not a silent wrap).
Int64 = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]


class OpenAIModel(BaseModel):
    # NaN and infinities are not numbers a sampler can use: refused as such, not by a bound.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(OpenAIModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    n: int = Field(1, ge=1, le=128)
    parallel_tool_calls: bool = True
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    store: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # SGLang extras
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_token_ids: list[int] | None = None
    # Tokens per streamed worker message after the first (SGLang's per-request
    # stream_interval); None: the worker's own --stream-interval.
    stream_interval: int | None = Field(None, ge=1)
    separate_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: Any = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sglmesh"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ResponsesRequest(OpenAIModel):
    """POST /v1/responses (fields in OpenAI's order; SGLang sampling extras after them)."""

    model: str
    input: str | list[Any]
    background: bool = False
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    text: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    # SGLang extras
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    seed: Int64 | None = None

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, dict):
            value = self.conversation.get("id")
            return value if isinstance(value, str) else None
        return self.conversation


class CompletionRequest(OpenAIModel):
    """POST /v1/completions (legacy): prompt as text, texts, token ids or token id lists."""

    model: str
    prompt: Any
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # SGLang extras
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_token_ids: list[int] | None = None
    stream_interval: int | None = Field(None, ge=1)
    regex: str | None = None

    _stop_list = field_validator("stop")(ChatCompletionRequest._stop_list.__func__)  # type: ignore[attr-defined]


# ---- bodies read field by field by their serving class -------------------------------------
# These routes parse their bodies themselves (a bad value is a 400 naming it); the models
# below describe those bodies in the OpenAPI document (services/gateway/openapi.py).


class EmbeddingRequest(OpenAIModel):
    """POST /v1/embeddings."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class TokenizeRequest(OpenAIModel):
    """POST /v1/tokenize: ``{tokens, count, max_model_len}`` back (lists for a list)."""

    model: str
    prompt: str | list[str]
    add_special_tokens: bool = True


class DetokenizeRequest(OpenAIModel):
    """POST /v1/detokenize: ``{text}`` back."""

    model: str
    tokens: list[int]
    skip_special_tokens: bool = False


class NativeGenerateRequest(OpenAIModel):
    """POST /generate, SGLang's native body: exactly one of ``text`` and ``input_ids``."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    model: str | None = Field(None, description="Optional when the router serves one model.")
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    rid: str | None = None


class RerankRequest(OpenAIModel):
    """POST /v1/rerank (and /rerank): the documents ranked by relevance to the query."""

    model: str
    query: str
    documents: list[str | dict[str, str]]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


class ConversationCreateRequest(OpenAIModel):
    """POST /v1/conversations."""

    items: list[dict[str, Any]] | None = Field(None, max_length=20)
    metadata: dict[str, str] | None = None


class ConversationUpdateRequest(OpenAIModel):
    """POST /v1/conversations/{conversation_id}."""

    metadata: dict[str, str]


class ConversationItemsRequest(OpenAIModel):
    """POST /v1/conversations/{conversation_id}/items."""

    items: list[dict[str, Any]] = Field(max_length=20)


class WorkerAddRequest(OpenAIModel):
    """POST /workers: a queued job that registers the worker (202 with the job)."""

    url: str = Field(description="grpc://host:port or http://host:port")
    worker_type: Literal["regular", "prefill", "decode"] = "regular"
    model_id: str | None = None
    bootstrap_port: int | None = None
    labels: dict[str, str] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's shape."""

    error: ErrorDetail
