"""The OpenAI Responses API stream dialect (`POST /v1/responses`), for unmodified SDKs.

A sans-IO state machine from normalized upstream events (`ds2oai.events`) to the Responses
wire format (reference/PROTOCOLS.md A.3-A.7, B.3): every event is `event: <type>` + one
compact `data:` JSON line repeating `type` with a `sequence_number` counting from 0; no
`[DONE]`. It touches nothing but its own state: no aiohttp, no store, no clock of its own (a
completed response's `completed_at` comes from the `clock` it is given). The reframe
stage feeds it and writes the bytes; a non-streaming request feeds it the same events, drops
the bytes and answers `response()`. `assistant_message()` gives the turn back as one DeepSeek
chat message for the conversation store; `seal` (optional) turns reasoning text into the
opaque `encrypted_content` blob.

States: WAITING (nothing sent) -> STREAMING (`response.created` + `response.in_progress` sent
on the first chunk; output items are opened and closed one after the other: reasoning ->
message / function calls, one `function_call` item per DeepSeek tool-call index; see
"Parallel tool calls" below) -> FINISHING
(a finish_reason was seen and every item closed; waiting for `[DONE]` or the end of the body,
since usage may come in a later chunk) -> ENDED (exactly one terminal event sent; `feed`
returns b"" from then on). Terminal events: `stop`/`tool_calls` -> `response.completed`;
`length`/`content_filter` -> `response.incomplete`; `insufficient_system_resource`, an
upstream error event, or a body that ends/breaks/stalls before any finish_reason ->
`response.failed`. Once a finish_reason was seen, a broken body only loses `[DONE]` or a late
usage chunk, so the finish reason decides the terminal event.

Why no `error` event before `response.failed` (PROTOCOLS A.7 suggests sending both): the
openai SDK raises `APIError` on the first event whose data has a top-level "error" key (B.2),
so `response.failed` after it would be unreachable, and a stream would carry two terminal
events. `response.failed` alone is one terminal event, every SDK version parses it (its data
has a "response" key, no top-level "error"), it carries `response.error {code, message}`, and
`get_final_response()` still raises because no `response.completed` came.

Parallel tool calls: DeepSeek sends each call's fragments in one run, and the Responses wire
format (like OpenAI's own streams) closes a call's item before the next item opens. But an
upstream may interleave the fragments of parallel calls, and a closed item cannot take more
arguments. So a new item closes an open call only if the call's arguments so far are a whole
JSON object or array (no valid fragment can follow it); a call still incomplete stays open,
takes its later fragments by its `output_index`, and is closed at the finish_reason.
Sequential calls keep the usual order; interleaved ones lose nothing.

Plain text, thinking and tool-call arguments chunks may also come as JSON string literals
(`feed_text`, `feed_reasoning`, `feed_arguments`, or `TextDelta` / `ReasoningDelta` /
`ArgumentsDelta` through `feed`): the delta event is then written around the literal from
bytes prepared once per item, and the literal decoded once for the item's text. The result is
the same event as for the parsed chunk (its JSON may escape the text differently).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ds2oai import jsonutil
from ds2oai.events import (
    ArgumentsDelta,
    Chunk,
    Done,
    EndOfBody,
    ReasoningDelta,
    StreamBroken,
    TextDelta,
    ToolCallDelta,
    UpstreamErrorEvent,
    UpstreamEvent,
)
from ds2oai.responses_input import new_id
from ds2oai.sse import encode_event
from ds2oai.upstream_errors import BROKEN_MESSAGE, CUT_MESSAGE, sanitize_message

__all__ = ["RESPONSE_DEFAULTS", "ResponsesDialect", "response_usage"]

log = logging.getLogger(__name__)

# Request-derived fields of the Response object when the request did not set them (A.2).
RESPONSE_DEFAULTS: Mapping[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "previous_response_id": None,
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "temperature": 1.0,
    "top_p": 1.0,
    "text": {"format": {"type": "text"}},
    "reasoning": {"effort": None, "summary": None},
    "truncation": "disabled",
    "store": True,
    "metadata": {},
    "user": None,
}
_FIXED = frozenset(
    {"id", "object", "created_at", "status", "model", "output", "usage", "error"}
    | {"incomplete_details", "completed_at"}
)


class _State(enum.Enum):
    WAITING = 0
    STREAMING = 1
    FINISHING = 2
    ENDED = 3


def _whole_json(text: str) -> bool:
    """A whole JSON object or array: no fragment appended to it can be valid JSON (a number
    could go on: `1` then `2`). Tool arguments are objects."""
    try:
        value = jsonutil.loads(text)
    except jsonutil.JSONDecodeError:
        return False
    return isinstance(value, dict | list)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def response_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A DeepSeek usage object in Responses form (None stays None)."""
    if usage is None:
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    cached = usage.get("prompt_cache_hit_tokens")
    if not isinstance(cached, int) or isinstance(cached, bool):
        details = usage.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    details = usage.get("completion_tokens_details")
    reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    total = usage.get("total_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": _int(total) if total is not None else prompt + completion,
    }


