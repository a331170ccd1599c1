"""Responses API requests (`POST /v1/responses`) mapped to DeepSeek chat requests. Pure; no I/O.

Sits between the route handler and the chain, next to `inbound.chat_request`: the handler
parses the JSON body, loads the stored conversation named by `previous_response_id` (if any)
and calls `parse_responses_request()`, which validates the body and returns a
`ResponsesRequest`: the DeepSeek chat body to send upstream, the chat messages this turn adds
(for storing the conversation), the input as Responses items (for `GET .../input_items`) and
the fields the Response object echoes. It touches nothing but its arguments: no aiohttp, no
store, no clock; reasoning sealed into `encrypted_content` is opened by the `unseal` callable.

Mapping (reference/PROTOCOLS.md A.1):
- `input` string -> one user message; message items (roles user/assistant/system/developer;
  developer -> system) -> one chat message each, text parts joined into one string;
- a run of consecutive `function_call` items -> ONE assistant message with `tool_calls`,
  merged into the assistant message right before it (text and calls of one turn);
- `reasoning` items -> `reasoning_content` on the next assistant message (text from
  `content[].reasoning_text`, else from `encrypted_content` via `unseal`, else `summary[]`);
- `function_call_output` -> a `tool` message; `instructions` -> a first system message that
  is not part of `new_messages` (instructions are not carried over to later turns);
- images, files, hosted tools and `item_reference` -> 400 naming the offending parameter.
Responses-only fields never reach the upstream; unknown fields are tolerated and dropped,
except the DeepSeek-native fields in `DEEPSEEK_PASSTHROUGH` (e.g. `thinking` via `extra_body`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ds2oai import jsonutil
from ds2oai.config import ModelsConfig
from ds2oai.errors import ClientError
from ds2oai.inbound import json_schema_note

__all__ = [
    "DEEPSEEK_PASSTHROUGH",
    "ENCRYPTED_REASONING",
    "RESPONSES_FIELDS",
    "ResponsesRequest",
    "new_id",
    "parse_responses_request",
]

ENCRYPTED_REASONING = "reasoning.encrypted_content"
TEXT_LOGPROBS = "message.output_text.logprobs"

# DeepSeek chat fields a Responses client may add (openai SDK: `extra_body`); sent as given.
# The Responses mapping below wins where both set the same field.
DEEPSEEK_PASSTHROUGH: frozenset[str] = frozenset(
    {"thinking", "reasoning_effort", "stop", "frequency_penalty", "presence_penalty", "user_id"}
)

# Every field of the Responses create request (PROTOCOLS A.1): consumed here, never forwarded.
RESPONSES_FIELDS: frozenset[str] = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "previous_response_id",
        "store",
        "reasoning",
        "text",
        "include",
        "stream",
        "stream_options",
        "truncation",
        "metadata",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "background",
        "conversation",
        "top_logprobs",
        "max_tool_calls",
        "prompt",
        "context_management",
    }
)

# Responses fields the Response object repeats back as the client sent them.
_ECHOED = (
    "instructions",
    "tool_choice",
    "temperature",
    "top_p",
    "max_output_tokens",
    "parallel_tool_calls",
    "previous_response_id",
    "metadata",
    "text",
    "reasoning",
    "truncation",
    "user",
    "background",
    "max_tool_calls",
    "top_logprobs",
    "prompt_cache_key",
    "safety_identifier",
)

# DeepSeek knows only low/high/max (PROTOCOLS D.3); "none" switches thinking off instead.
_EFFORT = {
    "minimal": "low",
    "low": "low",
    "medium": "high",
    "high": "high",
    "xhigh": "max",
    "max": "max",
}
# Known fields that cannot be honoured; ignoring them would silently change the answer.
_UNSUPPORTED_FIELDS = {
    "conversation": "use 'previous_response_id' to continue a conversation",
    "prompt": "send the prompt text as 'instructions' and 'input'",
}
_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,512}")
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_UNSUPPORTED_PARTS = frozenset({"input_image", "input_file", "input_audio", "image_url"})
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


def new_id(prefix: str) -> str:
    """A fresh opaque id such as `msg_<32 hex>` (items, responses)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _invalid(code: str, message: str, param: str | None = None) -> ClientError:
    return ClientError(400, "invalid_request_error", code, message, param=param)


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    stream: bool
    store: bool
    exposed_model: str
    upstream_body: dict[str, Any]
    new_messages: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    echo: dict[str, Any]
    include_encrypted_reasoning: bool
    previous_response_id: str | None


