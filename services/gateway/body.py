"""Request bodies a client compressed (``Content-Encoding: gzip`` or ``deflate``)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from services.gateway.errors import OpenAIError, invalid

ENCODINGS = ("gzip", "x-gzip", "deflate")


def inflated(body: bytes, headers: Iterable[tuple[bytes, bytes]], limit: int) -> bytes:
    """``body`` as sent when the ASGI ``headers`` name no ``Content-Encoding``, else inflated;
    413 once it passes ``limit`` (a small body can inflate a thousandfold), 400 for data that
    is not what the header says, 415 for another encoding."""
    encoding = next((v.decode("latin-1").strip().lower() for k, v in headers
                     if k == b"content-encoding"), "")
    if not body or encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise OpenAIError(415, f"Content-Encoding {encoding!r} is not supported: send the body "
                               "as is, gzip or deflate.", "content-encoding")
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or a zlib header, either
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise invalid("content-encoding", f"The body is not valid {encoding} data ({exc})."
                      ) from exc
    if len(out) > limit:
        raise OpenAIError(413, f"Request body inflates to more than {limit} bytes, the limit "
                               "(--max-payload-size).", code="payload_too_large")
    return out
