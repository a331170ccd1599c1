"""The byte-level text path (chunk_template + reframe's reader): faster, never different.

Unit tests pin what a template accepts and refuses; property tests feed the same upstream
bytes, split anywhere, through the reader with and without templates and require the same
client bytes from the spec, chat and Responses dialects, and the same `"stream": false`
answer (or error) from the completion collector.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds2oai import jsonutil
from ds2oai.chunk_template import TextTemplate
from ds2oai.dialects import Dialect
from ds2oai.dialects.chat import ChatDialect
from ds2oai.dialects.completion import CompletionCollector
from ds2oai.dialects.responses import ResponsesDialect
from ds2oai.dialects.spec import SpecDialect
from ds2oai.errors import ClientError
from ds2oai.event_reader import EventReader
from ds2oai.events import (
    ArgumentsDelta,
    Chunk,
    EndOfBody,
    ReasoningDelta,
    TextDelta,
    parse_upstream_event,
)
from tests.conftest import make_exchange

BASE = {"id": "c-1", "object": "chat.completion.chunk", "created": 7, "model": "deepseek-chat"}


def _escaped_key_text(text: str, *, elsewhere: str) -> bytes:
    """A text chunk whose delta key is `cont\\u0065nt`, with a plain `"content"` elsewhere."""
    raw = payload(text, z={"content": elsewhere}).replace(b'"content": "', b'"cont\\u0065nt": "', 1)
    assert raw.count(b'"content"') == 1
    return raw


def payload(content: Any = "hi", *, finish: Any = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}
    return json.dumps({**BASE, "choices": [choice], "usage": None, **extra}).encode()


def thinking(text: Any = "hm", *, content: Any = None, finish: Any = None, **extra: Any) -> bytes:
    """A reasoning model's thinking chunk as DeepSeek sends it: `content` null."""
    delta = {"content": content, "reasoning_content": text}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return json.dumps({**BASE, "choices": [choice], "usage": None, **extra}).encode()


def learned(raw: bytes, *, reasoning: bool = False) -> TextTemplate | None:
    chunk = parse_upstream_event(raw.decode())
    assert isinstance(chunk, Chunk)
    return TextTemplate.learn(raw, chunk, reasoning=reasoning)


@pytest.mark.parametrize(("make", "reasoning"), [(payload, False), (thinking, True)])
def test_learns_and_matches_the_same_chunk_with_other_text(
    make: Callable[[str], bytes], reasoning: bool
) -> None:
    template = learned(make("Hello"), reasoning=reasoning)
    assert template is not None
    assert template.match(make(" world")) == b'" world"'
    assert template.match(make("")) == b'""'
    literal = template.match(make('say "hi"\\ \u00e9\u4f60 \U0001f600\n'))
    assert literal is not None
    assert json.loads(literal) == 'say "hi"\\ \u00e9\u4f60 \U0001f600\n'


