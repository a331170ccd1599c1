"""Collect an upstream stream into one OpenAI `chat.completion` object (`"stream": false`).

The upstream is always called with `stream: true`, so streaming and non-streaming requests
share one path; this state machine accumulates content, `reasoning_content`, tool calls,
logprobs, finish_reason and usage, and `result()` returns the object or raises the `ClientError` the
client must see (nothing was sent yet, so every failure is a plain HTTP error). Plain text,
thinking and tool-call arguments chunks may come as `TextDelta` / `ReasoningDelta` /
`ArgumentsDelta` (the byte path's events): their JSON string literals are decoded one by one,
as parsing each chunk would have.
"""

from __future__ import annotations

from typing import Any

from ds2oai import jsonutil
from ds2oai.errors import ClientError
from ds2oai.events import (
    ArgumentsDelta,
    Chunk,
    Done,
    EndOfBody,
    ReasoningDelta,
    StreamBroken,
    TextDelta,
    UpstreamErrorEvent,
    UpstreamEvent,
)
from ds2oai.upstream_errors import CUT_MESSAGE, broken_error, upstream_event_error

__all__ = ["CompletionCollector"]


class _ToolCall:
    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class CompletionCollector:
    text_literals = True

    def __init__(self, exposed_model: str) -> None:
        self._model = exposed_model
        self._id = ""
        self._created = 0
        self._fingerprint: str | None = None
        self._content: list[str] = []
        self._reasoning: list[str] | None = None
        self._tools: dict[int, _ToolCall] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._logprobs: dict[str, Any] | None = None
        self._error: ClientError | None = None
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def feed(self, event: UpstreamEvent) -> None:
        if self._ended:
            return
        if isinstance(event, Chunk):
            self._chunk(event)
        elif type(event) is TextDelta:
            # A template matched: no finish_reason, no usage, nothing but the text, each a
            # proved JSON string literal (`chunk_template`). An empty one adds "", as harmless
            # as the parsed path's skipping it.
            if self._finish is None:
                self._content.extend(map(jsonutil.loads, event.literals))
        elif type(event) is ReasoningDelta:
            if self._finish is None:
                if self._reasoning is None:
                    self._reasoning = []
                self._reasoning.extend(map(jsonutil.loads, event.literals))
        elif type(event) is ArgumentsDelta:
            if self._finish is None:
                call = self._tools.setdefault(event.index, _ToolCall())
                call.arguments.extend(map(jsonutil.loads, event.literals))
        elif isinstance(event, Done | EndOfBody):
            self._ended = True
            if self._finish is None:
                self._error = broken_error()
        elif isinstance(event, UpstreamErrorEvent):
            self._ended = True
            self._error = upstream_event_error(event.code, event.message)
        elif isinstance(event, StreamBroken):
            self._ended = True
            if self._finish is None:
                self._error = broken_error(event.message, timeout=event.timeout)

    def _chunk(self, chunk: Chunk) -> None:
        if not self._id:
            self._id = chunk.id
            self._created = chunk.created
            fp = chunk.raw.get("system_fingerprint")
            self._fingerprint = fp if isinstance(fp, str) else None
        if chunk.usage is not None:
            self._usage = chunk.usage
        if self._finish is not None:
            return
        if chunk.content:
            self._content.append(chunk.content)
        if isinstance(chunk.logprobs, dict):
            self._add_logprobs(chunk.logprobs)
        if chunk.reasoning is not None:
            if self._reasoning is None:
                self._reasoning = []
            self._reasoning.append(chunk.reasoning)
        for delta in chunk.tool_calls:
            call = self._tools.setdefault(delta.index, _ToolCall())
            call.id = call.id or delta.id
            call.name = call.name or delta.name
            if delta.arguments:
                call.arguments.append(delta.arguments)
        if chunk.finish_reason == "insufficient_system_resource":
            self._ended = True
            self._error = ClientError(
                502, "upstream_error", "insufficient_system_resource", CUT_MESSAGE
            )
        elif chunk.finish_reason is not None:
            self._finish = chunk.finish_reason

    def _add_logprobs(self, logprobs: dict[str, Any]) -> None:
        # Each chunk's `logprobs` lists its own tokens (`content`, and so on); the whole
        # answer's lists are those lists joined, in order, as a non-streamed answer gives them.
        if self._logprobs is None:
            self._logprobs = {}
        for key, value in logprobs.items():
            kept = self._logprobs.get(key)
            if isinstance(value, list):
                if isinstance(kept, list):
                    kept.extend(value)
                else:
                    self._logprobs[key] = list(value)
            elif kept is None:
                self._logprobs[key] = value

    def result(self) -> dict[str, Any]:
        """The `chat.completion` object; raises the client's error if the stream failed."""
        if self._error is not None:
            raise self._error
        if self._finish is None:
            raise broken_error()
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._content) if self._content or not self._tools else None,
        }
        if self._reasoning is not None:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tools:
            message["tool_calls"] = [
                {
                    "id": call.id or f"call_{index}",
                    "type": "function",
                    "function": {"name": call.name or "", "arguments": "".join(call.arguments)},
                }
                for index, call in sorted(self._tools.items())
            ]
        return {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": self._fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": self._logprobs,
                    "finish_reason": self._finish,
                }
            ],
            "usage": self._usage,
        }
