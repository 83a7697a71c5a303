"""OpenAI conversation/response items: normalising input, and turning items into chat messages.

Plain Python: no transport types. An item is the OpenAI JSON object (``type`` message,
function_call, function_call_output, reasoning, ...).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from services.gateway.errors import invalid

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
# Content parts (chat's and the Responses API's) -> the keys their payload may sit under; a
# part without one would render as nothing, or fail inside the chat template.
_PART_PAYLOAD = {"text": ("text",), "input_text": ("text",), "output_text": ("text",),
                 "summary_text": ("text",), "reasoning_text": ("text",), "refusal": ("refusal",),
                 "image_url": ("image_url",), "input_image": ("image_url", "file_id"),
                 "input_audio": ("input_audio",), "video_url": ("video_url",), "file": ("file",)}
# Item types a prompt can be built from (reasoning items are kept, not replayed).
_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def integral(value: Any) -> Any:
    """protobuf Struct stores every number as a double: give integral floats back as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def _text_parts(role: str, content: Any, param: str) -> list[dict[str, Any]]:
    kind = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part: dict[str, Any] = {"type": kind, "text": content}
        if kind == "output_text":
            part["annotations"] = []
        return [part]
    if not isinstance(content, list):
        raise invalid(param, f"Invalid value for '{param}': expected a string or a list of "
                             "content parts.")
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{param}[{i}]", f"Invalid content part at '{param}[{i}]': expected "
                                           "an object with a 'type'.")
        check_part_payload(part, f"{param}[{i}]")
        parts.append(part)
    return parts


def check_part_payload(part: dict[str, Any], param: str) -> None:
    """A typed content part carries its payload: ``{"type": "text", "text": "..."}``."""
    keys = _PART_PAYLOAD.get(part["type"])
    if keys is None:
        return
    if all(part.get(key) is None for key in keys):
        either = f" (or {', '.join(keys[1:])})" if len(keys) > 1 else ""
        raise invalid(f"{param}.{keys[0]}",
                      f"Missing required parameter: '{param}.{keys[0]}'{either}.")
    if keys[0] in ("text", "refusal"):  # strings; the others are objects or urls
        if not isinstance(part[keys[0]], str):
            raise invalid(f"{param}.{keys[0]}",
                          f"Invalid type for '{param}.{keys[0]}': expected a string.")


def normalize_input_item(item: Any, param: str) -> dict[str, Any]:
    """One input item as stored: messages get type, status and content parts."""
    if not isinstance(item, dict):
        raise invalid(param, f"Invalid value for '{param}': expected an object.")
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind is None:
        raise invalid(f"{param}.type", f"Missing required parameter: '{param}.type'.")
    if kind not in _ITEM_TYPES:
        hint = ("; send the item itself" if kind == "item_reference" else "")
        raise invalid(f"{param}.type", f"Invalid value for '{param}.type': {kind!r} items are "
                                       f"not supported (supported: {', '.join(_ITEM_TYPES)})"
                                       f"{hint}.")
    out = dict(item)
    out["type"] = kind
    if kind == "message":
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise invalid(f"{param}.role", f"Invalid value for '{param}.role': expected one of "
                                           f"{', '.join(MESSAGE_ROLES)}.")
        if "content" not in item:
            raise invalid(f"{param}.content", f"Missing required parameter: '{param}.content'.")
        out["content"] = _text_parts(role, item["content"], f"{param}.content")
        out.setdefault("status", "completed")
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise invalid(f"{param}.{key}", f"Missing required parameter: '{param}.{key}'.")
        out.setdefault("status", "completed")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise invalid(f"{param}.call_id", f"Missing required parameter: '{param}.call_id'.")
        if "output" not in item:
            raise invalid(f"{param}.output", f"Missing required parameter: '{param}.output'.")
        out.setdefault("status", "completed")
    return out


def normalize_input(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """``input``: a string (one user message) or a list of items."""
    if isinstance(value, str):
        return [normalize_input_item({"role": "user", "content": value}, param)]
    if not isinstance(value, list):
        raise invalid(param, f"Invalid value for '{param}': expected a string or a list of items.")
    return [normalize_input_item(item, f"{param}[{i}]") for i, item in enumerate(value)]


def _content_text(content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    texts = []
    images = []
    for part in content or []:
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif kind == "input_image":
            images.append(part)
    if images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": t} for t in texts]
        parts += [{"type": "image_url", "image_url": {"url": p.get("image_url", "")}}
                  for p in images]
        return parts
    return "".join(texts)


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the template: function calls fold into the assistant turn."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"),
                             "content": _content_text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""),
                                 "arguments": item.get("arguments", "")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and not last.get("content"):
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                             "content": output if isinstance(output, str)
                             else json.dumps(output)})
        # reasoning and other item types are not replayed into the prompt
    return messages


def stored_item(data: dict[str, Any], item_id: str, kind: str, role: str,
                status: str) -> dict[str, Any]:
    """A history item as the client sees it."""
    out = integral(dict(data))
    out["id"] = item_id
    out["type"] = kind or out.get("type", "message")
    if role:
        out["role"] = role
    if status:
        out["status"] = status
    return out


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list shape."""
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more}
