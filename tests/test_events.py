"""Unit tests of `events.parse_upstream_event`: one upstream `data:` payload -> one event."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ds2oai.events import (
    Chunk,
    Done,
    MalformedChunk,
    ToolCallDelta,
    UpstreamErrorEvent,
    parse_upstream_event,
)


def chunk_json(**fields: Any) -> str:
    base: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "deepseek-chat",
    }
    base.update(fields)
    return json.dumps(base)


def parse_chunk(data: str) -> Chunk:
    event = parse_upstream_event(data)
    assert isinstance(event, Chunk)
    return event


def test_done_marker_is_done() -> None:
    assert parse_upstream_event("[DONE]") == Done()


def test_normal_chunk_keeps_id_created_model_role_and_content() -> None:
    chunk = parse_chunk(
        chunk_json(
            choices=[
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "Hello"},
                    "finish_reason": None,
                }
            ]
        )
    )
    assert chunk == Chunk(
        id="chatcmpl-1",
        created=1700000000,
        model="deepseek-chat",
        role="assistant",
        content="Hello",
        has_choice=True,
    )


def test_finish_reason_is_read_from_the_first_choice() -> None:
    chunk = parse_chunk(chunk_json(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}]))
    assert chunk.finish_reason == "length"
    assert chunk.content is None


def test_reasoning_content_is_kept_apart_from_content() -> None:
    chunk = parse_chunk(chunk_json(choices=[{"delta": {"reasoning_content": "think"}}]))
    assert chunk.reasoning == "think"
    assert chunk.content is None


def test_error_object_becomes_upstream_error_event_with_code_and_message() -> None:
    event = parse_upstream_event(
        json.dumps({"error": {"code": "rate_limit", "message": "Too busy", "type": "x"}})
    )
    assert event == UpstreamErrorEvent("rate_limit", "Too busy")


def test_error_object_without_code_falls_back_to_its_type() -> None:
    event = parse_upstream_event(json.dumps({"error": {"type": "server_error", "message": "m"}}))
    assert event == UpstreamErrorEvent("server_error", "m")


def test_error_object_without_code_or_message_gets_defaults() -> None:
    event = parse_upstream_event(json.dumps({"error": {"detail": 1}}))
    assert isinstance(event, UpstreamErrorEvent)
    assert event.code == "upstream_error"
    assert event.message


def test_error_with_numeric_code_is_a_string() -> None:
    event = parse_upstream_event(json.dumps({"error": {"code": 500, "message": "boom"}}))
    assert event == UpstreamErrorEvent("500", "boom")


def test_error_code_that_is_neither_string_nor_integer_falls_back() -> None:
    event = parse_upstream_event(json.dumps({"error": {"code": {"nested": "x"}, "message": "m"}}))
    assert event == UpstreamErrorEvent("upstream_error", "m")
    event = parse_upstream_event(json.dumps({"error": {"code": True, "type": "t", "message": "m"}}))
    assert event == UpstreamErrorEvent("t", "m")


def test_an_empty_finish_reason_is_no_finish() -> None:
    chunk = parse_chunk(chunk_json(choices=[{"delta": {"content": "a"}, "finish_reason": ""}]))
    assert chunk.finish_reason is None
    assert chunk.content == "a"


def test_error_string_becomes_upstream_error_event() -> None:
    event = parse_upstream_event(json.dumps({"error": "overloaded"}))
    assert event == UpstreamErrorEvent("upstream_error", "overloaded")


def test_null_error_field_is_not_an_error() -> None:
    chunk = parse_chunk(chunk_json(error=None, choices=[{"delta": {"content": "x"}}]))
    assert chunk.content == "x"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"choices": []}, id="empty_choices"),
        pytest.param({}, id="missing_choices"),
        pytest.param({"choices": None}, id="null_choices"),
        pytest.param({"choices": "nope"}, id="choices_not_a_list"),
        pytest.param({"choices": [None]}, id="choice_not_an_object"),
    ],
)
def test_chunk_without_usable_choice_is_a_chunk_without_content(fields: dict[str, Any]) -> None:
    chunk = parse_chunk(chunk_json(**fields))
    assert chunk.has_choice is False
    assert chunk.content is None
    assert chunk.role is None
    assert chunk.finish_reason is None
    assert chunk.tool_calls == ()
    assert chunk.id == "chatcmpl-1"


def test_null_content_is_none() -> None:
    chunk = parse_chunk(chunk_json(choices=[{"delta": {"role": "assistant", "content": None}}]))
    assert chunk.content is None
    assert chunk.role == "assistant"
    assert chunk.has_choice is True


@pytest.mark.parametrize("delta", [None, "text", 3, []])
def test_non_object_delta_is_treated_as_empty(delta: Any) -> None:
    chunk = parse_chunk(chunk_json(choices=[{"delta": delta, "finish_reason": "stop"}]))
    assert chunk.content is None
    assert chunk.finish_reason == "stop"
    assert chunk.has_choice is True


def test_non_string_content_and_finish_reason_are_ignored() -> None:
    chunk = parse_chunk(chunk_json(choices=[{"delta": {"content": 42}, "finish_reason": 1}]))
    assert chunk.content is None
    assert chunk.finish_reason is None


def test_usage_on_a_choices_less_chunk_is_kept() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    chunk = parse_chunk(chunk_json(choices=[], usage=usage))
    assert chunk.usage == usage
    assert chunk.has_choice is False


def test_usage_that_is_not_an_object_is_dropped() -> None:
    assert parse_chunk(chunk_json(choices=[], usage="lots")).usage is None
    assert parse_chunk(chunk_json(choices=[], usage=None)).usage is None


def test_tool_call_deltas_are_normalized() -> None:
    chunk = parse_chunk(
        chunk_json(
            choices=[
                {
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            },
                            {"index": 1, "function": {"arguments": '{"city":'}},
                        ]
                    }
                }
            ]
        )
    )
    assert chunk.tool_calls == (
        ToolCallDelta(index=0, id="call_a", name="get_weather", arguments=""),
        ToolCallDelta(index=1, id=None, name=None, arguments='{"city":'),
    )


def test_tool_call_index_falls_back_to_position_when_missing_or_not_an_int() -> None:
    chunk = parse_chunk(
        chunk_json(
            choices=[
                {
                    "delta": {
                        "tool_calls": [
                            {"index": True, "function": {"arguments": "a"}},
                            {"function": {"arguments": "b"}},
                            {"index": "7", "function": {"arguments": "c"}},
                            {"index": 5, "function": {"arguments": "d"}},
                        ]
                    }
                }
            ]
        )
    )
    assert [c.index for c in chunk.tool_calls] == [0, 1, 2, 5]


def test_malformed_tool_call_items_are_skipped() -> None:
    chunk = parse_chunk(
        chunk_json(
            choices=[{"delta": {"tool_calls": ["junk", {"index": 0, "function": "not-a-dict"}]}}]
        )
    )
    assert chunk.tool_calls == (ToolCallDelta(index=0),)
    assert parse_chunk(chunk_json(choices=[{"delta": {"tool_calls": {}}}])).tool_calls == ()


def test_bool_created_is_not_taken_as_an_int() -> None:
    assert parse_chunk(chunk_json(created=True, choices=[])).created == 0
    assert parse_chunk(chunk_json(created="1700000000", choices=[])).created == 0
    assert parse_chunk(chunk_json(created=12, choices=[])).created == 12


def test_missing_id_and_model_become_empty_strings() -> None:
    chunk = parse_chunk(json.dumps({"choices": [{"delta": {"content": "x"}}]}))
    assert chunk.id == ""
    assert chunk.model == ""
    assert chunk.created == 0


def test_extra_fields_are_ignored_and_kept_in_raw() -> None:
    data = chunk_json(
        system_fingerprint="fp_1",
        surprise={"nested": [1, 2]},
        choices=[{"delta": {"content": "x", "weird": 1}, "logprobs": None, "extra": True}],
    )
    chunk = parse_chunk(data)
    assert chunk.content == "x"
    assert chunk.raw["system_fingerprint"] == "fp_1"
    assert chunk.raw["surprise"] == {"nested": [1, 2]}


def test_only_the_first_choice_is_read() -> None:
    chunk = parse_chunk(
        chunk_json(choices=[{"delta": {"content": "first"}}, {"delta": {"content": "second"}}])
    )
    assert chunk.content == "first"


@pytest.mark.parametrize("data", ["[1, 2]", "42", "null", '"text"', "true"])
def test_non_object_json_is_malformed(data: str) -> None:
    with pytest.raises(MalformedChunk):
        parse_upstream_event(data)


@pytest.mark.parametrize("data", ["", "{", "{'a': 1}", "not json", '{"a": 1} trailing', "[DONE"])
def test_invalid_json_is_malformed(data: str) -> None:
    with pytest.raises(MalformedChunk):
        parse_upstream_event(data)


def test_malformed_chunk_is_a_value_error() -> None:
    assert issubclass(MalformedChunk, ValueError)