@pytest.mark.parametrize(
    "other",
    [
        payload("x", finish="stop"),  # the finish chunk
        payload("x", usage={"prompt_tokens": 1}),  # a usage chunk (duplicate key: last wins)
        json.dumps({**BASE, "id": "c-2", "choices": [{"index": 0, "delta": {"content": "x"}}]}),
        payload("x").replace(b'"content": ', b'"content":'),  # other spacing
        payload("x").replace(b'"x"', b'"a", "content": "b"'),  # a second key smuggled in
        payload("x").replace(b'"x"', b'"a", "reasoning_content": "b"'),
        payload("x").replace(b'"x"', b'"a\\qb"'),  # invalid escape
        payload("x").replace(b'"x"', b'"a\\u12"'),  # short \u escape
        payload("x").replace(b'"x"', b'"\\ud83d"'),  # a lone high surrogate
        payload("x").replace(b'"x"', b'"\\ude00 "'),  # a lone low surrogate
        payload("x").replace(b'"x"', b'"\\ude00\\ud83d"'),  # a pair the wrong way round
        payload("x").replace(b'"x"', b'"a\tb"'),  # raw control character
        payload("x").replace(b'"x"', b'"a\xff"'),  # invalid UTF-8
        payload("x").replace(b'"x"', b'"a"b"'),  # unescaped quote
        payload("x").replace(b'"x"', b"null"),
        b"[DONE]",
    ],
)
def test_anything_but_a_plain_text_chunk_does_not_match(other: bytes | str) -> None:
    template = learned(payload("Hello"))
    assert template is not None
    raw = other.encode() if isinstance(other, str) else other
    assert template.match(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        payload(""),  # no text: nothing to tell the text's place by
        payload("x", finish="stop"),
        payload(None),
        payload("x", usage={"prompt_tokens": 1}),
        json.dumps(
            {**BASE, "choices": [{"index": 0, "delta": {"role": "user", "content": "x"}}]}
        ).encode(),
        json.dumps(
            {**BASE, "choices": [{"index": 0, "delta": {"content": "x", "reasoning_content": "r"}}]}
        ).encode(),
        # "content" twice: the parser keeps the last one, a template would see the first
        payload("x").replace(b'"content": "x"', b'"content": "a", "content": "b"'),
        json.dumps({**BASE, "note": "content", "choices": [{"delta": {"content": "x"}}]}).encode(),
        # The one raw "content" key is not the text's: the text's key is written with an escape.
        # The probe then lands elsewhere (1), or elsewhere while the text itself reads like
        # the probe, so only the whole-document comparison tells (2).
        _escaped_key_text("x", elsewhere="\x01probe \u00e9"),  # (1)
        _escaped_key_text("\x01probe \u00e9", elsewhere="x"),  # (2)
        # (3) The text is the probe itself, from an escaped duplicate key that overrides the
        # plain one: finding the probe there would prove nothing, so another probe is used.
        payload("Hi").replace(b'"Hi"', b'"Hi", "c\\u006fntent": "\\u0001probe \\u00e9"'),
        # valid JSON over two lines: no one-line `data:` event could carry it
        payload("x").replace(b", ", b",\n", 1),
        payload("x").replace(b", ", b",\r", 1),
        # logprobs belong to their own chunk: a template would drop them (any shape of them)
        payload("x").replace(b'"logprobs": null', b'"logprobs": {"tokens": ["x"]}'),
    ],
)
def test_learns_only_from_an_unambiguous_plain_text_chunk(raw: bytes) -> None:
    chunk = parse_upstream_event(raw.decode())
    assert isinstance(chunk, Chunk)
    assert TextTemplate.learn(raw, chunk) is None


def test_a_template_of_one_kind_never_matches_the_other() -> None:
    template = learned(thinking("Let me see"), reasoning=True)
    assert template is not None
    assert template.match(payload("text")) is None
    assert template.match(thinking("x", content="y")) is None
    assert template.match(thinking("x", finish="stop")) is None
    text = learned(payload("Hello"))
    assert text is not None
    assert text.match(thinking("x")) is None
    assert learned(payload("Hello"), reasoning=True) is None  # not thinking
    assert learned(thinking("hm")) is None  # not text


@pytest.mark.parametrize(
    "raw",
    [
        thinking(""),  # no text: nothing to tell its place by
        thinking("x", content=""),  # the chunk carries text too (even empty)
        thinking("x", content="y"),
        thinking("x", finish="stop"),
        thinking("x", usage={"prompt_tokens": 1}),
        json.dumps(
            {**BASE, "choices": [{"delta": {"role": "user", "reasoning_content": "x"}}]}
        ).encode(),
        thinking("x").replace(
            b'"reasoning_content": "x"', b'"reasoning_content": "a", "reasoning_content": "b"'
        ),
        thinking("x").replace(b", ", b",\n", 1),
    ],
)
def test_learns_thinking_only_from_an_unambiguous_thinking_chunk(raw: bytes) -> None:
    assert learned(raw, reasoning=True) is None


def _client_bytes(
    dialect: Dialect, pieces: list[bytes], templates: bool, shortcut: bool = False
) -> bytes:
    """What the client gets; `shortcut` reads as reframe does (`text_literal` first)."""
    if isinstance(dialect, ResponsesDialect):
        # Its item ids are random: number them in order, the same for both paths.
        count = itertools.count()
        ids = mock.patch(
            "ds2oai.dialects.responses.new_id", lambda prefix: f"{prefix}_{next(count)}"
        )
        with ids:
            return _read_through(dialect, pieces, templates, shortcut)
    return _read_through(dialect, pieces, templates, shortcut)


