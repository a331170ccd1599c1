"""Unit tests of `CompletionCollector`: an upstream stream -> one `chat.completion` object."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ds2oai.dialects.completion import CompletionCollector
from ds2oai.errors import ClientError
from ds2oai.events import (
    Chunk,
    Done,
    EndOfBody,
    StreamBroken,
    UpstreamErrorEvent,
    UpstreamEvent,
    parse_upstream_event,
)

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    id: str = "chatcmpl-9",
    **extra: Any,
) -> Chunk:
    obj: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": 1700000001,
        "model": "deepseek-chat",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    if usage is not None:
        obj["usage"] = usage
    event = parse_upstream_event(json.dumps(obj))
    assert isinstance(event, Chunk)
    return event


def collect(events: list[UpstreamEvent], model: str = "exposed") -> CompletionCollector:
    collector = CompletionCollector(model)
    for event in events:
        collector.feed(event)
    return collector


def test_content_is_collected_into_one_chat_completion() -> None:
    collector = collect(
        [
            chunk({"role": "assistant", "content": ""}, system_fingerprint="fp_x"),
            chunk({"content": "Hel"}),
            chunk({"content": None}),
            chunk({"content": "lo"}),
            chunk({"content": ""}, finish="stop"),
            chunk(usage=USAGE),
            Done(),
        ]
    )
    assert collector.ended
    assert collector.result() == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 1700000001,
        "model": "exposed",
        "system_fingerprint": "fp_x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def test_empty_answer_has_empty_string_content() -> None:
    result = collect([chunk({"content": ""}, finish="stop"), EndOfBody()]).result()
    assert result["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert result["usage"] is None
    assert result["system_fingerprint"] is None


def test_reasoning_content_is_collected_apart_from_content() -> None:
    result = collect(
        [
            chunk({"role": "assistant", "reasoning_content": "Let me "}),
            chunk({"reasoning_content": "think."}),
            chunk({"content": "42"}),
            chunk({}, finish="stop"),
            Done(),
        ]
    ).result()
    message = result["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think."
    assert message["content"] == "42"


def test_no_reasoning_content_key_without_reasoning() -> None:
    result = collect([chunk({"content": "x"}, finish="stop"), Done()]).result()
    assert "reasoning_content" not in result["choices"][0]["message"]


def _tool(index: int, **fields: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {}}
    if "id" in fields:
        call["id"] = fields["id"]
        call["type"] = "function"
    if "name" in fields:
        call["function"]["name"] = fields["name"]
    if "arguments" in fields:
        call["function"]["arguments"] = fields["arguments"]
    return call


def test_tool_calls_are_accumulated_by_index() -> None:
    result = collect(
        [
            chunk({"role": "assistant", "content": None}),
            chunk({"tool_calls": [_tool(0, id="call_a", name="get_weather", arguments="")]}),
            chunk({"tool_calls": [_tool(1, id="call_b", name="get_time", arguments='{"tz"')]}),
            chunk({"tool_calls": [_tool(0, arguments='{"city":')]}),
            chunk({"tool_calls": [_tool(1, arguments=':"UTC"}')]}),
            chunk({"tool_calls": [_tool(0, arguments='"Paris"}')]}),
            chunk({}, finish="tool_calls"),
            chunk(usage=USAGE),
            Done(),
        ]
    ).result()
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'},
            },
        ],
    }
    assert result["usage"] == USAGE


def test_tool_calls_are_sorted_by_index_and_get_an_id_when_upstream_sent_none() -> None:
    result = collect(
        [
            chunk({"tool_calls": [_tool(2, name="b", arguments="{}")]}),
            chunk({"tool_calls": [_tool(0, name="a", arguments="{}")]}),
            chunk({}, finish="tool_calls"),
            Done(),
        ]
    ).result()
    calls = result["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert [c["id"] for c in calls] == ["call_0", "call_2"]


def test_content_is_kept_next_to_tool_calls() -> None:
    result = collect(
        [
            chunk({"content": "Calling."}),
            chunk({"tool_calls": [_tool(0, id="c", name="f", arguments="{}")]}),
            chunk({}, finish="tool_calls"),
            Done(),
        ]
    ).result()
    assert result["choices"][0]["message"]["content"] == "Calling."


def test_usage_from_choices_less_chunk_after_finish_is_kept() -> None:
    collector = collect([chunk({"content": "x"}, finish="stop"), chunk(usage=USAGE)])
    assert collector.usage == USAGE
    collector.feed(Done())
    assert collector.result()["usage"] == USAGE


def test_content_after_finish_reason_is_ignored() -> None:
    result = collect(
        [chunk({"content": "a"}, finish="stop"), chunk({"content": "b"}), Done()]
    ).result()
    assert result["choices"][0]["message"]["content"] == "a"


def test_stream_broken_after_finish_reason_still_gives_the_answer() -> None:
    result = collect([chunk({"content": "a"}, finish="stop"), StreamBroken("reset")]).result()
    assert result["choices"][0]["message"]["content"] == "a"


def test_events_after_the_end_are_ignored() -> None:
    collector = collect([chunk({"content": "a"}, finish="stop"), Done()])
    collector.feed(UpstreamErrorEvent("late", "ignored"))
    collector.feed(chunk(usage=USAGE))
    assert collector.result()["usage"] is None


def _error(events: list[UpstreamEvent]) -> ClientError:
    collector = collect(events)
    with pytest.raises(ClientError) as info:
        collector.result()
    return info.value


@pytest.mark.parametrize("end", [Done(), EndOfBody()], ids=["done", "end_of_body"])
def test_end_without_finish_reason_is_502_stream_broken(end: UpstreamEvent) -> None:
    error = _error([chunk({"content": "partial"}), end])
    assert (error.status, error.type, error.code) == (
        502,
        "upstream_connection_error",
        "upstream_stream_broken",
    )
    assert error.message == "Upstream SSE connection closed unexpectedly"


def test_no_events_at_all_is_502_stream_broken() -> None:
    error = _error([])
    assert (error.status, error.code) == (502, "upstream_stream_broken")


def test_stream_broken_is_502_with_its_message() -> None:
    error = _error([chunk({"content": "x"}), StreamBroken("connection reset")])
    assert (error.status, error.type, error.code, error.message) == (
        502,
        "upstream_connection_error",
        "upstream_stream_broken",
        "connection reset",
    )


def test_stream_timeout_is_504_upstream_timeout() -> None:
    error = _error([chunk({"content": "x"}), StreamBroken("silent for 120 s", timeout=True)])
    assert (error.status, error.type, error.code) == (
        504,
        "upstream_connection_error",
        "upstream_timeout",
    )


def test_upstream_error_event_is_502_upstream_error_with_its_code() -> None:
    error = _error([chunk({"content": "x"}), UpstreamErrorEvent("server_overloaded", "Busy")])
    assert (error.status, error.type, error.code, error.message) == (
        502,
        "upstream_error",
        "server_overloaded",
        "Busy",
    )


def test_upstream_error_event_message_is_sanitized() -> None:
    error = _error([UpstreamErrorEvent("bad_key", "key sk-test-SECRET123456 rejected")])
    assert "SECRET123456" not in error.message


def test_insufficient_system_resource_is_an_error_not_a_result() -> None:
    collector = collect(
        [chunk({"content": "cut"}, finish="insufficient_system_resource"), chunk(usage=USAGE)]
    )
    assert collector.ended
    with pytest.raises(ClientError) as info:
        collector.result()
    assert (info.value.status, info.value.type, info.value.code) == (
        502,
        "upstream_error",
        "insufficient_system_resource",
    )


def test_first_error_wins_over_later_events() -> None:
    error = _error([UpstreamErrorEvent("first", "m"), StreamBroken("x", timeout=True), Done()])
    assert error.code == "first"
