"""Unit tests of the "spec" dialect state machine (SPEC §3 and the streaming rows of §4)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds2oai.dialects.spec import SpecDialect, usage_fields
from ds2oai.events import (
    Chunk,
    Done,
    EndOfBody,
    StreamBroken,
    UpstreamErrorEvent,
    UpstreamEvent,
    parse_upstream_event,
)

BROKEN = "Upstream SSE connection closed unexpectedly"

SPEC_FIELDS = {
    "response.created": {"id", "model", "created"},
    "response.output_text.delta": {"id", "role", "delta"},
    "response.completed": {"id", "finish_reason", "usage"},
}
TERMINAL = {"response.completed", "response.error"}
_FRAME = re.compile(rb"event: ([^\r\n]+)\ndata: ([^\r\n]+)\n\n")


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
    id: str = "chatcmpl-1",
    created: int = 1700000000,
) -> Chunk:
    """A Chunk as the upstream reader makes it: from the JSON DeepSeek would send."""
    obj: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": "deepseek-chat",
        "choices": [],
    }
    if choices:
        delta: dict[str, Any] = {"content": content}
        if role is not None:
            delta["role"] = role
        obj["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        obj["usage"] = usage
    event = parse_upstream_event(json.dumps(obj))
    assert isinstance(event, Chunk)
    return event


USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 2,
    "total_tokens": 7,
    "prompt_cache_hit_tokens": 0,
    "prompt_cache_miss_tokens": 5,
}


def frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split dialect output into (event, data) pairs; fail on anything that is not
    `event: <name>\\ndata: <one-line JSON object>\\n\\n` with exactly the SPEC §3 fields."""
    out: list[tuple[str, dict[str, Any]]] = []
    pos = 0
    while pos < len(raw):
        match = _FRAME.match(raw, pos)
        assert match is not None, raw[pos:]
        name = match.group(1).decode()
        data = json.loads(match.group(2))
        assert isinstance(data, dict)
        if name == "response.error":
            assert set(data) in ({"type", "message"}, {"type", "message", "code"}), data
        else:
            assert set(data) == SPEC_FIELDS[name], (name, data)
        out.append((name, data))
        pos = match.end()
    return out


def run(dialect: SpecDialect, events: list[UpstreamEvent]) -> list[tuple[str, dict[str, Any]]]:
    return frames(b"".join(dialect.feed(e) for e in events))


def test_normal_sequence_produces_exact_bytes() -> None:
    dialect = SpecDialect("gpt-4.1-compatible")
    assert dialect.feed(chunk("", role="assistant")) == (
        b"event: response.created\n"
        b'data: {"id":"chatcmpl-1","model":"gpt-4.1-compatible","created":1700000000}\n\n'
    )
    assert dialect.feed(chunk("Hel")) == (
        b"event: response.output_text.delta\n"
        b'data: {"id":"chatcmpl-1","role":"assistant","delta":"Hel"}\n\n'
    )
    assert dialect.feed(chunk("lo", role="assistant")) == (
        b"event: response.output_text.delta\n"
        b'data: {"id":"chatcmpl-1","role":"assistant","delta":"lo"}\n\n'
    )
    assert dialect.feed(chunk("", finish="stop")) == b""
    assert dialect.outcome is None
    assert dialect.feed(chunk(choices=False, usage=USAGE)) == b""
    assert dialect.feed(Done()) == (
        b"event: response.completed\n"
        b'data: {"id":"chatcmpl-1","finish_reason":"stop",'
        b'"usage":{"completion_tokens":2,"prompt_tokens":5,"total_tokens":7}}\n\n'
    )
    assert dialect.outcome == "completed"


def test_first_chunk_with_content_gives_created_then_delta() -> None:
    dialect = SpecDialect("m")
    assert [name for name, _ in frames(dialect.feed(chunk("Hi", role="assistant")))] == [
        "response.created",
        "response.output_text.delta",
    ]


def test_created_carries_exposed_model_and_upstream_id_and_created() -> None:
    dialect = SpecDialect("exposed-name")
    [(name, data)] = frames(dialect.feed(chunk(id="abc", created=42)))
    assert (name, data) == (
        "response.created",
        {"id": "abc", "model": "exposed-name", "created": 42},
    )


def test_delta_role_defaults_to_assistant_when_missing_or_null() -> None:
    dialect = SpecDialect("m")
    dialect.feed(chunk(""))
    assert frames(dialect.feed(chunk("a")))[0][1]["role"] == "assistant"