class _Item:
    """One output item: kind "reasoning", "message" or "function_call"."""

    __slots__ = (
        "call_id",
        "delta_head",
        "encrypted",
        "id",
        "index",
        "kind",
        "logprobs",
        "name",
        "parts",
        "status",
    )

    def __init__(self, kind: str, index: int, item_id: str) -> None:
        self.kind = kind
        self.index = index
        self.id = item_id
        self.status = "in_progress"
        self.parts: list[str] = []  # text, reasoning text or argument fragments
        self.logprobs: list[Any] = []  # a message's token log probabilities, when asked for
        self.call_id = ""
        self.name = ""
        self.encrypted: str | None = None
        # Its delta events' bytes after the sequence number, up to the text (`_delta`).
        self.delta_head: bytes | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def part(self) -> dict[str, Any]:
        """The content part of a reasoning or message item, as of now."""
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        return {
            "type": "output_text",
            "text": self.text,
            "annotations": [],
            "logprobs": self.logprobs,
        }

    def to_json(self, *, announce: bool = False) -> dict[str, Any]:
        """The item as `response.output` holds it (`announce`: as `output_item.added` shows it)."""
        if self.kind == "function_call":
            return {
                "type": "function_call",
                "id": self.id,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": "" if announce else self.text,
                "status": self.status,
            }
        content = [] if announce else [self.part()]
        if self.kind == "reasoning":
            item: dict[str, Any] = {
                "type": "reasoning",
                "id": self.id,
                "summary": [],
                "content": content,
            }
            if self.encrypted is not None:
                item["encrypted_content"] = self.encrypted
            item["status"] = self.status
            return item
        return {
            "type": "message",
            "id": self.id,
            "role": "assistant",
            "status": self.status,
            "content": content,
        }


_DELTA_TYPES = {
    "message": "response.output_text.delta",
    "reasoning": "response.reasoning_text.delta",
    "function_call": "response.function_call_arguments.delta",
}
# `_emit`'s bytes for an item kind's delta event, in pieces: before the sequence number, and
# after the text.
_DELTA_START = {
    kind: b"event: " + t.encode() + b'\ndata: {"type":"' + t.encode() + b'","sequence_number":'
    for kind, t in _DELTA_TYPES.items()
}
_DELTA_END = {
    "message": b',"logprobs":[]}\n\n',
    "reasoning": b"}\n\n",
    "function_call": b"}\n\n",
}


