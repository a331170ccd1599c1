"""The official `openai` SDK, unmodified, against `/openai/v1` (chat completions and models)."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from mock_upstream.mock_deepseek_sse import NORMAL_TEXT, NORMAL_TOKENS, REASONING_TEXT
from tests.conftest import CLIENT_KEY, GatewayFactory
from tests.fault_upstream import DONE, FaultUpstream, chunk, sse_script, token_logprobs


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base}/openai/v1",
        api_key=CLIENT_KEY,
        max_retries=0,
    )


MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Hello"}
]


def test_sync_stream_yields_the_exact_text(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        stream = client.chat.completions.create(
            model="gpt-4.1-compatible",
            messages=MESSAGES,
            stream=True,
            extra_body={"test_mode": "normal"},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == NORMAL_TEXT
    assert {c.model for c in chunks} == {"gpt-4.1-compatible"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for


def test_include_usage_adds_one_final_usage_chunk(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        chunks = list(
            client.chat.completions.create(
                model="deepseek-chat",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"test_mode": "normal"},
            )
        )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(NORMAL_TOKENS)
    assert all(c.usage is None for c in chunks[:-1])


def test_non_streaming_completion(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        completion = client.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, extra_body={"test_mode": "normal"}
        )
    assert completion.choices[0].message.content == NORMAL_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(NORMAL_TOKENS)


def test_stream_helper_accumulates_parallel_tool_calls(served_gateway: str) -> None:
    with (
        sdk(served_gateway) as client,
        client.chat.completions.stream(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_body={"test_mode": "parallel_tool_calls"},
        ) as stream,
    ):
        for _ in stream:
            pass
        final = stream.get_final_completion()
        collected = client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            extra_body={"test_mode": "parallel_tool_calls"},
        )
    message = final.choices[0].message
    # A tool-call answer has no text, streamed (content null, as OpenAI streams it) or not.
    assert message.content is None
    assert collected.choices[0].message.content is None
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
    collected_calls = collected.choices[0].message.tool_calls or []
    assert [
        (c.id, c.function.name, c.function.arguments)
        for c in collected_calls
        if c.type == "function"
    ] == calls
    assert calls == [
        ("call_00_mock", "get_weather", '{"city": "Paris"}'),
        ("call_01_mock", "get_time", '{"tz": "Europe/Paris"}'),
    ]


def test_reasoning_content_is_passed_on(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        chunks = list(
            client.chat.completions.create(
                model="deepseek-reasoner",
                messages=MESSAGES,
                stream=True,
                extra_body={"test_mode": "reasoning"},
            )
        )
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    assert reasoning == REASONING_TEXT
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == NORMAL_TEXT


@pytest.mark.parametrize("mode", ["stream_error", "error_event", "insufficient_system_resource"])
def test_broken_streams_raise_api_error(served_gateway: str, mode: str) -> None:
    with sdk(served_gateway) as client:
        stream = client.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, stream=True, extra_body={"test_mode": mode}
        )
        text = ""
        with pytest.raises(openai.APIError):
            for chunk in stream:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert NORMAL_TEXT.startswith(text)
    assert text != NORMAL_TEXT


def test_rate_limit_raises_rate_limit_error(served_gateway: str) -> None:
    with sdk(served_gateway) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_body={"test_mode": "rate_limit"},
        )
    assert info.value.code == "rate_limit"
    assert info.value.response.headers["retry-after"]


def test_bad_key_raises_authentication_error(served_gateway: str) -> None:
    client = openai.OpenAI(
        base_url=f"{served_gateway}/openai/v1", api_key="sk-wrong", max_retries=0
    )
    with client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="deepseek-chat", messages=MESSAGES)


def test_models_lists_the_exposed_names(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        ids = [m.id for m in client.models.list()]
    assert "gpt-4.1-compatible" in ids
    assert "deepseek-chat" in ids


def test_models_retrieve_finds_an_exposed_name_and_404s_another(served_gateway: str) -> None:
    with sdk(served_gateway) as client:
        model = client.models.retrieve("gpt-4.1-compatible")
        assert (model.id, model.object, model.owned_by) == ("gpt-4.1-compatible", "model", "ds2oai")
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


async def test_async_client_streams(served_gateway: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{served_gateway}/openai/v1", api_key=CLIENT_KEY, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,
            stream=True,
            extra_body={"test_mode": "normal"},
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == NORMAL_TEXT


LOGPROB_TOKENS = ["Hel", "lo", " there", "!"]
LOGPROB_EVENTS = [
    chunk(LOGPROB_TOKENS[0], role="assistant", logprobs=token_logprobs(LOGPROB_TOKENS[0])),
    *[chunk(token, logprobs=token_logprobs(token)) for token in LOGPROB_TOKENS[1:]],
    chunk("", finish_reason="stop"),
    DONE,
]


@pytest.mark.parametrize("stream", [True, False])
async def test_logprobs_reach_the_client(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, stream: bool
) -> None:
    # Every chunk but the first repeats the one before except for its text and its logprobs:
    # the byte path must not take them for plain text chunks and drop the logprobs.
    fault_upstream.queue(sse_script(LOGPROB_EVENTS))
    server = await gateway(fault_upstream.url)
    base_url = str(server.make_url("/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        if stream:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="deepseek-chat", messages=MESSAGES, stream=True, logprobs=True
                )
            ]
            choices = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
            assert [c.delta.content for c in choices] == LOGPROB_TOKENS
            tokens = [[e.token for e in (c.logprobs.content or [])] for c in choices if c.logprobs]
            assert tokens == [[token] for token in LOGPROB_TOKENS]
        else:
            completion = await client.chat.completions.create(
                model="deepseek-chat", messages=MESSAGES, logprobs=True
            )
            logprobs = completion.choices[0].logprobs
            assert completion.choices[0].message.content == "".join(LOGPROB_TOKENS)
            assert logprobs is not None
            assert logprobs.content is not None
            assert [e.token for e in logprobs.content] == LOGPROB_TOKENS
            assert logprobs.content[1].logprob == -0.25
    sent = fault_upstream.requests[-1].json
    assert sent["logprobs"] is True


class City(pydantic.BaseModel):
    name: str
    population: int


@pytest.mark.parametrize("stream", [True, False])
async def test_parse_with_a_pydantic_response_format(
    fault_upstream: FaultUpstream, gateway: GatewayFactory, stream: bool
) -> None:
    # The SDK sends `json_schema`, which DeepSeek refuses: the gateway asks for `json_object`
    # and puts the schema in a system note; the SDK checks the answer against the model.
    answer = ['{"name": "Par', 'is", "population": 2102650}']
    fault_upstream.queue(
        sse_script(
            [
                chunk(answer[0], role="assistant"),
                chunk(answer[1]),
                chunk("", finish_reason="stop"),
                DONE,
            ]
        )
    )
    server = await gateway(fault_upstream.url)
    base_url = str(server.make_url("/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        if stream:
            async with client.chat.completions.stream(
                model="deepseek-chat", messages=MESSAGES, response_format=City
            ) as events:
                async for _ in events:
                    pass
                completion = await events.get_final_completion()
        else:
            completion = await client.chat.completions.parse(
                model="deepseek-chat", messages=MESSAGES, response_format=City
            )
    assert completion.choices[0].message.parsed == City(name="Paris", population=2102650)
    sent = fault_upstream.requests[-1].json
    assert sent["response_format"] == {"type": "json_object"}
    note, *rest = sent["messages"]
    assert rest == MESSAGES
    assert note["role"] == "system"
    assert '"City"' in note["content"]
    assert json.dumps(City.model_json_schema()["properties"]["population"]).replace(
        " ", ""
    ) in note["content"].replace(" ", "")