def _responses() -> ResponsesDialect:
    return ResponsesDialect(response_id="resp_1", created_at=7, model="gpt", echo={})


def _read_through(dialect: Dialect, pieces: list[bytes], templates: bool, shortcut: bool) -> bytes:
    reader = EventReader(make_exchange(), (), templates=templates)
    out: list[bytes] = []
    for piece in pieces:
        literal = reader.text_literal(piece) if shortcut else None
        thought = reader.reasoning_literal(piece) if shortcut and literal is None else None
        fragment = (
            reader.arguments_literal(piece)
            if shortcut and literal is None and thought is None
            else None
        )
        if literal is not None:
            out.append(dialect.feed_text(literal))
        elif thought is not None:
            out.append(dialect.feed_reasoning(thought))
        elif fragment is not None:
            out.append(dialect.feed_arguments(reader.arguments_index, fragment))
        else:
            out.extend(dialect.feed(event) for event in reader.read(piece))
    out.append(dialect.feed(EndOfBody()))
    return b"".join(out)


texts = st.lists(
    st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from('"\\\n')
    # Lone surrogates (`st.text` never draws them): `json.dumps` writes them as `\u` escapes,
    # which orjson refuses; the byte path must skip such a chunk as the parsed path does.
    | st.sampled_from("\ud800\udbff\udc00\udfff"),
    max_size=6,
).map("".join)
frame_kinds = st.sampled_from(
    [
        *("text", "text", "text", "thinking", "thinking", "role", "finish", "usage", "comment"),
        *("call", "args", "args", "args"),
    ]
)


def tool_call(arguments: Any, index: int = 0, **start: Any) -> bytes:
    """A tool-call chunk as DeepSeek streams them: `start` (id, type, name) on a call's first."""
    function = {**({"name": start.pop("name")} if "name" in start else {}), "arguments": arguments}
    call = {"index": index, **start, "function": function}
    delta = {"content": None, "tool_calls": [call]}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    return json.dumps({**BASE, "choices": [choice], "usage": None}).encode()


def _frames(draws: list[tuple[str, str]]) -> bytes:
    out = [b"data: " + payload("first") + b"\n\n"]
    calls = 0
    for kind, text in draws:
        if kind == "call":
            start = {"id": f"call_{calls}", "type": "function", "name": "f"}
            out.append(b"data: " + tool_call("", calls, **start) + b"\n\n")
            calls += 1
        elif kind == "args":
            out.append(b"data: " + tool_call(text, max(calls - 1, 0)) + b"\n\n")
        elif kind == "text":
            out.append(b"data: " + payload(text) + b"\n\n")
        elif kind == "thinking":
            out.append(b"data: " + thinking(text) + b"\n\n")
        elif kind == "role":
            delta = {"role": "assistant", "content": text}
            raw = json.dumps({**BASE, "choices": [{"delta": delta}]})
            out.append(b"data: " + raw.encode() + b"\n\n")
        elif kind == "finish":
            out.append(b"data: " + payload(text, finish="stop") + b"\n\n")
        elif kind == "usage":
            usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
            raw = json.dumps({**BASE, "choices": [], "usage": usage})
            out.append(b"data: " + raw.encode() + b"\n\n")
        else:
            out.append(b": keep-alive\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(frame_kinds, texts), max_size=14),
    st.lists(st.integers(1, 400), max_size=8),
    st.booleans(),
)
def test_templates_never_change_what_the_client_gets(
    draws: list[tuple[str, str]], cuts: list[int], usage: bool
) -> None:
    body = _frames(draws)
    positions = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *positions], [*positions, len(body)], strict=True)]
    makers: list[Callable[[], Dialect]] = [
        lambda: SpecDialect("gpt"),
        lambda: ChatDialect("gpt", include_usage=usage),
        _responses,
    ]
    for make in makers:
        slow = _client_bytes(make(), pieces, templates=False)
        fast = _client_bytes(make(), pieces, templates=True)
        # Same events, same order, same text: JSON may differ only in escaping.
        assert _decoded(fast) == _decoded(slow)


