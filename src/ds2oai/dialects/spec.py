"""The "spec" dialect (SPEC §3): named events `response.created`, `response.output_text.delta`,
`response.completed`, `response.error`, each `event: <name>` + one `data:` JSON line.

States: WAITING (nothing sent) -> STREAMING (created sent) -> FINISHING (a finish_reason was
seen; waiting for `[DONE]` or the end of the body, usage may still arrive) -> ENDED. A stream is
`completed` only after a finish_reason; `insufficient_system_resource` is an upstream error, and
a body that ends or breaks before any finish_reason is `upstream_stream_broken`.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from ds2oai import jsonutil
from ds2oai.events import (
    Chunk,
    Done,
    EndOfBody,
    StreamBroken,
    UpstreamErrorEvent,
    UpstreamEvent,
)
from ds2oai.sse import encode_event
from ds2oai.upstream_errors import BROKEN_MESSAGE, CUT_MESSAGE

__all__ = ["SpecDialect", "usage_fields"]

log = logging.getLogger(__name__)


class _State(enum.Enum):
    WAITING = 0
    STREAMING = 1
    FINISHING = 2
    ENDED = 3


def usage_fields(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """The three OpenAI usage counters from a DeepSeek usage object (None stays None)."""
    if usage is None:
        return None
    return {
        "completion_tokens": usage.get("completion_tokens"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }


class SpecDialect:
    media_type = "text/event-stream"

    __slots__ = ("_delta_head", "_finish", "_id", "_model", "_outcome", "_state", "_usage")

    def __init__(self, exposed_model: str) -> None:
        self._model = exposed_model
        self._state = _State.WAITING
        self._id = ""
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._outcome: str | None = None
        self._delta_head = b""

    @property
    def outcome(self) -> str | None:
        return self._outcome

    def feed(self, event: UpstreamEvent) -> bytes:
        if self._state is _State.ENDED:
            return b""
        if isinstance(event, Chunk):
            return self._chunk(event)
        if isinstance(event, Done | EndOfBody):
            if self._state is _State.FINISHING:
                return self._completed()
            return self._error("upstream_broken", "upstream_stream_broken", BROKEN_MESSAGE)
        if isinstance(event, UpstreamErrorEvent):
            return self._error("upstream_error", "upstream_error", event.message, event.code)
        if isinstance(event, StreamBroken):
            if self._state is _State.FINISHING:
                # The answer is whole (finish_reason seen); only [DONE] or a late usage is lost.
                return self._completed()
            outcome = "timeout" if event.timeout else "upstream_broken"
            return self._error(outcome, "upstream_stream_broken", event.message)
        raise TypeError(f"unknown upstream event {event!r}")  # pragma: no cover

    def _chunk(self, chunk: Chunk) -> bytes:
        out = b""
        if chunk.usage is not None:
            self._usage = chunk.usage
        if self._state is _State.WAITING:
            self._id = chunk.id
            self._state = _State.STREAMING
            # The delta event differs only in its text: keep the bytes before it.
            self._delta_head = (
                b'event: response.output_text.delta\ndata: {"id":'
                + jsonutil.dumps(chunk.id)
                + b',"role":"assistant","delta":'
            )
            out = encode_event(
                "response.created",
                jsonutil.dumps({"id": chunk.id, "model": self._model, "created": chunk.created}),
            )
        if self._state is _State.FINISHING:
            return out  # after finish_reason only usage matters
        content = chunk.content
        if content:
            role = chunk.role
            if role is None or role == "assistant":
                out += self._delta_head + jsonutil.dumps(content) + b"}\n\n"
            else:
                out += encode_event(
                    "response.output_text.delta",
                    jsonutil.dumps({"id": self._id, "role": role, "delta": content}),
                )
        finish = chunk.finish_reason
        if finish == "insufficient_system_resource":
            out += self._error("upstream_error", "upstream_error", CUT_MESSAGE, finish)
        elif finish is not None:
            self._finish = finish
            self._state = _State.FINISHING
        return out

    def _completed(self) -> bytes:
        self._state = _State.ENDED
        self._outcome = "completed"
        return encode_event(
            "response.completed",
            jsonutil.dumps(
                {"id": self._id, "finish_reason": self._finish, "usage": usage_fields(self._usage)}
            ),
        )

    def _error(self, outcome: str, type_: str, message: str, code: str | None = None) -> bytes:
        self._state = _State.ENDED
        self._outcome = outcome
        data: dict[str, Any] = {"type": type_, "message": message}
        if code is not None:
            data["code"] = code
        return encode_event("response.error", jsonutil.dumps(data))
