"""Client request validation and mapping to the upstream body, per route. Pure; no I/O.

`chat_request()` checks what SPEC §4 lists for a Chat Completions body (a JSON object with a
`messages` list, a boolean `stream`, a string `model`) and builds the upstream body: every
field the client sent except those the gateway consumes itself, the model mapped through the
alias table, `stream: true` (streaming and non-streaming answers share the upstream stream)
with `stream_options.include_usage`.
OpenAI's newer `max_completion_tokens` becomes DeepSeek's `max_tokens` (which DeepSeek reads;
it would ignore the other name, and the answer would silently have no limit) unless the
client also sent `max_tokens`, which then wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ds2oai import jsonutil
from ds2oai.config import ModelsConfig
from ds2oai.errors import ClientError

__all__ = ["ChatRequest", "chat_request", "json_schema_note", "parse_json_body"]

# Fields the gateway consumes or sets itself; everything else goes upstream untouched.
_CONSUMED = frozenset({"model", "stream", "max_completion_tokens"})


def _invalid(code: str, message: str, param: str | None = None) -> ClientError:
    return ClientError(400, "invalid_request_error", code, message, param=param)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _invalid("invalid_json", "The request body is empty; expected a JSON object")
    try:
        body = jsonutil.loads(raw)
    except jsonutil.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson stops past 1024 levels
            raise _too_deep() from None
        raise _invalid("invalid_json", "The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _invalid("invalid_body", "The request body must be a JSON object")
    if _depth_exceeds(body, MAX_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> ClientError:
    return _invalid(
        "too_deeply_nested", f"The request body nests JSON deeper than {MAX_DEPTH} levels"
    )


# orjson parses up to 1024 levels but serializes at most 254; the upstream body is re-encoded,
# so anything deeper would fail there. No real request nests anywhere near this.
MAX_DEPTH = 128


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels deep in `value` (a container itself).

    Recursive, at most `limit` frames deep. Its cost follows the number of containers, not the
    size of the body: counting `[` and `{` first, as a shortcut, cost more than this whole walk
    on a long conversation (60 µs for 84 KB, against 23 µs) and grew with every byte.
    """
    if limit == 0:
        return True
    limit -= 1
    for item in value.values() if type(value) is dict else value:
        kind = type(item)
        if (kind is dict or kind is list) and _depth_exceeds(item, limit):
            return True
    return False


@dataclass(frozen=True, slots=True)
class ChatRequest:
    stream: bool
    exposed_model: str
    upstream_body: Mapping[str, Any]


def chat_request(body: Mapping[str, Any], models: ModelsConfig) -> ChatRequest:
    messages = body.get("messages")
    if messages is None:
        raise _invalid("missing_messages", "'messages' is required", "messages")
    if not isinstance(messages, list):
        raise _invalid("invalid_messages", "'messages' must be a list", "messages")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("invalid_stream", "'stream' must be true or false", "stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("invalid_model", "'model' must be a string", "model")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        # The dialects carry one choice (DeepSeek streams one); more would be merged or lost.
        raise _invalid("unsupported_n", "'n' must be 1: the gateway answers one choice", "n")
    exposed = model or models.default
    upstream: dict[str, Any] = {k: v for k, v in body.items() if k not in _CONSUMED}
    limit = body.get("max_completion_tokens")
    if limit is not None and upstream.get("max_tokens") is None:
        upstream["max_tokens"] = limit
    upstream["model"] = models.upstream_name(model or None)
    upstream["stream"] = True
    # Always asked for: a collected answer, metrics and token limits need it, whatever the
    # client asked (the chat dialect shows it only to clients that asked, as OpenAI does).
    options = body.get("stream_options")
    upstream["stream_options"] = {
        **(options if isinstance(options, Mapping) else {}),
        "include_usage": True,
    }
    _map_json_schema(body.get("response_format"), upstream)
    return ChatRequest(stream=stream, exposed_model=exposed, upstream_body=upstream)


def _map_json_schema(value: Any, upstream: dict[str, Any]) -> None:
    """`response_format: {"type": "json_schema", ...}` -> DeepSeek's `json_object` plus the
    schema as a first system message (DeepSeek answers 400 to `json_schema` and cannot
    constrain its output to a schema; the SDK's `parse()` still checks the answer)."""
    if not isinstance(value, Mapping) or value.get("type") != "json_schema":
        return  # text, json_object, or something the upstream will judge
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _invalid(
            "invalid_response_format",
            "'response_format.json_schema' must be an object",
            "response_format.json_schema",
        )
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise _invalid(
            "invalid_response_format",
            "'response_format.json_schema.schema' must be a JSON schema object",
            "response_format.json_schema.schema",
        )
    note = json_schema_note(schema, spec.get("name"), spec.get("description"))
    upstream["response_format"] = {"type": "json_object"}
    upstream["messages"] = [{"role": "system", "content": note}, *upstream["messages"]]


def json_schema_note(schema: Mapping[str, Any] | None, name: Any, description: Any) -> str:
    """The system note that stands for a JSON schema DeepSeek cannot enforce (it also holds the
    word "json", which DeepSeek's `json_object` mode requires of the prompt)."""
    note = "Reply with one JSON object only, no other text."
    if schema is None:
        return note
    note = note[:-1] + ". It must conform to this JSON Schema"
    if isinstance(name, str) and name:
        note += f' (named "{name}")'
    if isinstance(description, str) and description:
        note += f", described as: {description}"
    return note + ":\n" + jsonutil.dumps(schema).decode()