class ResponsesDialect:
    media_type = "text/event-stream"
    text_literals = True

    __slots__ = (
        "_calls",
        "_clock",
        "_completed_at",
        "_created_at",
        "_echo",
        "_error",
        "_finish",
        "_id",
        "_incomplete",
        "_items",
        "_model",
        "_open",
        "_open_calls",
        "_outcome",
        "_seal",
        "_seq",
        "_state",
        "_status",
        "_upstream_error",
        "_usage",
    )

    def __init__(
        self,
        *,
        response_id: str,
        created_at: int,
        model: str,
        echo: Mapping[str, Any],
        seal: Callable[[str], str] | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._id = response_id
        self._created_at = created_at
        # `completed_at` when the answer completes; without a clock, `created_at` stands in.
        self._clock = clock
        self._completed_at: int | None = None
        self._model = model
        self._echo = {k: v for k, v in echo.items() if k not in _FIXED}
        self._seal = seal
        self._state = _State.WAITING
        self._seq = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None  # the open reasoning or message item, if any
        self._open_calls: list[_Item] = []  # open function_call items, in output order
        self._calls: dict[int, _Item] = {}  # DeepSeek tool-call index -> its item
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._status = "in_progress"
        self._error: dict[str, Any] | None = None
        self._incomplete: dict[str, Any] | None = None
        self._outcome: str | None = None
        self._upstream_error: tuple[str, str] | None = None

    # --- the Dialect protocol -------------------------------------------------------------

    def feed_text(self, literal: bytes) -> bytes:
        return self._literal("message", literal)

    def feed_reasoning(self, literal: bytes) -> bytes:
        return self._literal("reasoning", literal)

    def feed_arguments(self, index: int, literal: bytes) -> bytes:
        return self._arguments_literal(index, literal)

    @property
    def outcome(self) -> str | None:
        return self._outcome

    @property
    def upstream_error(self) -> tuple[str, str] | None:
        """(code, message) of the upstream's error when the outcome is `upstream_error`, as the
        chat routes answer it when nothing was sent yet."""
        return self._upstream_error

    def feed(self, event: UpstreamEvent) -> bytes:
        if self._state is _State.ENDED:
            return b""
        if type(event) is TextDelta:
            return b"".join([self._literal("message", literal) for literal in event.literals])
        if isinstance(event, Chunk):
            return self._chunk(event)
        if type(event) is ReasoningDelta:
            return b"".join([self._literal("reasoning", literal) for literal in event.literals])
        if type(event) is ArgumentsDelta:
            index = event.index
            return b"".join([self._arguments_literal(index, lit) for lit in event.literals])
        out = self._start() if self._state is _State.WAITING else b""
        if self._state is _State.FINISHING:
            # The answer is whole: [DONE], the end of the body, or a failure that only lost
            # [DONE] or a late usage chunk, all end it as its finish_reason says.
            return out + self._terminal()
        if isinstance(event, Done | EndOfBody):
            return out + self._failed("upstream_broken", BROKEN_MESSAGE)
        if isinstance(event, StreamBroken):
            outcome = "timeout" if event.timeout else "upstream_broken"
            return out + self._failed(outcome, event.message)
        if isinstance(event, UpstreamErrorEvent):
            self._upstream_error = (event.code, sanitize_message(event.message))
            message = sanitize_message(f"Upstream error ({event.code}): {event.message}")
            return out + self._failed("upstream_error", message)
        raise TypeError(f"unknown upstream event {event!r}")  # pragma: no cover

    def fail(self, type_: str, code: str, message: str) -> bytes:
        # A Response's error code is one of OpenAI's fixed set: `_failed` writes server_error.
        if self._state is _State.ENDED:
            # Its terminal event was made but never reached the client (a stage dropped it):
            # the stream's own `error` event, numbered on.
            return self._emit("error", {"code": code, "message": message, "param": None})
        out = self._start() if self._state is _State.WAITING else b""
        return out + self._failed("upstream_broken", message)

    # --- results ------------------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        """The Response object as of now (final once `outcome` is set)."""
        return self._response(self._status, [item.to_json() for item in self._items])

    def output_items(self) -> list[dict[str, Any]]:
        return [item.to_json() for item in self._items]

    def assistant_message(self) -> dict[str, Any] | None:
        """This turn as one DeepSeek chat assistant message; None if nothing was produced."""
        text = "".join(i.text for i in self._items if i.kind == "message")
        reasoning = [i.text for i in self._items if i.kind == "reasoning"]
        calls = [i for i in self._items if i.kind == "function_call"]
        if not text and not reasoning and not calls:
            return None
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.text},
                }
                for call in calls
            ]
        return message

    # --- internals ----------------------------------------------------------------------------

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self._id,
            "object": "response",
            "created_at": self._created_at,
            "status": status,
            "model": self._model,
            "output": output,
            "usage": response_usage(self._usage) if status != "in_progress" else None,
            "error": self._error,
            "incomplete_details": self._incomplete,
        }
        if status == "completed":
            obj["completed_at"] = self._completed_at
        for key, default in RESPONSE_DEFAULTS.items():
            obj[key] = self._echo.get(key, default)
        for key, value in self._echo.items():
            obj.setdefault(key, value)
        return obj

    def _emit(self, type_: str, fields: dict[str, Any]) -> bytes:
        data = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return encode_event(type_, jsonutil.dumps(data))

    def _start(self) -> bytes:
        self._state = _State.STREAMING
        created = self._response("in_progress", [])
        return self._emit("response.created", {"response": created}) + self._emit(
            "response.in_progress", {"response": created}
        )

    def _chunk(self, chunk: Chunk) -> bytes:
        out = self._start() if self._state is _State.WAITING else b""
        if chunk.usage is not None:
            self._usage = chunk.usage
        if self._state is not _State.STREAMING:
            return out  # after the finish_reason only usage matters
        if chunk.reasoning:
            out += self._text("reasoning", chunk.reasoning)
        if chunk.content:
            out += self._text("message", chunk.content, _token_logprobs(chunk.logprobs))
        for delta in chunk.tool_calls:
            out += self._tool_call(delta)
        finish = chunk.finish_reason
        if finish is not None:
            complete = finish in ("stop", "tool_calls")
            out += self._close_all(status="completed" if complete else "incomplete")
            self._finish = finish
            self._state = _State.FINISHING
        return out

    def _open_item(self, kind: str, prefix: str) -> tuple[_Item, bytes]:
        out = self._close_text() + self._close_whole_calls()
        item = _Item(kind, len(self._items), new_id(prefix))
        self._items.append(item)
        if kind == "function_call":
            self._open_calls.append(item)
        else:
            self._open = item
        return item, out

    def _text(self, kind: str, delta: str, logprobs: list[Any] | None = None) -> bytes:
        """A reasoning or content delta: open the item (and its one part) if needed."""
        item = self._open
        out = b""
        if item is None or item.kind != kind:
            item, out = self._open_item(kind, "rs" if kind == "reasoning" else "msg")
            out += self._emit(
                "response.output_item.added",
                {"output_index": item.index, "item": item.to_json(announce=True)},
            )
            out += self._emit(
                "response.content_part.added", {**self._where(item), "part": item.part()}
            )
        item.parts.append(delta)
        fields = {**self._where(item), "delta": delta}
        if kind == "reasoning":
            return out + self._emit("response.reasoning_text.delta", fields)
        if logprobs:
            item.logprobs.extend(logprobs)
        return out + self._emit(
            "response.output_text.delta", {**fields, "logprobs": logprobs or []}
        )

    def _literal(self, kind: str, literal: bytes) -> bytes:
        """A chunk holding nothing but this text (a valid JSON string literal): what `_chunk`
        writes for it, the delta event built around the literal when its item is open.

        Called from the upstream read callback too (the splice), which hands a read that
        raised back to the reader: so nothing changes before the last step that can fail."""
        if self._state is not _State.STREAMING:
            # Literals come only after a parsed chunk started the stream; after the
            # finish_reason text no longer counts (as in `_chunk`).
            return b""
        if literal == b'""':
            return b""  # `_chunk` skips an empty text
        item = self._open
        if item is None or item.kind != kind:
            return self._text(kind, jsonutil.loads(literal))  # opens the item
        return self._delta(item, literal)

    def _arguments_literal(self, index: int, literal: bytes) -> bytes:
        """A chunk holding only a fragment of tool call `index`'s arguments (a valid JSON
        string literal): what `_chunk` writes for it, as `_literal` does for text."""
        if self._state is not _State.STREAMING:
            return b""
        item = self._calls.get(index)
        if item is None or item.status != "in_progress" or literal == b'""':
            # A new or closed call, or nothing to add: the parsed path's own handling.
            return self._tool_call(ToolCallDelta(index, None, None, jsonutil.loads(literal)))
        return self._delta(item, literal)

    def _delta(self, item: _Item, literal: bytes) -> bytes:
        """The open `item`'s delta event for `literal`, as `_text` or `_tool_call` emits it."""
        item.parts.append(jsonutil.loads(literal))
        head = item.delta_head
        if head is None:
            if item.kind == "function_call":
                where = {"item_id": item.id, "output_index": item.index}
            else:
                where = self._where(item)
            # The fields after the sequence number, without `{` and the empty text's `""}`.
            head = item.delta_head = b"," + jsonutil.dumps({**where, "delta": ""})[1:-3]
        seq = self._seq
        self._seq = seq + 1
        kind = item.kind
        return b"".join((_DELTA_START[kind], b"%d" % seq, head, literal, _DELTA_END[kind]))

    def _tool_call(self, delta: ToolCallDelta) -> bytes:
        out = b""
        item = self._calls.get(delta.index)
        if item is None:
            item, out = self._open_item("function_call", "fc")
            item.call_id = delta.id or new_id("call")
            item.name = delta.name or ""
            self._calls[delta.index] = item
            out += self._emit(
                "response.output_item.added",
                {"output_index": item.index, "item": item.to_json(announce=True)},
            )
        elif item.status != "in_progress":
            # Closed only once its arguments were a whole JSON value, after which no fragment
            # can be valid; its `*.done` events are out, so this one can only be logged.
            log.warning("dropped a tool-call fragment for closed call index %d", delta.index)
            return b""
        if not item.name and delta.name:
            item.name = delta.name
        if delta.arguments:
            item.parts.append(delta.arguments)
            out += self._emit(
                "response.function_call_arguments.delta",
                {"item_id": item.id, "output_index": item.index, "delta": delta.arguments},
            )
        return out

    @staticmethod
    def _where(item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index, "content_index": 0}

    def _close_all(self, status: str) -> bytes:
        """Close every open item, in output order (at the finish_reason)."""
        text = self._open
        if text is not None and text.kind == "reasoning" and self._seal is not None:
            text.encrypted = self._seal(text.text)  # the step that can fail, before any change
        items = sorted(
            [*self._open_calls, *([text] if text is not None else [])], key=lambda i: i.index
        )
        self._open = None
        self._open_calls = []
        return b"".join([self._close(item, status) for item in items])

    def _close_text(self, status: str = "completed") -> bytes:
        item = self._open
        if item is None:
            return b""
        out = self._close(item, status)
        self._open = None
        return out

    def _close_whole_calls(self) -> bytes:
        """Close the open calls whose arguments are a whole JSON value (see the docstring)."""
        calls = self._open_calls
        if not calls:
            return b""
        whole = [item for item in calls if _whole_json(item.text)]
        if not whole:
            return b""
        self._open_calls = [item for item in calls if item not in whole]
        return b"".join([self._close(item, "completed") for item in whole])

    def _close(self, item: _Item, status: str) -> bytes:
        """Close `item`: its `*.done` events, then `output_item.done`."""
        if item.kind == "reasoning" and self._seal is not None and item.encrypted is None:
            # The one step here that can fail, so it comes before any change: a splice tap
            # that raises has its read declined and fed again by the reader (see `_literal`).
            item.encrypted = self._seal(item.text)
        item.status = status
        out = b""
        if item.kind == "function_call":
            out += self._emit(
                "response.function_call_arguments.done",
                {
                    "item_id": item.id,
                    "output_index": item.index,
                    "name": item.name,
                    "arguments": item.text,
                },
            )
        else:
            where = self._where(item)
            if item.kind == "reasoning":
                out += self._emit("response.reasoning_text.done", {**where, "text": item.text})
            else:
                out += self._emit(
                    "response.output_text.done",
                    {**where, "text": item.text, "logprobs": item.logprobs},
                )
            out += self._emit("response.content_part.done", {**where, "part": item.part()})
        return out + self._emit(
            "response.output_item.done", {"output_index": item.index, "item": item.to_json()}
        )

    def _terminal(self) -> bytes:
        """The terminal event the finish_reason decided (state FINISHING)."""
        finish = self._finish
        if finish in ("stop", "tool_calls"):
            return self._end("completed", "response.completed", "completed")
        if finish == "insufficient_system_resource":
            self._upstream_error = ("insufficient_system_resource", CUT_MESSAGE)
            return self._failed("upstream_error", CUT_MESSAGE)
        reason = "content_filter" if finish == "content_filter" else "max_output_tokens"
        self._incomplete = {"reason": reason}
        return self._end("incomplete", "response.incomplete", "completed")

    def _failed(self, outcome: str, message: str) -> bytes:
        # Items cut off mid-stream stay in the output, marked incomplete (no `*.done` events).
        for item in self._items:
            if item.status == "in_progress":
                item.status = "incomplete"
        self._open = None
        self._open_calls = []
        self._error = {"code": "server_error", "message": message}
        return self._end("failed", "response.failed", outcome)

    def _end(self, status: str, type_: str, outcome: str) -> bytes:
        if status == "completed":
            self._completed_at = self._clock() if self._clock is not None else self._created_at
        self._status = status
        self._state = _State.ENDED
        self._outcome = outcome
        return self._emit(type_, {"response": self.response()})


def _token_logprobs(logprobs: Any) -> list[Any] | None:
    """The answer tokens' entries of a chat chunk's `logprobs` (`{"content": [...]}`), which
    have the fields of the Responses API's (token, logprob, bytes, top_logprobs)."""
    if isinstance(logprobs, dict):
        content = logprobs.get("content")
        if isinstance(content, list):
            return content
    return None