def test_tool_call_arguments_take_their_own_byte_path() -> None:
    start = {"id": "call_0", "type": "function", "name": "f"}
    body = b"data: " + tool_call("", 0, **start) + b"\n\n"
    body += b"".join(b"data: " + tool_call(f'{{"a{i}":', 0) + b"\n\n" for i in range(5))
    body += b"data: " + tool_call("", 1, **{**start, "id": "call_1"}) + b"\n\n"
    body += b"".join(b"data: " + tool_call(f"b{i}", 1) + b"\n\n" for i in range(5))
    reader = EventReader(make_exchange(), (), templates=True)
    events = reader.read(body)
    # Each call: its start and first fragment parsed (the second call's first fragment does
    # not fit the first call's template, so a new one is learned from it), then the rest.
    assert [type(e) for e in events] == [Chunk, Chunk, ArgumentsDelta, Chunk, Chunk, ArgumentsDelta]
    first, second = events[2], events[5]
    assert isinstance(first, ArgumentsDelta)
    assert isinstance(second, ArgumentsDelta)
    assert (first.index, [json.loads(x) for x in first.literals]) == (
        0,
        [f'{{"a{i}":' for i in range(1, 5)],
    )
    assert (second.index, [json.loads(x) for x in second.literals]) == (
        1,
        [f"b{i}" for i in range(1, 5)],
    )
    one = b"data: " + tool_call("b5", 1) + b"\n\n"
    assert reader.arguments_literal(one) == b'"b5"'
    assert reader.text_literal(one) is None
    assert reader.arguments_literal(b"data: " + tool_call("a5", 0) + b"\n\n") is None


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        # the arguments were not whole when the text came: the call stayed open and takes it
        ("1", ['{"a":', "1", "}"]),
        # they were whole: the text closed the call, so a later fragment is dropped
        ("1}", ['{"a":', "1}"]),
    ],
)
def test_the_responses_dialect_treats_a_late_call_fragment_as_its_parsed_path_does(
    second: str, expected: list[str]
) -> None:
    start = {"id": "call_0", "type": "function", "name": "f"}
    frames = [
        payload("first"),
        tool_call("", 0, **start),
        tool_call('{"a":', 0),  # parsed: the template is learned from it
        tool_call("", 0),  # an empty fragment: no event
        tool_call(second, 0),  # a literal for the open call
        payload("text"),  # opens a message item
        tool_call("}", 0),  # a fragment for the call
        payload("", finish="tool_calls"),
    ]
    body = b"".join(b"data: " + frame + b"\n\n" for frame in frames) + b"data: [DONE]\n\n"
    slow = _client_bytes(_responses(), [body], templates=False)
    fast = _client_bytes(_responses(), [body], templates=True)
    assert _decoded(fast) == _decoded(slow)
    deltas = [
        json.loads(block.split("\ndata: ")[1])["delta"]
        for block in fast.decode().split("\n\n")
        if block.startswith("event: response.function_call_arguments.delta")
    ]
    assert deltas == expected


@pytest.mark.parametrize(
    "raw",
    [
        tool_call("x", 0, id="call_1"),
        tool_call("x", 0, name="f"),
        json.dumps(
            {
                **BASE,
                "choices": [
                    {
                        "delta": {
                            "tool_calls": [
                                {"index": 0, "function": {"arguments": "x"}},
                                {"index": 1, "function": {"arguments": "y"}},
                            ]
                        }
                    }
                ],
            }
        ).encode(),
        tool_call("x").replace(b'"content": null', b'"content": "hi"'),
        tool_call("x").replace(b'"arguments": "x"', b'"arguments": "x", "arguments": "y"'),
    ],
)
def test_learns_arguments_only_from_an_unambiguous_fragment(raw: bytes) -> None:
    chunk = parse_upstream_event(raw.decode())
    assert isinstance(chunk, Chunk)
    assert TextTemplate.learn_arguments(raw, chunk) is None


