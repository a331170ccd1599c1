"""The OpenAI Chat Completions stream dialect (`chat.completion.chunk`), for unmodified SDKs.

Bare `data: <json>` lines (no `event:`, `id:` or `retry:` lines), ending with `data: [DONE]`.
Each upstream chunk becomes one OpenAI chunk: the exposed model name, `role` only in the first
delta, `content`, `reasoning_content` and tool-call fragments passed on. Usage follows the
OpenAI rule: only when the client asked (`stream_options.include_usage`), every chunk then has
`"usage": null` and one extra `choices: []` chunk carries the totals right before `[DONE]`.

States: WAITING -> STREAMING -> FINISHING (finish_reason forwarded; waiting for `[DONE]` or
the end of the body, usage may still arrive) -> ENDED. A failure after the first byte is a
final `data: {"error": {...}}` chunk (the SDK raises `APIError` on it), then `[DONE]`.
`insufficient_system_resource` is such an error: a cut answer is never a success.
"""

from __future__ import annotations

from typing import Any

from ds2oai import jsonutil
from ds2oai.dialects.base import ChunkDialect, State
from ds2oai.events import Chunk
from ds2oai.sse import encode_data
from ds2oai.upstream_errors import CUT_MESSAGE

__all__ = ["ChatDialect"]

_DONE = b"data: [DONE]\n\n"


class ChatDialect(ChunkDialect):
    __slots__ = (
        "_arguments_heads",
        "_arguments_prefix",
        "_created",
        "_fingerprint",
        "_id",
        "_include_usage",
        "_model",
        "_reasoning_glue",
        "_reasoning_head",
        "_text_glue",
        "_text_head",
        "_text_tail",
        "_usage",
    )

    def __init__(self, exposed_model: str, *, include_usage: bool = False) -> None:
        super().__init__()
        self._model = exposed_model
        self._include_usage = include_usage
        self._id = ""
        self._created = 0
        self._fingerprint: str | None = None
        self._usage: dict[str, Any] | None = None
        self._text_head = b""
        self._text_tail = b""
        self._text_glue = b""
        self._reasoning_head = b""
        self._reasoning_glue = b""
        self._arguments_prefix = b""
        self._arguments_heads: dict[int, bytes] = {}  # by tool-call index

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": self._fingerprint,
            "choices": choices,
        }
        if self._include_usage:
            obj["usage"] = None
        return obj

    def _chunk(self, chunk: Chunk) -> bytes:
        if chunk.usage is not None:
            self._usage = chunk.usage
        first = self._state is State.WAITING
        if first:
            self._id = chunk.id
            self._created = chunk.created
            fp = chunk.raw.get("system_fingerprint")
            self._fingerprint = fp if isinstance(fp, str) else None
            self._state = State.STREAMING
            head = jsonutil.dumps(self._envelope([]))  # ...,"choices":[]} or ...,"usage":null}
            cut = head.index(b'"choices":[]')
            self._text_head = head[:cut] + b'"choices":[{"index":0,"delta":{"content":'
            self._text_tail = (
                b'},"logprobs":null,"finish_reason":null}]' + head[cut + 12 :] + b"\n\n"
            )
            self._text_head = b"data: " + self._text_head
            self._text_glue = self._text_tail + self._text_head
            # A thinking chunk has the same envelope; its delta holds only the reasoning text.
            self._reasoning_head = (
                b"data: " + head[:cut] + b'"choices":[{"index":0,"delta":{"reasoning_content":'
            )
            self._reasoning_glue = self._text_tail + self._reasoning_head
            # A tool call's arguments fragment: the same envelope, `_chunk`'s delta for it.
            self._arguments_prefix = (
                b"data: " + head[:cut] + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":'
            )
        if self._state is State.FINISHING or not chunk.has_choice:
            return b""  # usage-only chunks are re-emitted in OpenAI form at the end
        finish = chunk.finish_reason
        if (
            not first
            and finish is None
            and chunk.content is not None
            and chunk.reasoning is None
            and not chunk.tool_calls
            and chunk.logprobs is None
        ):
            # The common chunk: only its text differs from the last one; splice pre-encoded bytes.
            return self._text_head + jsonutil.dumps(chunk.content) + self._text_tail
        cut = finish == "insufficient_system_resource"
        if cut:
            finish = None  # the chunk's own delta still goes out, then the error
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = chunk.role or "assistant"
            # null stays null (a tool call's or a thinking model's first chunk), as OpenAI
            # streams it and as the collected answer has it.
            delta["content"] = chunk.content
        elif chunk.content:  # an empty one would turn a tool call's null content into ""
            delta["content"] = chunk.content
        if chunk.reasoning is not None:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.tool_calls:
            calls = []
            for call in chunk.tool_calls:
                item: dict[str, Any] = {"index": call.index}
                if call.id is not None:
                    item["id"] = call.id
                    item["type"] = "function"
                function: dict[str, str] = {}
                if call.name is not None:
                    function["name"] = call.name
                if call.arguments is not None:
                    function["arguments"] = call.arguments
                item["function"] = function
                calls.append(item)
            delta["tool_calls"] = calls
        out = b""
        if delta or finish is not None or chunk.logprobs is not None:
            if finish is not None:
                self._state = State.FINISHING
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": chunk.logprobs,
                "finish_reason": finish,
            }
            out = encode_data(jsonutil.dumps(self._envelope([choice])))
        if cut:
            return out + self._end_error(
                "upstream_error", "upstream_error", CUT_MESSAGE, "insufficient_system_resource"
            )
        return out

    def _text(self, literals: list[bytes]) -> bytes:
        if len(literals) == 1:  # a paced stream's usual read: no join
            return self._text_head + literals[0] + self._text_tail
        return self._text_head + self._text_glue.join(literals) + self._text_tail

    def _reasoning(self, literals: list[bytes]) -> bytes:
        if len(literals) == 1:
            return self._reasoning_head + literals[0] + self._text_tail
        return self._reasoning_head + self._reasoning_glue.join(literals) + self._text_tail

    def _arguments(self, index: int, literals: list[bytes]) -> bytes:
        head = self._arguments_heads.get(index)
        if head is None:
            head = self._arguments_prefix + b'%d,"function":{"arguments":' % index
            self._arguments_heads[index] = head
        tail = b"}}]" + self._text_tail
        if len(literals) == 1:
            return head + literals[0] + tail
        return head + (tail + head).join(literals) + tail

    def _completed(self) -> bytes:
        out = b""
        if self._include_usage and self._usage is not None:
            obj = self._envelope([])
            obj["usage"] = self._usage
            out = encode_data(jsonutil.dumps(obj))
        return out + _DONE

    def _error(self, outcome: str, type_: str, message: str, code: str | None) -> bytes:
        if code is None:
            code = "timeout" if outcome == "timeout" else type_
        error = {"message": message, "type": type_, "param": None, "code": code}
        return encode_data(jsonutil.dumps({"error": error})) + _DONE
