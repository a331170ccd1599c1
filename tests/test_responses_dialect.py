"""Unit tests of the Responses stream dialect (PROTOCOLS A.3-A.7), checked against the real
openai SDK: its SSE decoder, its stream accumulator and its pydantic models."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, cast

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai._streaming import SSEDecoder
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from ds2oai.dialects import OUTCOMES, Dialect
from ds2oai.dialects.responses import RESPONSE_DEFAULTS, ResponsesDialect, response_usage
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
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}
_FRAME = re.compile(rb"event: ([^\r\n]+)\ndata: ([^\r\n]+)\n\n")
_EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

USAGE = {
    "prompt_tokens": 306,
    "completion_tokens": 85,
    "total_tokens": 391,
    "prompt_tokens_details": {"cached_tokens": 256},
    "completion_tokens_details": {"reasoning_tokens": 31},
    "prompt_cache_hit_tokens": 256,
    "prompt_cache_miss_tokens": 50,
}


def chunk(
    *,
    content: str | None = None,
    reasoning: str | None = None,
    tools: Sequence[dict[str, Any]] = (),
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
    role: str | None = None,
) -> Chunk:
    """A Chunk as the upstream reader makes it from the JSON DeepSeek sends (D.4, D.5)."""
    obj: dict[str, Any] = {
        "id": "5d0c3ab2-2f0e-4a84-9bd4-1c9e7e0a2b11",
        "object": "chat.completion.chunk",
        "created": 1781233924,
        "model": "deepseek-v4-flash",
        "choices": [],
        "usage": usage,
    }
    if choices:
        delta: dict[str, Any] = {"content": content, "reasoning_content": reasoning}
        if role is not None:
            delta["role"] = role
        if tools:
            delta["tool_calls"] = list(tools)
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    event = parse_upstream_event(json.dumps(obj))
    assert isinstance(event, Chunk)
    return event


def call(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "function": {}}
    if id is not None:
        out["id"] = id
        out["type"] = "function"
    if name is not None:
        out["function"]["name"] = name
    if args is not None:
        out["function"]["arguments"] = args
    return out


def dialect(*, seal: Any = None, echo: dict[str, Any] | None = None) -> ResponsesDialect:
    return ResponsesDialect(
        response_id="resp_test",
        created_at=1781233924,
        model="gpt-4.1-compatible",
        echo={"store": True, "tools": []} if echo is None else echo,
        seal=seal,
    )


def run(d: ResponsesDialect, events: Iterable[UpstreamEvent]) -> bytes:
    return b"".join(d.feed(e) for e in events)


def frames(raw: bytes) -> list[dict[str, Any]]:
    """Split the bytes into events; fail on anything but `event: T\\ndata: <JSON>\\n\\n`
    where the JSON repeats T as its `type`."""
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < len(raw):
        match = _FRAME.match(raw, pos)
        assert match is not None, raw[pos : pos + 200]
        name = match.group(1).decode()
        data = json.loads(match.group(2))
        assert isinstance(data, dict)
        assert data["type"] == name
        out.append(data)
        pos = match.end()
    return out


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def sdk_replay(raw: bytes) -> ResponseStreamState[Any]:
    """Decode the bytes with the SDK's SSE decoder and feed every event to the SDK's
    accumulator (what `client.responses.stream()` does); each event is also validated
    against the SDK's pydantic event union."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for sse in SSEDecoder().iter_bytes(iter([raw])):
        data = sse.json()
        assert sse.event == data["type"]
        assert not data.get("error"), "a top-level error key makes the SDK raise"
        _EVENTS.validate_python(data)
        event = cast(Any, construct_type(type_=ResponseStreamEvent, value=data))
        state.handle_event(event)
    return state