def test_learns_arguments_from_a_plain_fragment() -> None:
    raw = tool_call('{"path": "a')
    chunk = parse_upstream_event(raw.decode())
    assert isinstance(chunk, Chunk)
    template = TextTemplate.learn_arguments(raw, chunk)
    assert template is not None
    assert template.match(tool_call("b\u00e9")) == json.dumps("b\u00e9").encode()
    assert template.match(tool_call("b", 1)) is None


def _collected(pieces: list[bytes], templates: bool) -> tuple[object, int]:
    """The non-streaming answer (or the error) the collector gives, and how many byte-path
    events it was fed."""
    collector = CompletionCollector("gpt")
    reader = EventReader(make_exchange(), (), templates=templates)
    literal_events = 0
    for piece in pieces:
        for event in reader.read(piece):
            literal_events += type(event) in (TextDelta, ReasoningDelta, ArgumentsDelta)
            collector.feed(event)
    collector.feed(EndOfBody())
    try:
        return collector.result(), literal_events
    except ClientError as exc:
        return (exc.status, exc.to_json()), literal_events


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(frame_kinds, texts), max_size=14),
    st.lists(st.integers(1, 400), max_size=8),
)
def test_templates_never_change_the_non_streaming_answer(
    draws: list[tuple[str, str]], cuts: list[int]
) -> None:
    body = _frames([*draws, ("finish", "")])  # an answer, not only errors, to compare
    positions = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *positions], [*positions, len(body)], strict=True)]
    slow, none = _collected(pieces, templates=False)
    fast, _ = _collected(pieces, templates=True)
    assert none == 0
    assert fast == slow


def test_a_plain_answer_is_collected_from_the_byte_path() -> None:
    body = b"".join(b"data: " + thinking(f"r{i} ") + b"\n\n" for i in range(10))
    body += b"".join(b"data: " + payload(f"w{i} \u00e9\n") + b"\n\n" for i in range(10))
    body += b"data: " + payload("", finish="stop") + b"\n\ndata: [DONE]\n\n"
    answer, literal_events = _collected([body], templates=True)
    assert literal_events == 2  # everything but each kind's first chunk and the last
    assert isinstance(answer, dict)
    message = answer["choices"][0]["message"]
    assert message["content"] == "".join(f"w{i} \u00e9\n" for i in range(10))
    assert message["reasoning_content"] == "".join(f"r{i} " for i in range(10))
    assert answer["choices"][0]["finish_reason"] == "stop"


def _canonical(data: str) -> str:
    return jsonutil.dumps(json.loads(data)).decode()


def _decoded(stream: bytes) -> list[Any]:
    """Each event's lines and data, the JSON re-encoded one way: only the escaping of strings
    may differ between two streams that compare equal (key order and number types may not)."""
    out: list[Any] = []
    for block in stream.decode().split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        data = lines[-1].removeprefix("data: ")
        out.append((lines[:-1], data if data == "[DONE]" else _canonical(data)))
    return out


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_the_common_stream_takes_the_byte_path(eol: bytes) -> None:
    body = b"".join(b"data: " + payload(f"w{i} ") + eol + eol for i in range(20))
    reader = EventReader(make_exchange(), (), templates=True)
    events = reader.read(body)
    assert [type(e) for e in events] == [Chunk, TextDelta]
    delta = events[1]
    assert isinstance(delta, TextDelta)
    assert [json.loads(x) for x in delta.literals] == [f"w{i} " for i in range(1, 20)]