def parse_responses_request(
    body: Mapping[str, Any],
    models: ModelsConfig,
    *,
    history: Sequence[Mapping[str, Any]] = (),
    unseal: Callable[[str], str | None] = lambda blob: None,
    passthrough: Collection[str] = DEEPSEEK_PASSTHROUGH,
) -> ResponsesRequest:
    """Validate a Responses create body and map it to a DeepSeek chat request.

    `history` is the stored conversation (chat messages) to continue; `unseal` opens an
    `encrypted_content` blob (None when it is not ours or was tampered with); `passthrough`
    names the extra body fields sent upstream unchanged. Raises `ClientError` (400).
    """
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("invalid_model", "'model' must be a string", "model")
    stream = _optional_bool(body, "stream", default=False)
    store = _optional_bool(body, "store", default=True)
    for unsupported, hint in _UNSUPPORTED_FIELDS.items():
        if body.get(unsupported) is not None:
            raise _invalid(
                "unsupported_parameter",
                f"'{unsupported}' is not supported by this gateway; {hint}",
                unsupported,
            )
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise _invalid(
            "invalid_previous_response_id",
            "'previous_response_id' must be a string",
            "previous_response_id",
        )
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("invalid_instructions", "'instructions' must be a string", "instructions")
    include = body.get("include")
    if include is not None and (
        not isinstance(include, list) or not all(isinstance(x, str) for x in include)
    ):
        raise _invalid("invalid_include", "'include' must be a list of strings", "include")
    _check_echoed(body)

    new_messages, input_items = _map_input(body.get("input"), unseal, bool(history))
    tools, echo_tools, tool_names = _map_tools(body.get("tools"))
    tool_choice, tools = _map_tool_choice(body.get("tool_choice"), tools, tool_names)

    # SPEC §2: a field the gateway does not consume goes upstream as the client sent it (so the
    # DeepSeek-native `thinking`, or a mock's `test_mode`, arrive); Responses fields never do.
    upstream: dict[str, Any] = {
        k: v for k, v in body.items() if k in passthrough or k not in RESPONSES_FIELDS
    }
    upstream["model"] = models.upstream_name(model or None)
    preamble: list[dict[str, Any]] = []
    if instructions:
        preamble.append({"role": "system", "content": instructions})
    _map_text(body.get("text"), upstream, preamble)
    upstream["messages"] = [
        *preamble,
        *(dict(m) for m in history),
        *(dict(m) for m in new_messages),
    ]
    upstream["stream"] = True
    upstream["stream_options"] = {"include_usage": True}
    if tools:
        upstream["tools"] = tools
    if tool_choice is not None:
        upstream["tool_choice"] = tool_choice
    for ours, theirs in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
    ):
        if body.get(ours) is not None:
            upstream[theirs] = body[ours]
    _map_reasoning(body.get("reasoning"), upstream)
    # Log probabilities of the answer's tokens: DeepSeek's chat `logprobs` / `top_logprobs`.
    top_logprobs = body.get("top_logprobs")
    if TEXT_LOGPROBS in (include or ()) or top_logprobs:
        upstream["logprobs"] = True
        if top_logprobs:
            upstream["top_logprobs"] = top_logprobs
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str) and _USER_ID.fullmatch(user) and "user_id" not in upstream:
        upstream["user_id"] = user

    echo: dict[str, Any] = {k: body[k] for k in _ECHOED if body.get(k) is not None}
    echo["tools"] = echo_tools
    echo["store"] = store
    return ResponsesRequest(
        stream=stream,
        store=store,
        exposed_model=model or models.default,
        upstream_body=upstream,
        new_messages=new_messages,
        input_items=input_items,
        echo=echo,
        include_encrypted_reasoning=ENCRYPTED_REASONING in (include or ()),
        previous_response_id=previous,
    )


