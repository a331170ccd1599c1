"""The official `openai` SDK's Responses API against ds2oai (`/openai/v1/responses`).

Against the bundled mock upstream through `ds2oai serve` (sync client), and in-process against
the fault-injecting upstream where a test must see what went upstream (async client).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from typing import Any

import openai
import pytest
from aiohttp import web
from openai.types.responses import Response, ResponseFunctionToolCall, ResponseReasoningItem

from ds2oai import responses_session
from ds2oai.server import STORE, create_app
from ds2oai.store import MemoryResponseStore, StoredResponse, StoreError
from mock_upstream.mock_deepseek_sse import NORMAL_TEXT, NORMAL_TOKENS, REASONING_TEXT
from tests.conftest import CLIENT_KEY, GatewayFactory, make_config
from tests.fault_upstream import DONE, FaultUpstream, chunk, sse_script, token_logprobs

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/openai/v1", api_key=CLIENT_KEY, max_retries=0)


def test_non_streaming_create_returns_a_response_object(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        response = client.responses.create(
            model="deepseek-chat",
            input="Hello",
            instructions="Be brief.",
            extra_body={"test_mode": "normal"},
        )
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == NORMAL_TEXT
    assert response.instructions == "Be brief."
    assert response.usage is not None
    assert response.usage.output_tokens == len(NORMAL_TOKENS)
    assert response.usage.input_tokens_details.cached_tokens == 0


def test_stream_helper_gets_the_final_response(served_gateway: str) -> None:
    with (
        sdk(served_gateway) as client,
        client.responses.stream(
            model="deepseek-chat", input="Hello", extra_body={"test_mode": "normal"}
        ) as stream,
    ):
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == NORMAL_TEXT
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] == "response.completed"
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == NORMAL_TEXT


def test_raw_stream_has_no_done_marker_and_created_starts_empty(served_gateway: str) -> None:
    body = {"model": "deepseek-chat", "input": "Hello", "stream": True, "test_mode": "normal"}
    request = urllib.request.Request(
        f"{served_gateway}/v1/responses",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as http:
        raw = http.read().decode()
    assert "[DONE]" not in raw
    blocks = [b for b in raw.split("\n\n") if b]
    first = blocks[0].split("\n")
    assert first[0] == "event: response.created"
    data = json.loads(first[1].removeprefix("data: "))
    assert data["type"] == "response.created"
    assert data["response"]["output"] == []
    for block in blocks:
        name, payload = block.split("\n")
        assert json.loads(payload.removeprefix("data: "))["type"] == name.removeprefix("event: ")


def test_function_calls_map_to_items(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        response = client.responses.create(
            model="deepseek-chat",
            input="Weather and time in Paris?",
            tools=[WEATHER_TOOL],
            extra_body={"test_mode": "parallel_tool_calls"},
        )
    calls = [item for item in response.output if isinstance(item, ResponseFunctionToolCall)]
    assert [(c.call_id, c.name) for c in calls] == [
        ("call_00_mock", "get_weather"),
        ("call_01_mock", "get_time"),
    ]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert response.status == "completed"


def test_reasoning_becomes_a_reasoning_item(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        response = client.responses.create(
            model="deepseek-reasoner", input="Hi", extra_body={"test_mode": "reasoning"}
        )
    reasoning = [item for item in response.output if isinstance(item, ResponseReasoningItem)]
    assert len(reasoning) == 1
    assert reasoning[0].content is not None
    assert "".join(part.text for part in reasoning[0].content) == REASONING_TEXT
    assert response.output_text == NORMAL_TEXT
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 4


def test_stored_response_retrieve_input_items_and_delete(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        created = client.responses.create(
            model="deepseek-chat",
            input=[{"role": "user", "content": "Hello"}],
            extra_body={"test_mode": "normal"},
        )
        assert created.completed_at is not None
        assert created.completed_at >= created.created_at
        fetched = client.responses.retrieve(created.id)
        assert fetched.id == created.id
        assert fetched.output_text == NORMAL_TEXT
        assert fetched.completed_at == created.completed_at
        items = client.responses.input_items.list(created.id)
        assert [getattr(i, "role", None) for i in items.data] == ["user"]
        client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created.id)


def test_input_items_pages_with_after_and_before(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        created = client.responses.create(
            model="deepseek-chat",
            input=[{"role": "user", "content": f"m{i}"} for i in range(5)],
            extra_body={"test_mode": "normal"},
        )
        ids = [item.id for item in client.responses.input_items.list(created.id, order="asc")]
        assert len(ids) == 5

        def page(**query: str) -> list[str]:
            # `before` is not among the SDK's list parameters any more: plain HTTP.
            params = urllib.parse.urlencode({"order": "asc", **query})
            request = urllib.request.Request(
                f"{served_gateway}/v1/responses/{created.id}/input_items?{params}",
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            )
            with urllib.request.urlopen(request, timeout=30) as http:
                return [item["id"] for item in json.loads(http.read())["data"]]

        assert page(after=ids[1]) == ids[2:]
        assert page(before=ids[3]) == ids[:3]
        assert page(before=ids[4], limit="2") == ids[2:4]  # the page just before the cursor
        assert page(after=ids[0], before=ids[4]) == ids[1:4]
        assert page(before="msg_unknown") == []


def test_store_false_is_not_retrievable(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        created = client.responses.create(
            model="deepseek-chat", input="Hello", store=False, extra_body={"test_mode": "normal"}
        )
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created.id)


def test_previous_response_id_unknown_is_a_bad_request(served_gateway: str) -> None:
    with sdk(served_gateway) as client, pytest.raises(openai.BadRequestError):
        client.responses.create(
            model="deepseek-chat", input="Hello", previous_response_id="resp_nope"
        )


def test_built_in_tools_are_rejected_naming_the_field(served_gateway: str) -> None:
    with sdk(served_gateway) as client, pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model="deepseek-chat", input="Hello", tools=[{"type": "web_search"}]
        )
    assert info.value.param == "tools[0].type"


def test_broken_stream_ends_in_response_failed(served_gateway: str) -> None:
    with (
        sdk(served_gateway) as client,
        client.responses.stream(
            model="deepseek-chat", input="Hello", extra_body={"test_mode": "stream_error"}
        ) as stream,
    ):
        events = list(stream)
        with pytest.raises(RuntimeError):
            stream.get_final_response()
    assert events[-1].type == "response.failed"
    assert sum(e.type in ("response.completed", "response.failed") for e in events) == 1


def test_failed_stream_is_stored_as_failed_and_cannot_be_continued(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        with client.responses.stream(
            model="deepseek-chat", input="Hello", extra_body={"test_mode": "stream_error"}
        ) as stream:
            events = list(stream)
        assert events[-1].type == "response.failed"
        failed = events[-1].response
        fetched = client.responses.retrieve(failed.id)
        assert fetched.status == "failed"
        assert fetched.error is not None
        assert failed.error is not None
        assert fetched.error.message == failed.error.message
        # What the client saw before the failure is kept, marked as cut off.
        assert fetched.output_text == "".join(NORMAL_TOKENS[:3])
        assert [getattr(item, "status", None) for item in fetched.output] == ["incomplete"]
        items = client.responses.input_items.list(failed.id)
        assert [getattr(i, "role", None) for i in items.data] == ["user"]
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(
                model="deepseek-chat", input="Go on", previous_response_id=failed.id
            )
        assert info.value.code == "previous_response_failed"
        assert info.value.param == "previous_response_id"
        client.responses.delete(failed.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(failed.id)


def test_non_streaming_broken_upstream_is_an_http_error(served_gateway: str) -> None:
    with sdk(served_gateway) as client, pytest.raises(openai.InternalServerError):
        client.responses.create(
            model="deepseek-chat", input="Hello", extra_body={"test_mode": "stream_error"}
        )


@pytest.mark.parametrize(
    ("events", "code", "message"),
    [
        (
            [b'data: {"error": {"code": "invalid_x", "message": "bad thing"}}\n\n'],
            "invalid_x",
            "bad thing",
        ),
        (
            [
                chunk("Hel", role="assistant"),
                chunk("lo", finish_reason="insufficient_system_resource"),
                DONE,
            ],
            "insufficient_system_resource",
            "insufficient system resource",
        ),
    ],
)
async def test_non_streaming_upstream_errors_keep_the_upstreams_code(
    fault_upstream: FaultUpstream,
    gateway: GatewayFactory,
    events: list[bytes],
    code: str,
    message: str,
) -> None:
    # As both chat routes answer them: the upstream's code, not a generic one.
    fault_upstream.queue(sse_script(events))
    server = await gateway(fault_upstream.url)
    base_url = str(server.make_url("/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as sdk_client:
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk_client.responses.create(model="deepseek-chat", input="Hello")
    assert caught.value.code == code
    assert message in str(caught.value.message)


def test_rate_limit_raises_rate_limit_error(served_gateway: str) -> None:
    with sdk(served_gateway) as client, pytest.raises(openai.RateLimitError):
        client.responses.create(
            model="deepseek-chat", input="Hello", extra_body={"test_mode": "rate_limit"}
        )


# ------------------------------------------- conversation state, seen from the upstream side

TOOL_CALL_EVENTS = [
    chunk(role="assistant", reasoning=""),
    chunk(reasoning="Need the weather."),
    b'data: {"id":"up-1","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":'
    b'{"tool_calls":[{"index":0,"id":"call_00_a","type":"function","function":{"name":'
    b'"get_weather","arguments":""}}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"up-1","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":'
    b'{"tool_calls":[{"index":1,"id":"call_01_b","type":"function","function":{"name":'
    b'"get_weather","arguments":"{\\"city\\": \\"Rome\\"}"}}]},"finish_reason":null}]}\n\n',
    b'data: {"id":"up-1","created":1,"model":"deepseek-chat","choices":[{"index":0,"delta":'
    b'{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": \\"Paris\\"}"}}]},'
    b'"finish_reason":null}]}\n\n',
    chunk("", finish_reason="tool_calls", usage={"prompt_tokens": 9, "completion_tokens": 5}),
    DONE,
]
ANSWER_EVENTS = [
    chunk(role="assistant", content=""),
    chunk("Sunny."),
    chunk("", finish_reason="stop"),
    DONE,
]


def tool_outputs(response: Any) -> Any:
    return [
        {"type": "function_call_output", "call_id": item.call_id, "output": '{"temp": 20}'}
        for item in response.output
        if item.type == "function_call"
    ]


async def test_reasoning_is_sent_back_on_the_stored_tool_call_turn(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    fault_upstream.queue(sse_script(TOOL_CALL_EVENTS), sse_script(ANSWER_EVENTS))
    server = await gateway(fault_upstream.url)
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/openai/v1")), api_key="x", max_retries=0
    ) as client:
        first = await client.responses.create(
            model="deepseek-reasoner", input="Weather in Paris and Rome?", tools=[WEATHER_TOOL]
        )
        second = await client.responses.create(
            model="deepseek-reasoner",
            previous_response_id=first.id,
            input=tool_outputs(first),
            tools=[WEATHER_TOOL],
        )
    assert second.output_text == "Sunny."
    messages = fault_upstream.requests[1].json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assistant = messages[1]
    assert assistant["reasoning_content"] == "Need the weather."
    # both parallel calls of the turn go back as ONE assistant message
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_00_a", "call_01_b"]
    assert [m["tool_call_id"] for m in messages[2:]] == ["call_00_a", "call_01_b"]


async def test_stateless_reasoning_round_trips_through_encrypted_content(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    fault_upstream.queue(sse_script(TOOL_CALL_EVENTS), sse_script(ANSWER_EVENTS))
    server = await gateway(fault_upstream.url)
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/openai/v1")), api_key="x", max_retries=0
    ) as client:
        first = await client.responses.create(
            model="deepseek-reasoner",
            input="Weather in Paris and Rome?",
            tools=[WEATHER_TOOL],
            store=False,
            include=["reasoning.encrypted_content"],
        )
        reasoning = [item for item in first.output if item.type == "reasoning"]
        assert reasoning[0].encrypted_content
        assert "Need the weather" not in reasoning[0].encrypted_content
        # a stateless client sends the items back without the readable reasoning
        replay: list[Any] = [{"role": "user", "content": "Weather in Paris and Rome?"}]
        for item in first.output:
            data = item.model_dump(exclude_none=True)
            if item.type == "reasoning":
                data["content"] = []
                data["summary"] = []
            replay.append(data)
        replay += tool_outputs(first)
        await client.responses.create(
            model="deepseek-reasoner", input=replay, tools=[WEATHER_TOOL], store=False
        )
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(first.id)
    messages = fault_upstream.requests[1].json["messages"]
    assert messages[1]["role"] == "assistant"
    assert messages[1]["reasoning_content"] == "Need the weather."


async def test_tampered_encrypted_content_is_rejected(
    fault_upstream: FaultUpstream, gateway: GatewayFactory
) -> None:
    server = await gateway(fault_upstream.url)
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/openai/v1")), api_key="x", max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(
                model="deepseek-reasoner",
                input=[
                    {"role": "user", "content": "x"},
                    {
                        "type": "reasoning",
                        "id": "rs_1",
                        "summary": [],
                        "encrypted_content": "ds2oai.v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                    },
                    {"role": "assistant", "content": "ok"},
                ],
            )
    assert fault_upstream.requests == []


@pytest.mark.parametrize("stream", [True, False])
async def test_output_text_logprobs_when_included(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, stream: bool
) -> None:
    tokens = ["Hel", "lo", "!"]
    fault_upstream.queue(
        sse_script(
            [
                chunk(tokens[0], role="assistant", logprobs=token_logprobs(tokens[0])),
                *[chunk(token, logprobs=token_logprobs(token, -1.5)) for token in tokens[1:]],
                chunk("", finish_reason="stop"),
                DONE,
            ]
        )
    )
    server = await gateway(fault_upstream.url)
    base_url = str(server.make_url("/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        request: Any = {
            "model": "deepseek-chat",
            "input": "Hello",
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
        }
        if stream:
            async with client.responses.stream(**request) as events:
                deltas = [e async for e in events if e.type == "response.output_text.delta"]
                final = await events.get_final_response()
            assert [[lp.token for lp in e.logprobs] for e in deltas] == [[t] for t in tokens]
        else:
            final = await client.responses.create(**request)
    message = final.output[0]
    assert message.type == "message"
    part = message.content[0]
    assert part.type == "output_text"
    assert [lp.token for lp in part.logprobs or []] == tokens
    assert [lp.logprob for lp in part.logprobs or []] == [-0.25, -1.5, -1.5]
    sent = fault_upstream.requests[-1].json
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)


class FailingStore(MemoryResponseStore):
    """A store whose saves fail (`hang`: never finish); reads work."""

    def __init__(self, hang: bool) -> None:
        super().__init__()
        self.hang = hang

    async def put(self, item: StoredResponse) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        raise StoreError("redis store redis://db:6379/0: put failed: Timeout")


@pytest.mark.parametrize("hang", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_save_does_not_fail_the_answer(
    fault_upstream: FaultUpstream,
    aiohttp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    hang: bool,
    stream: bool,
) -> None:
    # `store` defaults to true, so every client depends on the store; an answer it already got
    # is given whole, and the failure is logged (the id is then unknown to GET).
    monkeypatch.setattr(responses_session, "SAVE_TIMEOUT", 0.2)
    app = create_app(make_config(fault_upstream.url))

    async def failing_store(app: web.Application) -> None:  # after the app opened its own
        await app[STORE].close()
        app[STORE] = FailingStore(hang)

    app.on_startup.append(failing_store)
    server = await aiohttp_server(app)
    base_url = str(server.make_url("/openai/v1"))
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        response: Response
        if stream:
            async with client.responses.stream(model="deepseek-chat", input="Hi") as events:
                async for _ in events:
                    pass
                response = await events.get_final_response()
        else:
            response = await client.responses.create(model="deepseek-chat", input="Hi")
        assert time.monotonic() - started < 2.0  # not the store's own timeouts
        assert (response.status, response.output_text) == ("completed", "Hello world")
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response.id)
    [record] = [r for r in caplog.records if r.getMessage() == "end-of-answer hook failed"]
    assert ("took over 0.2 s" if hang else "put failed") in (record.exc_text or "")