def test_a_crlf_paced_read_takes_the_shortcut() -> None:
    reader = EventReader(make_exchange(), (), templates=True)
    reader.read(b"data: " + payload("first") + b"\r\n\r\n")
    assert reader.text_literal(b"data: " + payload("next") + b"\r\n\r\n") == b'"next"'
    assert reader.text_literal(b"data:" + payload("nospace") + b"\n\n") == b'"nospace"'
    assert reader.text_literal(b"data:  " + payload("two") + b"\n\n") is None
    # Not one whole event: a lone CR, a CRLF cut in half, or mixed line ends.
    for other in (b"\r\r\n", b"\r\n\r", b"\n\r\n", b"\r\n\n"):
        assert reader.text_literal(b"data: " + payload("next") + other) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(frame_kinds, texts), max_size=14),
    st.lists(st.integers(0, 30), max_size=6),
    st.lists(st.integers(1, 400), max_size=3),
    st.booleans(),
    st.sampled_from(["lf", "crlf", "unspaced"]),
)
def test_one_event_reads_give_the_same_stream_through_the_shortcut(
    draws: list[tuple[str, str]], merges: list[int], cuts: list[int], usage: bool, spelling: str
) -> None:
    # Reads as a paced upstream sends them: mostly one whole event each, some merged, a few
    # cut anywhere (a cut leaves half an event pending, which the shortcut must not skip);
    # line ends LF, or CRLF (a cut may split one), or `data:` without the space, as some SSE
    # servers write them.
    body = _frames(draws)
    blank = b"\n\n"
    if spelling == "crlf":
        body, blank = body.replace(b"\n", b"\r\n"), b"\r\n\r\n"
    elif spelling == "unspaced":
        body = body.replace(b"data: ", b"data:")
    size = len(blank)
    bounds = {i + size for i in range(len(body)) if body[i : i + size] == blank} | {len(body)}
    bounds -= {b for i, b in enumerate(sorted(bounds)) if i in merges}
    bounds |= {min(c, len(body)) for c in cuts} | {len(body)}
    positions = sorted(bounds)
    pieces = [body[a:b] for a, b in zip([0, *positions[:-1]], positions, strict=True)]
    assert b"".join(pieces) == body
    makers: list[Callable[[], Dialect]] = [
        lambda: SpecDialect("gpt"),
        lambda: ChatDialect("gpt", include_usage=usage),
        _responses,
    ]
    for make in makers:
        slow = _client_bytes(make(), pieces, templates=False)
        fast = _client_bytes(make(), pieces, templates=True, shortcut=True)
        assert _decoded(fast) == _decoded(slow)


def test_thinking_takes_its_own_byte_path() -> None:
    body = b"".join(b"data: " + thinking(f"r{i} ") + b"\n\n" for i in range(10))
    body += b"".join(b"data: " + payload(f"w{i} ") + b"\n\n" for i in range(10))
    reader = EventReader(make_exchange(), (), templates=True)
    tried: list[bytes] = []
    match = TextTemplate.match

    def one_by_one(self: TextTemplate, payload: bytes) -> bytes | None:
        tried.append(payload)
        return match(self, payload)

    with mock.patch.object(TextTemplate, "match", one_by_one):
        events = reader.read(body)
    # Each kind's run is checked at once: only the first text chunk, before its template was
    # learned, is tried against the thinking template on its own.
    assert len(tried) == 1
    assert [type(e) for e in events] == [Chunk, ReasoningDelta, Chunk, TextDelta]
    thoughts, text = events[1], events[3]
    assert isinstance(thoughts, ReasoningDelta)
    assert isinstance(text, TextDelta)
    assert [json.loads(x) for x in thoughts.literals] == [f"r{i} " for i in range(1, 10)]
    assert [json.loads(x) for x in text.literals] == [f"w{i} " for i in range(1, 10)]
    # One whole event per read: the shortcut, each kind by its own template.
    one = b"data: " + thinking("r10 ") + b"\n\n"
    assert reader.text_literal(one) is None
    assert reader.reasoning_literal(one) == b'"r10 "'
    assert reader.reasoning_literal(one + one) is None
    assert reader.reasoning_literal(b"data: " + payload("w10 ") + b"\n\n") is None
    assert EventReader(make_exchange(), (), templates=False).reasoning_literal(one) is None


def test_the_chat_dialect_writes_thinking_as_its_parsed_path_does() -> None:
    parsed, fast = ChatDialect("gpt"), ChatDialect("gpt")
    first = parse_upstream_event(payload("first").decode())
    second = parse_upstream_event(thinking("a\u00e9").decode())
    assert isinstance(first, Chunk)
    assert isinstance(second, Chunk)
    assert parsed.feed(first) == fast.feed(first)
    expected = parsed.feed(second)
    assert b'"reasoning_content"' in expected
    assert fast.feed_reasoning(b'"a\\u00e9"') == expected.replace(b"a\xc3\xa9", b"a\\u00e9")
    assert SpecDialect("gpt").feed_reasoning(b'"x"') == b""  # the spec route has no thinking