def test_delta_role_is_passed_on_when_present() -> None:
    dialect = SpecDialect("m")
    dialect.feed(chunk(""))
    assert frames(dialect.feed(chunk("a", role="system")))[0][1]["role"] == "system"


def test_delta_id_is_the_id_of_the_first_chunk() -> None:
    dialect = SpecDialect("m")
    dialect.feed(chunk("", id="first"))
    assert frames(dialect.feed(chunk("x", id="other")))[0][1]["id"] == "first"


@pytest.mark.parametrize("content", ["", None])
def test_empty_or_null_content_produces_no_delta(content: str | None) -> None:
    dialect = SpecDialect("m")
    dialect.feed(chunk("start"))
    assert dialect.feed(chunk(content)) == b""


def test_choices_less_chunk_produces_nothing_mid_stream() -> None:
    dialect = SpecDialect("m")
    dialect.feed(chunk("start"))
    assert dialect.feed(chunk(choices=False)) == b""
    assert dialect.outcome is None


def test_content_after_finish_reason_is_not_sent() -> None:
    dialect = SpecDialect("m")
    dialect.feed(chunk("a", finish="stop"))
    assert dialect.feed(chunk("late")) == b""


def test_usage_in_later_choices_less_chunk_reaches_completed() -> None:
    dialect = SpecDialect("m")
    events = run(
        dialect,
        [chunk("Hi"), chunk(finish="stop"), chunk(choices=False, usage=USAGE), EndOfBody()],
    )
    assert events[-1] == (
        "response.completed",
        {
            "id": "chatcmpl-1",
            "finish_reason": "stop",
            "usage": {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7},
        },
    )


def test_usage_on_the_finish_chunk_reaches_completed() -> None:
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi", finish="length", usage=USAGE), Done()])
    assert events[-1][1]["finish_reason"] == "length"
    assert events[-1][1]["usage"] == usage_fields(USAGE)


def test_completed_has_null_usage_when_none_came() -> None:
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi"), chunk(finish="stop"), Done()])
    assert events[-1] == (
        "response.completed",
        {"id": "chatcmpl-1", "finish_reason": "stop", "usage": None},
    )


def test_usage_fields_keeps_exactly_the_three_openai_counters() -> None:
    assert usage_fields(USAGE) == {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7}
    assert usage_fields(None) is None


def test_finish_reason_alone_does_not_complete() -> None:
    dialect = SpecDialect("m")
    out = dialect.feed(chunk("Hi", finish="stop"))
    assert [name for name, _ in frames(out)] == ["response.created", "response.output_text.delta"]
    assert dialect.outcome is None


@pytest.mark.parametrize("finish", ["stop", "length", "tool_calls", "content_filter"])
@pytest.mark.parametrize("end", [Done(), EndOfBody()], ids=["done", "end_of_body"])
def test_completed_after_finish_reason_and_done_or_end_of_body(
    finish: str, end: UpstreamEvent
) -> None:
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi"), chunk(finish=finish), end])
    assert events[-1][0] == "response.completed"
    assert events[-1][1]["finish_reason"] == finish
    assert dialect.outcome == "completed"


def test_stream_broken_after_finish_reason_still_completes() -> None:
    # Documented choice in spec.py: the answer is whole once finish_reason was seen.
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi", finish="stop"), StreamBroken("reset")])
    assert events[-1][0] == "response.completed"
    assert dialect.outcome == "completed"


@pytest.mark.parametrize("end", [Done(), EndOfBody()], ids=["done", "end_of_body"])
def test_end_without_finish_reason_is_upstream_stream_broken(end: UpstreamEvent) -> None:
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi"), end])
    assert events[-1] == ("response.error", {"type": "upstream_stream_broken", "message": BROKEN})
    assert dialect.outcome == "upstream_broken"


@pytest.mark.parametrize("end", [Done(), EndOfBody()], ids=["done", "end_of_body"])
def test_end_before_any_chunk_is_upstream_stream_broken(end: UpstreamEvent) -> None:
    dialect = SpecDialect("m")
    assert run(dialect, [end]) == [
        ("response.error", {"type": "upstream_stream_broken", "message": BROKEN})
    ]


def test_stream_broken_reset_is_upstream_broken_with_its_message() -> None:
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi"), StreamBroken(BROKEN)])
    assert events[-1] == ("response.error", {"type": "upstream_stream_broken", "message": BROKEN})
    assert dialect.outcome == "upstream_broken"