def mock_client(raw: bytes) -> openai.OpenAI:
    """The real openai client over an in-memory transport answering `raw` as the SSE body."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        if json.loads(request.content).get("stream"):
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
        return httpx2.Response(200, headers={"content-type": "application/json"}, content=raw)

    return openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
        _strict_response_validation=True,
    )


TEXT_STREAM: list[UpstreamEvent] = [
    chunk(role="assistant", content=""),
    chunk(content="Hel"),
    chunk(content="lo"),
    chunk(content="!"),
    chunk(content="", finish="stop", usage=USAGE),
    Done(),
    EndOfBody(),
]

REASONING_STREAM: list[UpstreamEvent] = [
    chunk(role="assistant", reasoning=""),
    chunk(reasoning="The user"),
    chunk(reasoning=" greets me."),
    chunk(content="Hello"),
    chunk(content="!"),
    chunk(content="", finish="stop"),
    chunk(choices=False, usage=USAGE),
    Done(),
]

PARALLEL_TOOLS: list[UpstreamEvent] = [
    chunk(role="assistant", reasoning="Need weather."),
    chunk(tools=[call(0, id="call_00_a", name="get_weather", args="")]),
    chunk(tools=[call(0, args='{"city":')]),
    chunk(tools=[call(0, args='"Paris"}')]),
    chunk(tools=[call(1, id="call_01_b", name="get_weather", args='{"city":"Rome"}')]),
    chunk(content="", finish="tool_calls", usage=USAGE),
    Done(),
]


# --- the dialect protocol ---------------------------------------------------------------------


def test_dialect_protocol_and_media_type() -> None:
    d: Dialect = dialect()
    assert d.media_type == "text/event-stream"
    assert d.outcome is None


# --- text ---------------------------------------------------------------------------------------


def test_text_stream_exact_event_sequence() -> None:
    d = dialect()
    events = frames(run(d, TEXT_STREAM))
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert d.outcome == "completed"


def test_text_stream_event_payloads() -> None:
    events = frames(run(dialect(), TEXT_STREAM))
    created, in_progress, added, part_added, d1, d2, d3, text_done, part_done, item_done, done = (
        events
    )
    for lifecycle in (created, in_progress):
        response = lifecycle["response"]
        assert response["status"] == "in_progress"
        assert response["output"] == []
        assert response["usage"] is None
        assert response["id"] == "resp_test"
        assert response["object"] == "response"
        assert response["model"] == "gpt-4.1-compatible"
        assert response["created_at"] == 1781233924
    item = added["item"]
    assert item == {
        "type": "message",
        "id": item["id"],
        "role": "assistant",
        "status": "in_progress",
        "content": [],
    }
    assert item["id"].startswith("msg_")
    assert added["output_index"] == 0
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert part_added == {**part_added, **where, "part": empty}
    assert [(e["delta"], e["logprobs"]) for e in (d1, d2, d3)] == [
        ("Hel", []),
        ("lo", []),
        ("!", []),
    ]
    assert all(e.items() >= where.items() for e in (d1, d2, d3, text_done, part_done))
    assert text_done["text"] == "Hello!"
    assert text_done["logprobs"] == []
    full = {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}
    assert part_done["part"] == full
    assert item_done["item"] == {**item, "status": "completed", "content": [full]}
    final = done["response"]
    assert final["status"] == "completed"
    assert final["output"] == [item_done["item"]]
    assert final["error"] is None
    assert final["incomplete_details"] is None
    assert final["usage"] == response_usage(USAGE)


def test_sdk_stream_accumulates_the_text_and_the_final_response_parses_strictly() -> None:
    d = dialect()
    raw = run(d, TEXT_STREAM)
    state = sdk_replay(raw)
    final = state._completed_response
    assert final is not None
    assert final.output_text == "Hello!"
    completed = frames(raw)[-1]["response"]
    strict = Response.model_validate(completed, strict=True)
    assert strict.output_text == "Hello!"
    assert strict.usage is not None
    assert strict.usage.input_tokens == 306
    assert d.response() == completed


def test_real_openai_client_streams_and_gets_the_final_response() -> None:
    raw = run(dialect(), REASONING_STREAM)
    client = mock_client(raw)
    with client.responses.stream(model="gpt-4.1-compatible", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello!"
    assert final.output_text == "Hello!"
    assert final.status == "completed"
    assert [o.type for o in final.output] == ["reasoning", "message"]


def test_real_openai_client_non_streaming_parses_response_object() -> None:
    d = dialect()
    run(d, PARALLEL_TOOLS)  # non-streaming use: feed, drop the bytes, answer response()
    client = mock_client(json.dumps(d.response()).encode())
    response = client.responses.create(model="gpt-4.1-compatible", input="hi")
    calls = [o for o in response.output if o.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [
        ("call_00_a", '{"city":"Paris"}'),
        ("call_01_b", '{"city":"Rome"}'),
    ]


# --- reasoning ------------------------------------------------------------------------------


def test_reasoning_then_text_are_two_items_in_order() -> None:
    d = dialect()
    events = frames(run(d, REASONING_STREAM))
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    reasoning_added = events[2]
    assert reasoning_added["output_index"] == 0
    assert reasoning_added["item"] == {
        "type": "reasoning",
        "id": reasoning_added["item"]["id"],
        "summary": [],
        "content": [],
        "status": "in_progress",
    }
    assert reasoning_added["item"]["id"].startswith("rs_")
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert [e["delta"] for e in events[4:6]] == ["The user", " greets me."]
    assert events[6]["text"] == "The user greets me."
    assert events[8]["item"]["content"] == [
        {"type": "reasoning_text", "text": "The user greets me."}
    ]
    assert "encrypted_content" not in events[8]["item"]
    assert events[9]["output_index"] == 1
    assert all(e["output_index"] == 1 for e in events[9:16])
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 31}
    assert d.assistant_message() == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "The user greets me.",
    }
    sdk_replay(run(dialect(), REASONING_STREAM))


def test_seal_puts_encrypted_content_on_the_reasoning_item() -> None:
    sealed: list[str] = []

    def seal(text: str) -> str:
        sealed.append(text)
        return f"blob:{len(text)}"

    d = dialect(seal=seal)
    events = frames(run(d, REASONING_STREAM))
    item_done = next(e for e in events if e["type"] == "response.output_item.done")
    assert item_done["item"]["encrypted_content"] == "blob:19"
    assert sealed == ["The user greets me."]
    assert d.response()["output"][0]["encrypted_content"] == "blob:19"
    assert d.output_items()[0]["encrypted_content"] == "blob:19"
    Response.model_validate(d.response(), strict=True)


def test_a_literal_whose_seal_fails_changes_nothing_so_its_read_can_be_fed_again() -> None:
    # The splice calls feed_text from the upstream read callback; when it raises, the read is
    # declined and the reader feeds it again. A text literal that closes the reasoning item
    # seals it: a failing seal must leave the dialect as it was.
    attempts: list[str] = []

    def seal(text: str) -> str:
        attempts.append(text)
        if len(attempts) == 1:
            raise RuntimeError("sealing failed")
        return "blob"

    d = dialect(seal=seal)
    before = run(d, [Chunk("c", 1, "m", reasoning="The user greets me.", has_choice=True)])
    with pytest.raises(RuntimeError):
        d.feed_text(b'"Hello!"')
    after = d.feed_text(b'"Hello!"') + run(
        d, [Chunk("c", 1, "m", finish_reason="stop", has_choice=True), Done()]
    )
    events = frames(before + after)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events].count("response.reasoning_text.done") == 1
    assert d.outcome == "completed"
    reasoning, message = d.response()["output"]
    assert (reasoning["encrypted_content"], reasoning["status"]) == ("blob", "completed")
    assert message["content"][0]["text"] == "Hello!"


# --- tool calls -------------------------------------------------------------------------------


def test_parallel_tool_calls_are_two_function_call_items() -> None:
    d = dialect()
    events = frames(run(d, PARALLEL_TOOLS))
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "reasoning"),
        (1, "function_call"),
        (2, "function_call"),
    ]
    first, second = added[1]["item"], added[2]["item"]
    assert first["id"].startswith("fc_")
    assert second["id"].startswith("fc_")
    assert first["id"] != second["id"]
    assert (first["call_id"], first["name"], first["arguments"]) == (
        "call_00_a",
        "get_weather",
        "",
    )
    assert second["call_id"] == "call_01_b"
    args_done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["item_id"], e["output_index"], e["name"], e["arguments"]) for e in args_done] == [
        (first["id"], 1, "get_weather", '{"city":"Paris"}'),
        (second["id"], 2, "get_weather", '{"city":"Rome"}'),
    ]
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert [(e["item_id"], e["delta"]) for e in deltas] == [
        (first["id"], '{"city":'),
        (first["id"], '"Paris"}'),
        (second["id"], '{"city":"Rome"}'),
    ]
    # the first call is closed before the second one opens
    order = [(e["type"], e.get("output_index")) for e in events]
    assert order.index(("response.output_item.done", 1)) < order.index(
        ("response.output_item.added", 2)
    )
    assert events[-1]["type"] == "response.completed"
    assert d.outcome == "completed"
    final = d.response()["output"]
    assert [o.get("call_id") for o in final] == [None, "call_00_a", "call_01_b"]
    assert all(o["status"] == "completed" for o in final)
    state = sdk_replay(run(dialect(), PARALLEL_TOOLS))
    assert state._completed_response is not None


def test_parallel_tool_calls_become_one_assistant_message() -> None:
    d = dialect()
    run(d, PARALLEL_TOOLS)
    assert d.assistant_message() == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need weather.",
        "tool_calls": [
            {
                "id": "call_00_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_01_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
            },
        ],
    }


INTERLEAVED_TOOLS: list[UpstreamEvent] = [
    chunk(role="assistant", content="Checking both."),
    chunk(tools=[call(0, id="call_A", name="get_weather", args="")]),
    chunk(tools=[call(1, id="call_B", name="get_time", args="")]),
    chunk(tools=[call(0, args='{"city":')]),
    chunk(tools=[call(1, args='{"tz":')]),
    chunk(tools=[call(0, args='"Paris"}')]),
    chunk(tools=[call(1, args='"UTC"}')]),
    chunk(content="", finish="tool_calls", usage=USAGE),
    Done(),
]


def test_interleaved_parallel_calls_keep_every_fragment() -> None:
    d = dialect()
    raw = run(d, INTERLEAVED_TOOLS)
    events = frames(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], e["arguments"]) for e in done] == [
        (1, '{"city":"Paris"}'),
        (2, '{"tz":"UTC"}'),
    ]
    deltas = [
        (e["output_index"], e["delta"])
        for e in events
        if e["type"] == "response.function_call_arguments.delta"
    ]
    assert deltas == [(1, '{"city":'), (2, '{"tz":'), (1, '"Paris"}'), (2, '"UTC"}')]
    # both calls stay open until the finish_reason: every delta precedes their done events
    order = types(events)
    last_delta = max(i for i, t in enumerate(order) if t.endswith("arguments.delta"))
    assert last_delta < order.index("response.function_call_arguments.done")
    assert d.outcome == "completed"
    calls = [o for o in d.response()["output"] if o["type"] == "function_call"]
    assert [(c["call_id"], c["arguments"], c["status"]) for c in calls] == [
        ("call_A", '{"city":"Paris"}', "completed"),
        ("call_B", '{"tz":"UTC"}', "completed"),
    ]
    final = sdk_replay(raw)._completed_response
    assert final is not None
    assert [o.arguments for o in final.output if o.type == "function_call"] == [
        '{"city":"Paris"}',
        '{"tz":"UTC"}',
    ]


def test_a_call_with_whole_arguments_is_closed_when_the_next_item_opens() -> None:
    d = dialect()
    events = frames(run(d, PARALLEL_TOOLS[:5]))
    order = [(e["type"], e.get("output_index")) for e in events]
    # the first call's arguments are whole JSON: closed before the second call is added
    assert order.index(("response.output_item.done", 1)) < order.index(
        ("response.output_item.added", 2)
    )
    # the second one is whole too, but nothing came after it: still open
    assert ("response.output_item.done", 2) not in order


def test_open_items_close_in_output_order_at_the_finish() -> None:
    d = dialect()
    events = frames(
        run(
            d,
            [
                chunk(role="assistant", tools=[call(0, id="c0", name="f", args='{"a":')]),
                chunk(content="text while the call is open"),
                chunk(tools=[call(0, args="1}")]),
                chunk(content="", finish="tool_calls"),
                Done(),
            ],
        )
    )
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert done == [0, 1]
    call_item = d.response()["output"][0]
    assert call_item["arguments"] == '{"a":1}'


def test_a_call_whose_arguments_are_a_bare_number_stays_open() -> None:
    d = dialect()
    run(
        d,
        [
            chunk(role="assistant", tools=[call(0, id="c0", name="f", args="1")]),
            chunk(tools=[call(1, id="c1", name="g", args="{}")]),
            chunk(tools=[call(0, args="2")]),  # a number can go on
            chunk(content="", finish="tool_calls"),
            Done(),
        ],
    )
    assert [o["arguments"] for o in d.response()["output"]] == ["12", "{}"]


def test_an_incomplete_call_is_closed_incomplete_at_a_length_finish() -> None:
    d = dialect()
    events = frames(
        run(
            d,
            [
                chunk(role="assistant", tools=[call(0, id="c0", name="f", args='{"a":')]),
                chunk(tools=[call(1, id="c1", name="g", args="{}")]),
                chunk(content="", finish="length"),
                Done(),
            ],
        )
    )
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [(e["output_index"], e["item"]["status"]) for e in done] == [
        (0, "incomplete"),
        (1, "incomplete"),
    ]
    assert events[-1]["type"] == "response.incomplete"


def test_text_then_tool_call_closes_the_message_first() -> None:
    events = frames(
        run(
            dialect(),
            [
                chunk(content="Let me check."),
                chunk(tools=[call(0, id="call_x", name="f", args="{}")]),
                chunk(finish="tool_calls"),
                EndOfBody(),
            ],
        )
    )
    names = types(events)
    assert names.index("response.output_item.done") < names.index("response.output_item.added", 3)
    assert events[-1]["type"] == "response.completed"


def test_fragment_for_a_closed_call_is_dropped_not_streamed() -> None:
    d = dialect()
    raw = run(
        d,
        [
            chunk(tools=[call(0, id="a", name="f", args="{}")]),
            chunk(tools=[call(1, id="b", name="g", args="{}")]),
            chunk(tools=[call(0, args="late")]),
            chunk(finish="tool_calls"),
            Done(),
        ],
    )
    assert b"late" not in raw
    assert [c["function"]["arguments"] for c in d.assistant_message()["tool_calls"]] == ["{}", "{}"]  # type: ignore[index]
    sdk_replay(raw)


def test_tool_call_without_upstream_id_gets_one() -> None:
    d = dialect()
    run(d, [chunk(tools=[call(0, name="f", args="{}")]), chunk(finish="tool_calls"), Done()])
    [item] = d.output_items()
    assert item["call_id"].startswith("call_")


# --- usage ---------------------------------------------------------------------------------------


def test_usage_mapping() -> None:
    assert response_usage(USAGE) == {
        "input_tokens": 306,
        "input_tokens_details": {"cached_tokens": 256, "cache_write_tokens": 0},
        "output_tokens": 85,
        "output_tokens_details": {"reasoning_tokens": 31},
        "total_tokens": 391,
    }
    assert response_usage(None) is None
    only_details = {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert response_usage(only_details) == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12,
    }
    bare = response_usage({"prompt_tokens": 3, "completion_tokens": 4})
    assert bare is not None
    assert bare["total_tokens"] == 7
    assert bare["input_tokens_details"]["cached_tokens"] == 0


def test_last_non_null_usage_wins_and_none_means_null() -> None:
    later = {**USAGE, "completion_tokens": 99, "total_tokens": 405}
    d = dialect()
    run(d, [chunk(content="a", finish="stop", usage=USAGE), chunk(choices=False, usage=later)])
    assert d.outcome is None  # still waiting for [DONE]
    run(d, [chunk(choices=False), Done()])
    assert d.response()["usage"]["output_tokens"] == 99
    d = dialect()
    run(d, [chunk(content="a", finish="stop"), Done()])
    assert d.response()["usage"] is None


# --- terminal states -----------------------------------------------------------------------------


def test_length_is_incomplete_max_output_tokens() -> None:
    d = dialect()
    events = frames(run(d, [chunk(content="cut"), chunk(finish="length", usage=USAGE), Done()]))
    assert events[-1]["type"] == "response.incomplete"
    response = events[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert response["usage"]["output_tokens"] == 85
    assert "response.completed" not in types(events)
    item_done = next(e for e in events if e["type"] == "response.output_item.done")
    assert item_done["item"]["status"] == "incomplete"
    Response.model_validate(response, strict=True)
    sdk_replay(run(dialect(), [chunk(content="cut"), chunk(finish="length"), Done()]))


def test_content_filter_is_incomplete_content_filter() -> None:
    d = dialect()
    events = frames(run(d, [chunk(content="x", finish="content_filter"), EndOfBody()]))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_insufficient_system_resource_is_failed() -> None:
    d = dialect()
    events = frames(
        run(d, [chunk(content="half"), chunk(finish="insufficient_system_resource"), Done()])
    )
    assert events[-1]["type"] == "response.failed"
    response = events[-1]["response"]
    assert response["status"] == "failed"
    assert response["error"]["code"] == "server_error"
    assert "insufficient system resource" in response["error"]["message"]
    assert d.outcome == "upstream_error"
    assert "response.completed" not in types(events)
    Response.model_validate(response, strict=True)


def test_broken_before_finish_is_failed_and_nothing_follows() -> None:
    d = dialect()
    raw = run(d, [chunk(content="Hel"), StreamBroken(BROKEN)])
    events = frames(raw)
    assert types(events)[-2:] == ["response.output_text.delta", "response.failed"]
    response = events[-1]["response"]
    assert response["error"] == {"code": "server_error", "message": BROKEN}
    assert response["output"][0]["status"] == "incomplete"
    assert response["output"][0]["content"][0]["text"] == "Hel"
    assert d.outcome == "upstream_broken"
    for later in (chunk(content="more"), Done(), EndOfBody(), StreamBroken("x")):
        assert d.feed(later) == b""
    assert d.outcome == "upstream_broken"
    Response.model_validate(response, strict=True)
    sdk_replay(raw)


@pytest.mark.parametrize("end", [Done(), EndOfBody()])
def test_body_ending_before_finish_is_failed(end: UpstreamEvent) -> None:
    d = dialect()
    events = frames(run(d, [chunk(content="Hel"), end]))
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == BROKEN
    assert d.outcome == "upstream_broken"


def test_timeout_is_failed_with_its_message() -> None:
    d = dialect()
    events = frames(
        run(d, [chunk(reasoning="hmm"), StreamBroken("Upstream silent 120s", timeout=True)])
    )
    assert events[-1]["response"]["error"]["message"] == "Upstream silent 120s"
    assert d.outcome == "timeout"


def test_upstream_error_event_is_failed_keeping_the_code() -> None:
    d = dialect()
    events = frames(
        run(d, [chunk(content="a"), UpstreamErrorEvent("overloaded", "Server busy, retry")])
    )
    error = events[-1]["response"]["error"]
    assert error["code"] == "server_error"
    assert "overloaded" in error["message"]
    assert "Server busy, retry" in error["message"]
    assert d.outcome == "upstream_error"


def test_upstream_error_message_is_sanitized() -> None:
    d = dialect()
    events = frames(
        run(d, [chunk(content="a"), UpstreamErrorEvent("x", "bad key sk-abcdefghijkl")])
    )
    assert "sk-abcdefghijkl" not in events[-1]["response"]["error"]["message"]


@pytest.mark.parametrize(
    "after",
    [StreamBroken(BROKEN), StreamBroken("slow", timeout=True), UpstreamErrorEvent("c", "m")],
)
def test_failure_after_finish_reason_still_completes(after: UpstreamEvent) -> None:
    d = dialect()
    events = frames(run(d, [chunk(content="Hi", finish="stop", usage=USAGE), after]))
    assert events[-1]["type"] == "response.completed"
    assert d.outcome == "completed"
    assert events[-1]["response"]["usage"]["total_tokens"] == 391


def test_terminal_before_any_chunk_still_starts_with_created() -> None:
    d = dialect()
    raw = d.feed(StreamBroken(BROKEN))
    assert types(frames(raw)) == ["response.created", "response.in_progress", "response.failed"]
    assert d.assistant_message() is None
    sdk_replay(raw)


def test_no_error_event_and_no_done_sentinel() -> None:
    streams: list[list[UpstreamEvent]] = [TEXT_STREAM, [chunk(content="a"), StreamBroken(BROKEN)]]
    for stream in streams:
        raw = run(dialect(), stream)
        assert b"[DONE]" not in raw
        assert b"event: error" not in raw
        assert all("error" not in e or e["type"] != "error" for e in frames(raw))


def test_finish_chunk_content_after_finish_is_ignored() -> None:
    d = dialect()
    raw = run(d, [chunk(content="A", finish="stop"), chunk(content="B"), Done()])
    assert b'"B"' not in raw
    assert d.assistant_message() == {"role": "assistant", "content": "A"}


# --- response object ------------------------------------------------------------------------


def test_response_echoes_request_fields_with_defaults() -> None:
    echo = {
        "store": False,
        "instructions": "Be brief.",
        "tools": [{"type": "function", "name": "f", "parameters": {}, "strict": True}],
        "tool_choice": "required",
        "temperature": 0.3,
        "metadata": {"a": "b"},
        "previous_response_id": "resp_prev",
        "id": "must-not-override",
        "status": "must-not-override",
    }
    d = dialect(echo=echo)
    run(d, TEXT_STREAM)
    response = d.response()
    assert response["id"] == "resp_test"
    assert response["status"] == "completed"
    for key in ("store", "instructions", "tools", "tool_choice", "temperature", "metadata"):
        assert response[key] == echo[key]
    assert response["previous_response_id"] == "resp_prev"
    assert response["top_p"] == RESPONSE_DEFAULTS["top_p"]
    assert response["parallel_tool_calls"] is True
    assert response["text"] == {"format": {"type": "text"}}
    assert response["truncation"] == "disabled"
    Response.model_validate(response, strict=True)


def test_response_before_and_without_events() -> None:
    d = dialect()
    response = d.response()
    assert response["status"] == "in_progress"
    assert response["output"] == []
    assert d.output_items() == []
    assert d.assistant_message() is None


def test_assistant_message_for_plain_text() -> None:
    d = dialect()
    run(d, TEXT_STREAM)
    assert d.assistant_message() == {"role": "assistant", "content": "Hello!"}


# --- properties -------------------------------------------------------------------------------


_texts = st.text(alphabet='ab \u2028é\n"', min_size=0, max_size=4)
_finishes = st.sampled_from(
    [
        None,
        None,
        None,
        None,
        "stop",
        "tool_calls",
        "length",
        "content_filter",
        "insufficient_system_resource",
    ]
)
_usages = st.one_of(
    st.none(),
    st.builds(
        lambda p, c: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        st.integers(0, 1000),
        st.integers(0, 1000),
    ),
)


@st.composite
def _chunks(draw: st.DrawFn) -> Chunk:
    if draw(st.integers(0, 9)) == 0:
        return chunk(choices=False, usage=draw(_usages))
    tools = []
    if draw(st.integers(0, 3)) == 0:
        index = draw(st.integers(0, 2))
        tools.append(
            call(
                index,
                id=draw(st.one_of(st.none(), st.just(f"call_{index}"))),
                name=draw(st.one_of(st.none(), st.just("fn"))),
                args=draw(st.one_of(st.none(), _texts)),
            )
        )
    return chunk(
        content=draw(st.one_of(st.none(), _texts)),
        reasoning=draw(st.one_of(st.none(), _texts)),
        tools=tools,
        finish=draw(_finishes),
        usage=draw(_usages),
    )


_terminators = st.sampled_from(
    [
        Done(),
        EndOfBody(),
        StreamBroken(BROKEN),
        StreamBroken("silent", timeout=True),
        UpstreamErrorEvent("boom", "upstream says no"),
    ]
)
_streams = st.lists(st.one_of(_chunks(), _chunks(), _chunks(), _terminators), max_size=25)


@settings(max_examples=300, deadline=None)
@given(_streams)
def test_property_one_terminal_and_consistent_items(events: list[UpstreamEvent]) -> None:
    d = dialect()
    outputs = [d.feed(e) for e in [*events, StreamBroken(BROKEN)]]
    raw = b"".join(outputs)
    parsed = frames(raw)

    # exactly one terminal event, last; nothing after it; outcome set
    terminals = [i for i, e in enumerate(parsed) if e["type"] in TERMINAL]
    assert terminals == [len(parsed) - 1]
    assert d.outcome in OUTCOMES
    end = next(i for i, out in enumerate(outputs) if TERMINAL & set(types(frames(out))))
    assert all(out == b"" for out in outputs[end + 1 :])
    assert d.feed(chunk(content="more")) == b""

    # sequence numbers 0..n, created first
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    assert types(parsed)[:2] == ["response.created", "response.in_progress"]

    # every item is announced before its deltas and done events, and never used after done
    announced: dict[str, int] = {}
    finished: set[str] = set()
    parts: set[str] = set()
    for e in parsed[2:-1]:
        kind = e["type"]
        if kind == "response.output_item.added":
            assert e["output_index"] == len(announced)
            announced[e["item"]["id"]] = e["output_index"]
            continue
        item_id = e["item"]["id"] if kind == "response.output_item.done" else e["item_id"]
        assert item_id in announced, kind
        assert item_id not in finished, kind
        assert announced[item_id] == e["output_index"]
        if kind == "response.content_part.added":
            parts.add(item_id)
        elif kind in (
            "response.output_text.delta",
            "response.reasoning_text.delta",
            "response.output_text.done",
            "response.reasoning_text.done",
        ):
            assert item_id in parts
        elif kind == "response.output_item.done":
            finished.add(item_id)

    final = parsed[-1]["response"]
    Response.model_validate(final, strict=True)
    assert final == d.response()
    if final["status"] == "completed":
        assert set(announced) == finished  # every item closed before completing
    state = sdk_replay(raw)
    if parsed[-1]["type"] == "response.completed":
        completed = state._completed_response
        assert completed is not None
        text = "".join(e["delta"] for e in parsed if e["type"] == "response.output_text.delta")
        assert completed.output_text == text


@settings(max_examples=150, deadline=None)
@given(_streams)
def test_property_final_output_matches_the_streamed_items(events: list[UpstreamEvent]) -> None:
    """What a streaming client assembled equals what a non-streaming client gets."""
    d = dialect()
    parsed = frames(run(d, [*events, Done()]))
    final = d.response()
    assert parsed[-1]["response"] == final
    done = {
        e["output_index"]: e["item"] for e in parsed if e["type"] == "response.output_item.done"
    }
    for index, item in done.items():
        assert final["output"][index] == item
    if final["status"] != "failed":
        assert sorted(done) == list(range(len(final["output"])))
    text = "".join(e["delta"] for e in parsed if e["type"] == "response.output_text.delta")
    message = d.assistant_message()
    assert ((message or {}).get("content") or "") == text
    calls = [o for o in final["output"] if o["type"] == "function_call"]
    assert len((message or {}).get("tool_calls") or []) == len(calls)


def test_completed_at_only_on_a_completed_response() -> None:
    d = ResponsesDialect(response_id="r", created_at=100, model="m", echo={}, clock=lambda: 123)
    final = frames(run(d, [chunk(role="assistant", content="hi", finish="stop"), Done()]))[-1]
    assert final["response"]["completed_at"] == 123
    assert d.response()["completed_at"] == 123
    cut = dialect()
    last = frames(run(cut, [chunk(role="assistant", content="hi", finish="length"), Done()]))[-1]
    assert last["type"] == "response.incomplete"
    assert "completed_at" not in last["response"]
    broken = dialect()
    last = frames(run(broken, [chunk(role="assistant", content="hi"), EndOfBody()]))[-1]
    assert last["type"] == "response.failed"
    assert "completed_at" not in last["response"]
