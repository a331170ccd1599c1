"""Unit tests of the Responses request -> DeepSeek chat request mapping (PROTOCOLS A.1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ds2oai.config import ModelsConfig
from ds2oai.errors import ClientError
from ds2oai.responses_input import (
    DEEPSEEK_PASSTHROUGH,
    RESPONSES_FIELDS,
    ResponsesRequest,
    parse_responses_request,
)

MODELS = ModelsConfig(default="deepseek-chat", aliases={"gpt-4.1-compatible": "deepseek-chat"})

# Responses-only request fields: none of them may ever reach DeepSeek.
RESPONSES_ONLY = (
    "store",
    "previous_response_id",
    "include",
    "instructions",
    "input",
    "text",
    "reasoning",
    "metadata",
    "truncation",
    "background",
    "prompt_cache_key",
    "safety_identifier",
    "service_tier",
    "stream_options",
    "max_tool_calls",
    "user",
    "max_output_tokens",
)


def parse(body: dict[str, Any], **kwargs: Any) -> ResponsesRequest:
    return parse_responses_request(body, MODELS, **kwargs)


def rejected(body: dict[str, Any], **kwargs: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        parse(body, **kwargs)
    error = info.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    return error


def messages(body: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = parse(body, **kwargs).upstream_body["messages"]
    return result


# --- input ------------------------------------------------------------------------------------


def test_string_input_is_one_user_message_and_one_input_item() -> None:
    request = parse({"model": "deepseek-chat", "input": "Hi there"})
    assert request.upstream_body["messages"] == [{"role": "user", "content": "Hi there"}]
    assert request.new_messages == [{"role": "user", "content": "Hi there"}]
    [item] = request.input_items
    assert item["type"] == "message"
    assert item["role"] == "user"
    assert item["content"] == [{"type": "input_text", "text": "Hi there"}]
    assert item["id"].startswith("msg_")
    assert len(item["id"]) > 8


def test_upstream_body_is_a_streaming_deepseek_request_with_usage() -> None:
    body = parse({"model": "gpt-4.1-compatible", "input": "x", "stream": False}).upstream_body
    assert body["model"] == "deepseek-chat"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_model_alias_maps_upstream_but_the_exposed_name_is_kept() -> None:
    request = parse({"model": "gpt-4.1-compatible", "input": "x"})
    assert request.exposed_model == "gpt-4.1-compatible"
    assert parse({"input": "x"}).exposed_model == "deepseek-chat"
    assert parse({"model": "whatever", "input": "x"}).upstream_body["model"] == "deepseek-chat"


def test_defaults_stream_false_store_true() -> None:
    request = parse({"input": "x"})
    assert request.stream is False
    assert request.store is True
    assert request.echo["store"] is True
    assert request.previous_response_id is None
    assert request.include_encrypted_reasoning is False
    flags = parse({"input": "x", "stream": True, "store": False})
    assert (flags.stream, flags.store, flags.echo["store"]) == (True, False, False)


def test_message_items_roles_and_text_parts() -> None:
    body = {
        "input": [
            {"role": "developer", "content": "Be terse."},
            {"role": "system", "content": [{"type": "input_text", "text": "Sys"}]},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "line one"},
                    {"type": "input_text", "text": "line two"},
                ],
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_old",
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": "It is ", "annotations": []},
                    {"type": "output_text", "text": "18 °C.", "annotations": []},
                ],
            },
        ]
    }
    assert messages(body) == [
        {"role": "system", "content": "Be terse."},
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "line one\nline two"},
        {"role": "assistant", "content": "It is 18 °C."},
    ]


def test_input_items_get_ids_types_and_keep_their_own() -> None:
    body = {
        "input": [
            {"role": "user", "content": "hello"},
            {"type": "message", "role": "assistant", "id": "msg_old", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ]
    }
    items = parse(body).input_items
    assert [i["type"] for i in items] == [
        "message",
        "message",
        "function_call",
        "function_call_output",
    ]
    assert items[0]["id"].startswith("msg_")
    assert items[0]["content"] == [{"type": "input_text", "text": "hello"}]
    assert items[1]["id"] == "msg_old"
    assert items[1]["content"] == [{"type": "output_text", "text": "hi", "annotations": []}]
    assert items[2]["id"].startswith("fc_")
    assert items[3]["id"].startswith("fco_")
    assert len({i["id"] for i in items}) == 4


def test_parallel_function_call_run_is_one_assistant_message() -> None:
    body = {
        "input": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "call_0", "name": "w", "arguments": '{"c":"P"}'},
            {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": '{"c":"R"}'},
            {"type": "function_call_output", "call_id": "call_0", "output": "18"},
            {"type": "function_call_output", "call_id": "call_1", "output": "21"},
        ]
    }
    assert messages(body) == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"c":"P"}'},
                },
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"c":"R"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "18"},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"},
    ]


def test_two_tool_turns_stay_two_assistant_messages() -> None:
    body = {
        "input": [
            {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "a", "output": "1"},
            {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
        ]
    }
    roles = [(m["role"], len(m.get("tool_calls", []))) for m in messages(body)]
    assert roles == [("assistant", 1), ("tool", 0), ("assistant", 1)]


def test_a_reasoning_item_starts_a_new_assistant_turn() -> None:
    body = {
        "input": [
            {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "again"}]},
            {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
        ]
    }
    first, second = messages(body)
    assert [c["id"] for c in first["tool_calls"]] == ["a"]
    assert "reasoning_content" not in first
    assert [c["id"] for c in second["tool_calls"]] == ["b"]
    assert second["reasoning_content"] == "again"


def test_reasoning_item_becomes_reasoning_content_of_the_tool_call_turn() -> None:
    body = {
        "input": [
            {"role": "user", "content": "q"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "short"}],
                "content": [
                    {"type": "reasoning_text", "text": "First, "},
                    {"type": "reasoning_text", "text": "think."},
                ],
            },
            {"type": "function_call", "call_id": "c0", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c1", "name": "g", "arguments": "{}"},
        ]
    }
    [_, assistant] = messages(body)
    assert assistant["reasoning_content"] == "First, think."
    assert [c["id"] for c in assistant["tool_calls"]] == ["c0", "c1"]


def test_reasoning_message_and_calls_of_one_turn_are_one_assistant_message() -> None:
    # What a client sends back when it appends `response.output` to its input.
    body = {
        "input": [
            {"role": "user", "content": "q"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "R"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c0", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c0", "output": "done"},
        ]
    }
    assert messages(body) == [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "R",
            "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "done"},
    ]


def test_reasoning_before_assistant_message_goes_on_it() -> None:
    body = {
        "input": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "S1"}]},
            {"role": "assistant", "content": "A"},
        ]
    }
    assert messages(body) == [{"role": "assistant", "content": "A", "reasoning_content": "S1"}]


def test_reasoning_not_followed_by_an_assistant_turn_is_dropped() -> None:
    body = {
        "input": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "lost"}]},
            {"role": "user", "content": "next"},
            {"role": "assistant", "content": "A"},
        ]
    }
    assert messages(body) == [
        {"role": "user", "content": "next"},
        {"role": "assistant", "content": "A"},
    ]


def test_encrypted_reasoning_is_opened_with_unseal() -> None:
    seen: list[str] = []

    def unseal(blob: str) -> str | None:
        seen.append(blob)
        return "secret thoughts" if blob == "sealed-1" else None

    body = {
        "input": [
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "sealed-1"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]
    }
    [assistant] = messages(body, unseal=unseal)
    assert seen == ["sealed-1"]
    assert assistant["reasoning_content"] == "secret thoughts"


def test_reasoning_text_wins_over_encrypted_content() -> None:
    def unseal(blob: str) -> str | None:
        raise AssertionError("not needed when the text is there")

    body = {
        "input": [
            {
                "type": "reasoning",
                "content": [{"type": "reasoning_text", "text": "plain"}],
                "encrypted_content": "sealed",
            },
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]
    }
    assert messages(body, unseal=unseal)[0]["reasoning_content"] == "plain"


def test_invalid_encrypted_content_is_400_naming_it() -> None:
    body = {
        "input": [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [], "encrypted_content": "forged"},
        ]
    }
    error = rejected(body)  # the default unseal opens nothing
    assert error.code == "invalid_encrypted_content"
    assert error.param == "input[1].encrypted_content"


def test_invalid_encrypted_content_falls_back_to_summary() -> None:
    body = {
        "input": [
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "sum"}],
                "encrypted_content": "foreign",
            },
            {"role": "assistant", "content": "A"},
        ]
    }
    assert messages(body)[0]["reasoning_content"] == "sum"


def test_function_call_output_shapes() -> None:
    body = {
        "input": [
            {"type": "function_call_output", "call_id": "a", "output": "plain"},
            {
                "type": "function_call_output",
                "call_id": "b",
                "output": [
                    {"type": "input_text", "text": "part1"},
                    {"type": "input_text", "text": "part2"},
                ],
            },
            {"type": "function_call_output", "call_id": "c", "output": {"temp_c": 18}},
        ]
    }
    tools = messages(body)
    assert [m["role"] for m in tools] == ["tool", "tool", "tool"]
    assert [m["tool_call_id"] for m in tools] == ["a", "b", "c"]
    assert tools[0]["content"] == "plain"
    assert tools[1]["content"] == "part1part2"
    assert json.loads(tools[2]["content"]) == {"temp_c": 18}


def test_function_call_with_object_arguments_is_serialized() -> None:
    body = {
        "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}]
    }
    call = messages(body)[0]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"a": 1}


def test_history_is_prepended_and_not_in_new_messages() -> None:
    history = [
        {"role": "user", "content": "first"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "r",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
    ]
    body = {
        "input": [{"type": "function_call_output", "call_id": "c", "output": "42"}],
        "previous_response_id": "resp_prev",
    }
    request = parse(body, history=history)
    assert request.upstream_body["messages"] == [
        *history,
        {"role": "tool", "tool_call_id": "c", "content": "42"},
    ]
    assert request.new_messages == [{"role": "tool", "tool_call_id": "c", "content": "42"}]
    assert request.previous_response_id == "resp_prev"
    assert request.echo["previous_response_id"] == "resp_prev"


def test_history_messages_are_copied_not_shared() -> None:
    history = [{"role": "user", "content": "first"}]
    request = parse({"input": "again"}, history=history)
    request.upstream_body["messages"][0]["content"] = "changed"
    assert history == [{"role": "user", "content": "first"}]


def test_instructions_come_first_and_are_not_carried_over() -> None:
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}]
    request = parse({"input": "now", "instructions": "Be nice."}, history=history)
    assert request.upstream_body["messages"] == [
        {"role": "system", "content": "Be nice."},
        *history,
        {"role": "user", "content": "now"},
    ]
    assert request.new_messages == [{"role": "user", "content": "now"}]
    assert request.echo["instructions"] == "Be nice."
    assert all(i["role"] == "user" for i in request.input_items)


def test_empty_input_list_is_allowed_only_with_history() -> None:
    assert rejected({"input": []}).code == "empty_input"
    request = parse({"input": []}, history=[{"role": "user", "content": "q"}])
    assert request.new_messages == []
    assert request.input_items == []


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({}, "missing_input", "input"),
        ({"input": None}, "missing_input", "input"),
        ({"input": 42}, "invalid_input", "input"),
        ({"input": ["x"]}, "invalid_input_item", "input[0]"),
        ({"input": [{"content": "no role or type"}]}, "invalid_input_item", "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "invalid_role", "input[0].role"),
        ({"input": [{"role": "user", "content": 5}]}, "invalid_content", "input[0].content"),
        ({"input": "x", "model": 3}, "invalid_model", "model"),
        ({"input": "x", "stream": "yes"}, "invalid_stream", "stream"),
        ({"input": "x", "store": 1}, "invalid_store", "store"),
        ({"input": "x", "instructions": ["a"]}, "invalid_instructions", "instructions"),
        ({"input": "x", "include": "reasoning"}, "invalid_include", "include"),
        ({"input": "x", "temperature": "hot"}, "invalid_temperature", "temperature"),
        ({"input": "x", "max_output_tokens": 0}, "invalid_max_output_tokens", "max_output_tokens"),
        (
            {"input": "x", "max_output_tokens": True},
            "invalid_max_output_tokens",
            "max_output_tokens",
        ),
        ({"input": "x", "metadata": {"a": 1}}, "invalid_metadata", "metadata"),
        ({"input": "x", "truncation": "sometimes"}, "invalid_truncation", "truncation"),
        ({"input": "x", "tools": {}}, "invalid_tools", "tools"),
        ({"input": "x", "tools": [{"type": "function"}]}, "invalid_tool_name", "tools[0].name"),
        (
            {"input": "x", "previous_response_id": 7},
            "invalid_previous_response_id",
            "previous_response_id",
        ),
        ({"input": "x", "conversation": "conv_1"}, "unsupported_parameter", "conversation"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "unsupported_parameter", "prompt"),
        (
            {"input": "x", "reasoning": {"effort": "huge"}},
            "invalid_reasoning_effort",
            "reasoning.effort",
        ),
        (
            {"input": [{"type": "function_call", "name": "f"}]},
            "missing_call_id",
            "input[0].call_id",
        ),
        ({"input": [{"type": "function_call", "call_id": "c"}]}, "missing_name", "input[0].name"),
        (
            {"input": [{"type": "function_call_output", "output": "x"}]},
            "missing_call_id",
            "input[0].call_id",
        ),
    ],
)
def test_invalid_requests_are_400_with_a_code_and_param(
    body: dict[str, Any], code: str, param: str
) -> None:
    error = rejected(body)
    assert (error.code, error.param) == (code, param)
    assert error.to_json()["error"]["param"] == param


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "web_search_preview"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
        {"type": "image_generation"},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "mcp", "server_label": "x", "server_url": "https://example.com"},
        {"type": "custom", "name": "x"},
    ],
)
def test_hosted_tools_are_unsupported_and_named(tool: dict[str, Any]) -> None:
    fn = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    error = rejected({"input": "x", "tools": [fn, tool]})
    assert error.code == "unsupported_tool"
    assert error.param == "tools[1].type"
    assert tool["type"] in error.message


@pytest.mark.parametrize("part_type", ["input_image", "input_file", "input_audio"])
def test_non_text_content_is_unsupported_and_named(part_type: str) -> None:
    body = {
        "input": [
            {"role": "user", "content": "a"},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "look"}, {"type": part_type}],
            },
        ]
    }
    error = rejected(body)
    assert error.code == "unsupported_content"
    assert error.param == "input[1].content[1].type"


def test_images_in_function_call_output_are_unsupported() -> None:
    body = {
        "input": [
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [{"type": "input_image", "image_url": "data:,"}],
            }
        ]
    }
    assert rejected(body).param == "input[0].output[0].type"


def test_item_reference_is_unsupported_and_named() -> None:
    body = {"input": [{"role": "user", "content": "q"}, {"type": "item_reference", "id": "msg_1"}]}
    error = rejected(body)
    assert error.code == "unsupported_input"
    assert error.param == "input[1]"
    assert "item_reference" in error.message


def test_other_item_types_are_unsupported_and_named() -> None:
    error = rejected({"input": [{"type": "web_search_call", "id": "ws_1"}]})
    assert (error.code, error.param) == ("unsupported_input", "input[0].type")


# --- tools and tool_choice ------------------------------------------------------------------


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object"}, "strict": False}


def test_flat_function_tools_become_nested_chat_tools_and_echo_as_sent() -> None:
    request = parse({"input": "x", "tools": [WEATHER, TIME]})
    assert request.upstream_body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object"}, "strict": False},
        },
    ]
    assert request.echo["tools"] == [WEATHER, TIME]


def test_chat_shaped_tools_are_tolerated_and_echoed_flat() -> None:
    nested = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    request = parse({"input": "x", "tools": [nested]})
    assert request.upstream_body["tools"] == [nested]
    assert request.echo["tools"] == [
        {"type": "function", "name": "f", "parameters": {"type": "object"}}
    ]


def test_no_tools_sends_no_tools_key() -> None:
    body = parse({"input": "x", "tools": [], "tool_choice": "auto"}).upstream_body
    assert "tools" not in body
    assert "tool_choice" not in body
    assert parse({"input": "x"}).echo["tools"] == []


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_string_tool_choices_pass_through(choice: str) -> None:
    request = parse({"input": "x", "tools": [WEATHER], "tool_choice": choice})
    assert request.upstream_body["tool_choice"] == choice
    assert request.echo["tool_choice"] == choice


def test_function_tool_choice_is_nested() -> None:
    choice = {"type": "function", "name": "get_weather"}
    request = parse({"input": "x", "tools": [WEATHER, TIME], "tool_choice": choice})
    assert request.upstream_body["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert request.echo["tool_choice"] == choice


def test_allowed_tools_narrows_the_tools_and_keeps_the_mode() -> None:
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    request = parse({"input": "x", "tools": [WEATHER, TIME], "tool_choice": choice})
    assert request.upstream_body["tool_choice"] == "required"
    assert [t["function"]["name"] for t in request.upstream_body["tools"]] == ["get_time"]
    assert len(request.echo["tools"]) == 2  # the Response echoes what the client declared
    assert request.echo["tool_choice"] == choice


def test_allowed_tools_default_mode_is_auto() -> None:
    choice = {"type": "allowed_tools", "tools": [{"type": "function", "name": "get_time"}]}
    request = parse({"input": "x", "tools": [WEATHER, TIME], "tool_choice": choice})
    assert request.upstream_body["tool_choice"] == "auto"


@pytest.mark.parametrize(
    ("choice", "code", "param"),
    [
        ({"type": "function", "name": "nope"}, "invalid_tool_choice", "tool_choice.name"),
        ({"type": "web_search_preview"}, "unsupported_tool_choice", "tool_choice.type"),
        (
            {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "mcp", "server_label": "s"}],
            },
            "unsupported_tool",
            "tool_choice.tools[0].type",
        ),
        (
            {"type": "allowed_tools", "mode": "sometimes", "tools": []},
            "invalid_tool_choice",
            "tool_choice.mode",
        ),
        ("maybe", "invalid_tool_choice", "tool_choice"),
    ],
)
def test_bad_tool_choices_are_400(choice: Any, code: str, param: str) -> None:
    error = rejected({"input": "x", "tools": [WEATHER], "tool_choice": choice})
    assert (error.code, error.param) == (code, param)


def test_required_tool_choice_without_tools_is_400() -> None:
    error = rejected({"input": "x", "tool_choice": "required"})
    assert (error.code, error.param) == ("invalid_tool_choice", "tool_choice")


# --- other fields ---------------------------------------------------------------------------


def test_sampling_and_limits_are_mapped() -> None:
    body = parse(
        {
            "input": "x",
            "max_output_tokens": 256,
            "temperature": 0.2,
            "top_p": 0.9,
            "parallel_tool_calls": False,
        }
    ).upstream_body
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert body["parallel_tool_calls"] is False
    assert "max_output_tokens" not in body


def test_text_format_json_object_maps_to_response_format() -> None:
    body = parse({"input": "x", "text": {"format": {"type": "json_object"}}}).upstream_body
    assert body["response_format"] == {"type": "json_object"}
    assert (
        "response_format"
        not in parse({"input": "x", "text": {"format": {"type": "text"}}}).upstream_body
    )


def test_text_format_json_schema_maps_to_json_object_with_a_schema_note() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    text = {"format": {"type": "json_schema", "name": "Count", "schema": schema, "strict": True}}
    request = parse({"input": "x", "instructions": "Count.", "text": text})
    body = request.upstream_body
    assert body["response_format"] == {"type": "json_object"}
    first, note, user = body["messages"]
    assert first == {"role": "system", "content": "Count."}
    assert note["role"] == "system"
    assert "JSON" in note["content"]
    assert "Count" in note["content"]
    assert json.loads(note["content"].split("\n", 1)[1]) == schema
    assert user == {"role": "user", "content": "x"}
    assert request.new_messages == [user]
    assert request.echo["text"] == text


def test_text_format_errors() -> None:
    error = rejected({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}})
    assert error.param == "text.format.schema"
    error = rejected({"input": "x", "text": {"format": {"type": "grammar"}}})
    assert (error.code, error.param) == ("unsupported_text_format", "text.format.type")


@pytest.mark.parametrize(
    ("effort", "expected"),
    [("minimal", "low"), ("low", "low"), ("medium", "high"), ("high", "high"), ("xhigh", "max")],
)
def test_reasoning_effort_maps_to_deepseek_levels(effort: str, expected: str) -> None:
    body = parse({"input": "x", "reasoning": {"effort": effort}}).upstream_body
    assert body["reasoning_effort"] == expected
    assert "thinking" not in body


def test_reasoning_effort_none_disables_thinking_and_absent_sends_nothing() -> None:
    body = parse({"input": "x", "reasoning": {"effort": "none"}}).upstream_body
    assert body["thinking"] == {"type": "disabled"}
    assert "reasoning_effort" not in body
    for absent in ({"input": "x"}, {"input": "x", "reasoning": {"summary": "auto"}}):
        body = parse(absent).upstream_body
        assert "reasoning_effort" not in body
        assert "thinking" not in body


def test_include_encrypted_reasoning_flag() -> None:
    request = parse({"input": "x", "include": ["reasoning.encrypted_content"], "store": False})
    assert request.include_encrypted_reasoning is True


def test_user_becomes_deepseek_user_id_only_when_valid() -> None:
    assert parse({"input": "x", "user": "user_42-a"}).upstream_body["user_id"] == "user_42-a"
    assert parse({"input": "x", "safety_identifier": "sid"}).upstream_body["user_id"] == "sid"
    assert "user_id" not in parse({"input": "x", "user": "me@example.com"}).upstream_body


def test_responses_only_fields_never_reach_upstream() -> None:
    body = {
        "model": "deepseek-chat",
        "input": [{"role": "user", "content": "x"}],
        "instructions": "be brief",
        "store": False,
        "previous_response_id": "resp_1",
        "include": ["reasoning.encrypted_content"],
        "text": {"format": {"type": "text"}, "verbosity": "low"},
        "reasoning": {"effort": "high", "summary": "auto"},
        "metadata": {"k": "v"},
        "truncation": "auto",
        "background": False,
        "prompt_cache_key": "pk",
        "safety_identifier": "sid",
        "service_tier": "auto",
        "stream_options": {"include_obfuscation": False},
        "max_tool_calls": 3,
        "user": "u",
        "max_output_tokens": 100,
    }
    upstream = parse(body).upstream_body
    for name in RESPONSES_ONLY:
        if name == "stream_options":
            assert upstream[name] == {"include_usage": True}  # ours, not the client's
        else:
            assert name not in upstream, name
    assert set(upstream) == {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "reasoning_effort",
        "user_id",
    }


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, {}),
        ({"top_logprobs": 0}, {}),
        ({"include": ["message.output_text.logprobs"]}, {"logprobs": True}),
        ({"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
        (
            {"include": ["message.output_text.logprobs"], "top_logprobs": 2},
            {"logprobs": True, "top_logprobs": 2},
        ),
    ],
)
def test_output_text_logprobs_map_to_deepseeks(
    extra: dict[str, Any], expected: dict[str, Any]
) -> None:
    upstream = parse({"input": "x", **extra}).upstream_body
    got = {k: upstream[k] for k in ("logprobs", "top_logprobs") if k in upstream}
    assert got == expected


def test_echo_repeats_the_fields_the_client_set() -> None:
    body = {
        "input": "x",
        "instructions": "I",
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0.5,
        "top_p": 0.7,
        "max_output_tokens": 9,
        "parallel_tool_calls": False,
        "metadata": {"a": "b"},
        "text": {"format": {"type": "json_object"}},
        "reasoning": {"effort": "low", "summary": None},
        "truncation": "auto",
        "user": "u",
        "store": False,
    }
    echo = parse(body).echo
    for name in (
        "instructions",
        "tool_choice",
        "temperature",
        "top_p",
        "max_output_tokens",
        "parallel_tool_calls",
        "metadata",
        "text",
        "reasoning",
        "truncation",
        "user",
    ):
        assert echo[name] == body[name], name
    assert echo["tools"] == [WEATHER]
    assert echo["store"] is False


def test_unknown_fields_are_tolerated_and_passed_upstream_as_sent() -> None:
    request = parse({"input": "x", "frobnicate": {"a": 1}, "test_mode": "reasoning"})
    assert request.upstream_body["frobnicate"] == {"a": 1}
    assert request.upstream_body["test_mode"] == "reasoning"
    assert "frobnicate" not in request.echo


def test_responses_only_fields_never_go_upstream() -> None:
    body = {
        "input": "x",
        "store": False,
        "include": [],
        "metadata": {"a": "b"},
        "truncation": "auto",
        "text": {"format": {"type": "text"}},
        "instructions": "be brief",
        "max_output_tokens": 5,
        "background": False,
        "prompt_cache_key": "k",
        "service_tier": "auto",
    }
    upstream = parse(body).upstream_body
    assert set(upstream) & (RESPONSES_FIELDS - {"model", "stream", "stream_options"}) == set()


def test_deepseek_native_fields_pass_through() -> None:
    assert "thinking" in DEEPSEEK_PASSTHROUGH
    body = {"input": "x", "thinking": {"type": "enabled"}, "stop": ["END"]}
    upstream = parse(body).upstream_body
    assert upstream["thinking"] == {"type": "enabled"}
    assert upstream["stop"] == ["END"]


def test_client_thinking_wins_over_effort_none() -> None:
    body = {"input": "x", "thinking": {"type": "enabled"}, "reasoning": {"effort": "none"}}
    assert parse(body).upstream_body["thinking"] == {"type": "enabled"}


def test_the_request_body_is_not_mutated() -> None:
    body: dict[str, Any] = {
        "input": [{"role": "user", "content": "x"}],
        "tools": [dict(WEATHER)],
        "tool_choice": {"type": "function", "name": "get_weather"},
    }
    snapshot = json.dumps(body, sort_keys=True)
    request = parse(body)
    request.input_items[0]["content"] = "changed"
    assert json.dumps(body, sort_keys=True) == snapshot