def test_stream_broken_timeout_has_outcome_timeout() -> None:
    dialect = SpecDialect("m")
    message = "Upstream sent nothing for 120 s (read timeout)"
    events = run(dialect, [chunk("Hi"), StreamBroken(message, timeout=True)])
    assert events[-1] == ("response.error", {"type": "upstream_stream_broken", "message": message})
    assert dialect.outcome == "timeout"


def test_upstream_error_event_becomes_upstream_error_with_code() -> None:
    dialect = SpecDialect("m")
    events = run(dialect, [chunk("Hi"), UpstreamErrorEvent("server_overloaded", "Try later")])
    assert events[-1] == (
        "response.error",
        {"type": "upstream_error", "code": "server_overloaded", "message": "Try later"},
    )
    assert dialect.outcome == "upstream_error"


def test_insufficient_system_resource_is_an_error_never_completed() -> None:
    dialect = SpecDialect("m")
    events = run(
        dialect,
        [
            chunk("partial"),
            chunk(" answer", finish="insufficient_system_resource"),
            chunk(choices=False, usage=USAGE),
            Done(),
        ],
    )
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.error",
    ]
    assert events[-1][1]["type"] == "upstream_error"
    assert events[-1][1]["code"] == "insufficient_system_resource"
    assert events[-1][1]["message"]
    assert dialect.outcome == "upstream_error"


@pytest.mark.parametrize(
    "terminal",
    [
        [chunk("a", finish="stop"), Done()],
        [chunk("a"), EndOfBody()],
        [chunk("a"), StreamBroken("x", timeout=True)],
        [chunk("a"), UpstreamErrorEvent("c", "m")],
        [chunk("a", finish="insufficient_system_resource")],
    ],
    ids=["completed", "broken", "timeout", "upstream_error", "cut"],
)
def test_nothing_is_emitted_after_the_terminal_event(terminal: list[UpstreamEvent]) -> None:
    dialect = SpecDialect("m")
    run(dialect, terminal)
    outcome = dialect.outcome
    assert outcome is not None
    later: list[UpstreamEvent] = [
        chunk("more"),
        chunk(finish="stop"),
        chunk(choices=False, usage=USAGE),
        Done(),
        EndOfBody(),
        StreamBroken("again"),
        UpstreamErrorEvent("c", "m"),
    ]
    for event in later:
        assert dialect.feed(event) == b""
    assert dialect.outcome == outcome


def test_media_type_is_event_stream() -> None:
    assert SpecDialect.media_type == "text/event-stream"


def test_outcome_is_none_while_streaming() -> None:
    dialect = SpecDialect("m")
    assert dialect.outcome is None
    dialect.feed(chunk("a"))
    assert dialect.outcome is None


def test_data_lines_stay_one_line_for_content_with_newlines_and_u2028() -> None:
    dialect = SpecDialect("m")
    out = dialect.feed(chunk("line1\nline2\r\n\u2028é😀"))
    events = frames(out)
    assert events[-1][1]["delta"] == "line1\nline2\r\n\u2028é😀"


_event_strategy = st.one_of(
    st.builds(
        chunk,
        st.one_of(st.none(), st.text(max_size=5)),
        role=st.one_of(st.none(), st.just("assistant")),
        finish=st.one_of(
            st.none(), st.sampled_from(["stop", "length", "insufficient_system_resource"])
        ),
        usage=st.one_of(st.none(), st.just(USAGE)),
        choices=st.booleans(),
    ),
    st.just(Done()),
    st.just(EndOfBody()),
    st.builds(StreamBroken, st.text(max_size=5), timeout=st.booleans()),
    st.builds(UpstreamErrorEvent, st.text(max_size=5), st.text(max_size=5)),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_event_strategy, max_size=10))
def test_property_at_most_one_terminal_event_and_it_is_last(events: list[UpstreamEvent]) -> None:
    dialect = SpecDialect("m")
    out = b"".join(dialect.feed(e) for e in events)
    names = [name for name, _ in frames(out)]
    terminals = [n for n in names if n in TERMINAL]
    assert len(terminals) <= 1
    if terminals:
        assert names[-1] == terminals[0]
        assert dialect.outcome is not None
    if dialect.outcome is not None:
        assert len(terminals) == 1
        assert (terminals[0] == "response.completed") == (dialect.outcome == "completed")
    if names:
        assert names[0] in ("response.created", "response.error")
    # Ending the input always ends the stream with exactly one terminal event.
    out += dialect.feed(EndOfBody())
    assert sum(1 for name, _ in frames(out) if name in TERMINAL) == 1