def _optional_bool(body: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"invalid_{name}", f"'{name}' must be true or false", name)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_echoed(body: Mapping[str, Any]) -> None:
    """Types of the fields the Response object repeats (a bad echo would break SDK parsing)."""
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and not _is_number(value):
            raise _invalid(f"invalid_{name}", f"'{name}' must be a number", name)
    for name, low in (("max_output_tokens", 1), ("max_tool_calls", 0), ("top_logprobs", 0)):
        value = body.get(name)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= low
        ):
            raise _invalid(f"invalid_{name}", f"'{name}' must be an integer >= {low}", name)
    for name in ("parallel_tool_calls", "background"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _invalid(f"invalid_{name}", f"'{name}' must be true or false", name)
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise _invalid(f"invalid_{name}", f"'{name}' must be a string", name)
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _invalid("invalid_metadata", "'metadata' must map strings to strings", "metadata")
    truncation = body.get("truncation")
    if truncation is not None and truncation not in ("auto", "disabled"):
        raise _invalid(
            "invalid_truncation", "'truncation' must be 'auto' or 'disabled'", "truncation"
        )


# --- input -------------------------------------------------------------------------------


def _map_input(
    value: Any, unseal: Callable[[str], str | None], has_history: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chat messages, input items with ids) for the request's `input`."""
    if value is None:
        raise _invalid("missing_input", "'input' is required", "input")
    if isinstance(value, str):
        message = {"role": "user", "content": value}
        item = {
            "id": new_id("msg"),
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": value}],
        }
        return [message], [item]
    if not isinstance(value, list):
        raise _invalid("invalid_input", "'input' must be a string or a list of items", "input")
    if not value and not has_history:
        raise _invalid("empty_input", "'input' must not be empty", "input")
    return _InputMapper(unseal).run(value)


class _InputMapper:
    """Walks the input items once, grouping each assistant turn into one chat message."""

    __slots__ = ("items", "messages", "open_turn", "reasoning", "unseal")

    def __init__(self, unseal: Callable[[str], str | None]) -> None:
        self.unseal = unseal
        self.messages: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        self.reasoning: list[str] = []  # reasoning text waiting for its assistant message
        # The assistant message that function_call items may still join (same turn).
        self.open_turn: dict[str, Any] | None = None

    def run(self, value: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        for index, item in enumerate(value):
            param = f"input[{index}]"
            if not isinstance(item, dict):
                raise _invalid("invalid_input_item", f"{param} must be an object", param)
            kind = item.get("type")
            if kind is None and "role" in item:
                kind = "message"
            if kind == "message":
                self._message(item, param)
            elif kind == "function_call":
                self._function_call(item, param)
            elif kind == "function_call_output":
                self._function_call_output(item, param)
            elif kind == "reasoning":
                self._reasoning(item, param)
            elif kind == "item_reference":
                raise _invalid(
                    "unsupported_input",
                    f"{param}: 'item_reference' items are not supported; send the item "
                    "itself or use 'previous_response_id'",
                    param,
                )
            elif isinstance(kind, str):
                raise _invalid(
                    "unsupported_input",
                    f"{param}: input items of type {kind!r} are not supported",
                    f"{param}.type",
                )
            else:
                raise _invalid("invalid_input_item", f"{param} needs a 'type' or a 'role'", param)
            self.items.append(_with_id(item, kind))
        return self.messages, self.items

    def _assistant(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
            self.reasoning = []
        self.messages.append(message)
        return message

    def _message(self, item: Mapping[str, Any], param: str) -> None:
        role = item.get("role")
        mapped = _ROLES.get(role) if isinstance(role, str) else None
        if mapped is None:
            raise _invalid(
                "invalid_role",
                f"{param}.role must be one of user, assistant, system, developer",
                f"{param}.role",
            )
        text = _content_text(item.get("content"), f"{param}.content", mapped == "assistant")
        if mapped == "assistant":
            message = self._assistant()
            message["content"] = text
            self.open_turn = message
            return
        self.reasoning = []  # reasoning not followed by its assistant turn is dropped
        self.open_turn = None
        self.messages.append({"role": mapped, "content": text})

    def _function_call(self, item: Mapping[str, Any], param: str) -> None:
        call_id = item.get("call_id")
        name = item.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise _invalid(
                "missing_call_id", f"{param}.call_id must be a string", f"{param}.call_id"
            )
        if not isinstance(name, str) or not name:
            raise _invalid("missing_name", f"{param}.name must be a string", f"{param}.name")
        arguments = item.get("arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):
            arguments = jsonutil.dumps(arguments).decode()
        turn = self.open_turn
        if turn is None:
            turn = self.open_turn = self._assistant()
        turn.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )

    def _function_call_output(self, item: Mapping[str, Any], param: str) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise _invalid(
                "missing_call_id", f"{param}.call_id must be a string", f"{param}.call_id"
            )
        output = item.get("output")
        if isinstance(output, str):
            text = output
        elif isinstance(output, list):
            text = _content_text(output, f"{param}.output", joiner="")
        elif output is None:
            text = ""
        else:
            text = jsonutil.dumps(output).decode()
        self.open_turn = None
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def _reasoning(self, item: Mapping[str, Any], param: str) -> None:
        self.open_turn = None  # a reasoning item starts the next assistant turn
        text = _part_texts(item.get("content"), {"reasoning_text"})
        if text is None:
            blob = item.get("encrypted_content")
            if isinstance(blob, str) and blob:
                text = self.unseal(blob)
                if text is None and _part_texts(item.get("summary"), {"summary_text"}) is None:
                    raise _invalid(
                        "invalid_encrypted_content",
                        f"{param}.encrypted_content could not be verified or decrypted",
                        f"{param}.encrypted_content",
                    )
        if text is None:
            text = _part_texts(item.get("summary"), {"summary_text"}, joiner="\n\n")
        if text:
            self.reasoning.append(text)


def _part_texts(parts: Any, kinds: Collection[str], joiner: str = "") -> str | None:
    """The joined `text` of the parts of the given types; None when there is none."""
    if not isinstance(parts, list):
        return None
    texts = [
        p["text"]
        for p in parts
        if isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str)
    ]
    return joiner.join(texts) if texts else None


def _content_text(
    content: Any, param: str, assistant: bool = False, *, joiner: str | None = None
) -> str:
    """A message's content as one string: text parts joined, anything else refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(
            "invalid_content", f"{param} must be a string or a list of content parts", param
        )
    texts: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise _invalid("invalid_content", f"{where} must be an object", where)
        kind = part.get("type")
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in _UNSUPPORTED_PARTS:
            raise _invalid(
                "unsupported_content",
                f"{where}: content of type {kind!r} is not supported (DeepSeek takes text only)",
                f"{where}.type",
            )
        else:
            raise _invalid(
                "unsupported_content", f"{where}: unsupported content part {kind!r}", where
            )
    # Assistant text is the model's own output, split only by the SDK: glue it back as it was.
    return (joiner if joiner is not None else "" if assistant else "\n").join(texts)


def _with_id(item: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The item as `GET /v1/responses/{id}/input_items` lists it: typed and with an id."""
    out = dict(item)
    out["type"] = kind
    if not isinstance(out.get("id"), str) or not out["id"]:
        out["id"] = new_id(_ID_PREFIX.get(kind, "item"))
    if kind == "message":
        content = out.get("content")
        assistant = out.get("role") == "assistant"
        if isinstance(content, str):
            part: dict[str, Any] = {
                "type": "output_text" if assistant else "input_text",
                "text": content,
            }
            if assistant:
                part["annotations"] = []
            out["content"] = [part]
        if assistant:
            out.setdefault("status", "completed")
    return out


# --- tools, text, reasoning ---------------------------------------------------------------


def _map_tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """(DeepSeek chat tools, tools as the Response echoes them, function names)."""
    if value is None:
        return [], [], set()
    if not isinstance(value, list):
        raise _invalid("invalid_tools", "'tools' must be a list", "tools")
    upstream: list[dict[str, Any]] = []
    echo: list[dict[str, Any]] = []
    names: set[str] = set()
    for index, tool in enumerate(value):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise _invalid("invalid_tool", f"{param} must be an object", param)
        kind = tool.get("type")
        if kind != "function":
            raise _invalid(
                "unsupported_tool",
                f"{param}: tools of type {kind!r} are not supported; only 'function' tools are",
                f"{param}.type",
            )
        nested = tool.get("function")
        # Tolerate the Chat Completions shape {"type": "function", "function": {...}}.
        source = nested if "name" not in tool and isinstance(nested, dict) else tool
        name = source.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("invalid_tool_name", f"{param}.name must be a string", f"{param}.name")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if source.get(key) is not None:
                function[key] = source[key]
        upstream.append({"type": "function", "function": function})
        echo.append(dict(tool) if source is tool else {"type": "function", **function})
        names.add(name)
    return upstream, echo, names


def _map_tool_choice(
    value: Any, tools: list[dict[str, Any]], names: set[str]
) -> tuple[Any, list[dict[str, Any]]]:
    """(DeepSeek tool_choice or None, the tools to send) for a Responses `tool_choice`."""
    if value is None:
        return None, tools
    if value in ("none", "auto", "required"):
        if not tools:
            if value == "required":
                raise _invalid(
                    "invalid_tool_choice", "tool_choice 'required' needs tools", "tool_choice"
                )
            return None, tools  # nothing to choose from; DeepSeek wants no tool_choice then
        return value, tools
    if not isinstance(value, dict):
        raise _invalid(
            "invalid_tool_choice",
            "'tool_choice' must be 'none', 'auto', 'required' or an object",
            "tool_choice",
        )
    kind = value.get("type")
    if kind == "function":
        name = value.get("name")
        if not isinstance(name, str) or name not in names:
            raise _invalid(
                "invalid_tool_choice",
                "tool_choice.name must name one of the function tools",
                "tool_choice.name",
            )
        return {"type": "function", "function": {"name": name}}, tools
    if kind == "allowed_tools":
        # DeepSeek has no allowed_tools: send only the allowed functions, with the mode.
        mode = value.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise _invalid(
                "invalid_tool_choice",
                "tool_choice.mode must be 'auto' or 'required'",
                "tool_choice.mode",
            )
        allowed = value.get("tools")
        if not isinstance(allowed, list):
            raise _invalid(
                "invalid_tool_choice", "tool_choice.tools must be a list", "tool_choice.tools"
            )
        keep: set[str] = set()
        for index, entry in enumerate(allowed):
            param = f"tool_choice.tools[{index}]"
            if not isinstance(entry, dict) or entry.get("type") != "function":
                raise _invalid(
                    "unsupported_tool",
                    f"{param}: only 'function' tools are supported",
                    f"{param}.type",
                )
            name = entry.get("name")
            if not isinstance(name, str) or name not in names:
                raise _invalid(
                    "invalid_tool_choice",
                    f"{param}.name must name one of the function tools",
                    f"{param}.name",
                )
            keep.add(name)
        kept = [t for t in tools if t["function"]["name"] in keep]
        if not kept:
            return None, []
        return mode, kept
    raise _invalid(
        "unsupported_tool_choice",
        f"tool_choice of type {kind!r} is not supported",
        "tool_choice.type",
    )


def _map_text(value: Any, upstream: dict[str, Any], preamble: list[dict[str, Any]]) -> None:
    """`text.format` -> DeepSeek `response_format` (text / json_object only).

    `json_schema` becomes `json_object` plus a system note carrying the schema: DeepSeek has no
    schema-constrained decoding, so the schema is advisory (the SDK's `parse()` still checks it).
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise _invalid("invalid_text", "'text' must be an object", "text")
    fmt = value.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise _invalid("invalid_text_format", "'text.format' must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        upstream["response_format"] = {"type": "json_object"}
        return
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _invalid(
                "invalid_text_format",
                "'text.format.schema' must be a JSON schema object",
                "text.format.schema",
            )
        note = json_schema_note(schema, fmt.get("name"), fmt.get("description"))
        preamble.append({"role": "system", "content": note})
        upstream["response_format"] = {"type": "json_object"}
        return
    raise _invalid(
        "unsupported_text_format",
        f"text.format of type {kind!r} is not supported",
        "text.format.type",
    )


def _map_reasoning(value: Any, upstream: dict[str, Any]) -> None:
    """`reasoning.effort` -> DeepSeek `reasoning_effort`; "none" -> thinking disabled."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _invalid("invalid_reasoning", "'reasoning' must be an object", "reasoning")
    effort = value.get("effort")
    if effort is None:
        return
    if effort == "none":
        upstream.pop("reasoning_effort", None)
        upstream.setdefault("thinking", {"type": "disabled"})
        return
    mapped = _EFFORT.get(effort) if isinstance(effort, str) else None
    if mapped is None:
        raise _invalid(
            "invalid_reasoning_effort",
            "reasoning.effort must be one of none, minimal, low, medium, high, xhigh, max",
            "reasoning.effort",
        )
    upstream["reasoning_effort"] = mapped