def test_a_template_learned_while_a_run_is_flushed_does_not_cut_the_next_run() -> None:
    # A run flushed before an event with an `id:` line falls back to parsing, which learns a
    # template with another prefix; the payloads after it were cut with that one's lengths.
    fits = payload("first")
    at = fits.index(b'"first"')
    prefix, suffix = fits[:at], fits[at + len(b'"first"') :]

    def event(middle: bytes) -> bytes:
        return b"data: " + prefix + middle + suffix + b"\n\n"

    pieces = [
        event(b'"first"'),
        event(b'  "Hi"') + b"id: 7\n" + event(b'"named"') + event(b'"\\"x"'),
    ]
    for make in (lambda: SpecDialect("gpt"), lambda: ChatDialect("gpt")):
        slow = _decoded(_client_bytes(make(), pieces, templates=False))
        assert _decoded(_client_bytes(make(), pieces, templates=True)) == slow
        assert '\\"x' in json.dumps(slow)  # the last text, `"x`, as the parsed path has it


def test_the_shortcut_takes_whole_text_events_only() -> None:
    reader = EventReader(make_exchange(), (), templates=True)
    event = b"data: " + payload("w1 ") + b"\n\n"
    assert reader.text_literal(event) is None  # no template yet
    reader.read(b"data: " + payload("w0 ") + b"\n\n")
    assert reader.text_literal(event) == b'"w1 "'
    assert reader.text_literal(event + event) is None  # two events: read() them
    assert reader.text_literal(event[:-1]) is None  # not ended
    assert reader.text_literal(event.replace(b"\n\n", b"\r\n\r\n")) == b'"w1 "'  # CRLF too
    assert reader.text_literal(event.replace(b"\n\n", b"\r\r")) is None
    assert reader.text_literal(b": ping\n\n" + event) is None
    assert reader.text_literal(b"data: " + payload("w1 ", finish="stop") + b"\n\n") is None
    bad_escape = payload("ax").replace(b'"ax"', b'"a\\x"')
    bad_utf8 = payload("\u00e9").replace(b"\\u00e9", b"\xe9")
    for bad in (bad_escape, bad_utf8):
        assert reader.text_literal(b"data: " + bad + b"\n\n") is None
    # Half an event pending: the next read continues it, whatever it looks like.
    reader.read(event[:20])
    assert reader.text_literal(event) is None
    reader.read(event[20:])
    assert reader.text_literal(event) == b'"w1 "'
    # A CR at the end of a read may be half of a CRLF: that read is the decoder's to finish.
    reader.read(b": ping\r")
    assert reader.text_literal(event) is None
    assert [type(e) for e in reader.read(event)] == [TextDelta]
    assert reader.text_literal(event) == b'"w1 "'


def test_interleaved_calls_on_the_responses_byte_path_match_the_parsed_path() -> None:
    frames = [
        payload("first"),
        tool_call("", 0, id="call_0", type="function", name="f"),
        tool_call("", 1, id="call_1", type="function", name="g"),
        tool_call('{"a":', 0),
        tool_call('{"b":', 1),
        tool_call("1", 0),
        tool_call("2", 1),
        tool_call("}", 0),
        tool_call("}", 1),
        payload("", finish="tool_calls"),
    ]
    # one read per event, as paced: the later fragments take the literal path
    reads = [b"data: " + frame + b"\n\n" for frame in frames] + [b"data: [DONE]\n\n"]
    slow = _client_bytes(_responses(), reads, templates=False)
    fast = _client_bytes(_responses(), reads, templates=True, shortcut=True)
    assert _decoded(fast) == _decoded(slow)
    done = [
        json.loads(block.split("\ndata: ")[1])["arguments"]
        for block in fast.decode().split("\n\n")
        if block.startswith("event: response.function_call_arguments.done")
    ]
    assert done == ['{"a":1}', '{"b":2}']
