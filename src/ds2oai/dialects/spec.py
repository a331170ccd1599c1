"""The "spec" dialect (SPEC §3): named events `response.created`, `response.output_text.delta`,
`response.completed`, `response.error`, each `event: <name>` + one `data:` JSON line.

States: WAITING (nothing sent) -> STREAMING (created sent) -> FINISHING (a finish_reason was
seen; waiting for `[DONE]` or the end of the body, usage may still arrive) -> ENDED. A stream is
`completed` only after a finish_reason; `insufficient_system_resource` is an upstream error, and
a body that ends or breaks before any finish_reason is `upstream_stream_broken`.
"""

from __future__ import annotations

import logging
from typing import Any

from ds2oai import jsonutil
from ds2oai.dialects.base import ChunkDialect, State
from ds2oai.events import Chunk
from ds2oai.sse import encode_event
from ds2oai.upstream_errors import CUT_MESSAGE

__all__ = ["SpecDialect", "usage_fields"]

log = logging.getLogger(__name__)


def usage_fields(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """The three OpenAI usage counters from a DeepSeek usage object (None stays None)."""
    if usage is None:
        return None
    return {
        "completion_tokens": usage.get("completion_tokens"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }


class SpecDialect(ChunkDialect):
    __slots__ = ("_delta_head", "_finish", "_id", "_model", "_usage")

    def __init__(self, exposed_model: str) -> None:
        super().__init__()
        self._model = exposed_model
        self._id = ""
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._delta_head = b""

    def _chunk(self, chunk: Chunk) -> bytes:
        out = b""
        if chunk.usage is not None:
            self._usage = chunk.usage
        if self._state is State.WAITING:
            self._id = chunk.id
            self._state = State.STREAMING
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
        if self._state is State.FINISHING:
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
            out += self._end_error("upstream_error", "upstream_error", CUT_MESSAGE, finish)
        elif finish is not None:
            self._finish = finish
            self._state = State.FINISHING
        return out

    def _text(self, literals: list[bytes]) -> bytes:
        head = self._delta_head
        if len(literals) == 1:  # a paced stream's usual read: no join, no scan
            literal = literals[0]
            return b"" if literal == b'""' else head + literal + b"}\n\n"
        # One join for the run; an empty text makes no event (as in `_chunk`).
        out = head + (b"}\n\n" + head).join(literals) + b"}\n\n"
        if out.find(b'""}') >= 0:
            out = out.replace(head + b'""}\n\n', b"")
        return out

    def _reasoning(self, literals: list[bytes]) -> bytes:
        return b""  # SPEC §3 has no event for thinking (as in `_chunk`)

    def _arguments(self, index: int, literals: list[bytes]) -> bytes:
        return b""  # nor for tool calls (as in `_chunk`)

    def _completed(self) -> bytes:
        return encode_event(
            "response.completed",
            jsonutil.dumps(
                {"id": self._id, "finish_reason": self._finish, "usage": usage_fields(self._usage)}
            ),
        )

    def _error(self, outcome: str, type_: str, message: str, code: str | None) -> bytes:
        data: dict[str, Any] = {"type": type_, "message": message}
        if code is not None:
            data["code"] = code
        return encode_event("response.error", jsonutil.dumps(data))
