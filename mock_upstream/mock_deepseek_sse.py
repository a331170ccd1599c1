"""Mock DeepSeek Chat Completions upstream (FastAPI app) for testing the ds2oai gateway.

Run from inside this folder::

    uvicorn mock_deepseek_sse:app --host 0.0.0.0 --port 9001 --reload

It imitates the DeepSeek OpenAI-format API: ``GET /models``, ``POST /chat/completions`` (both
also under ``/v1``), streaming as Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``) or
answering one ``chat.completion`` JSON body. The request field ``test_mode`` selects a scripted
scenario (normal text, errors, broken streams, keep-alives, tool calls, reasoning, ...); see
``TEST_MODES`` and README.md. Every mode is deterministic apart from the per-request ``id`` and
``created`` values.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

READY_MESSAGE = "Mock DeepSeek SSE upstream is running"

NORMAL_TOKENS: tuple[str, ...] = (
    "Hello",
    "!",
    " This",
    " is",
    " a",
    " mock",
    " DeepSeek",
    " stream",
    ".",
)
NORMAL_TEXT = "".join(NORMAL_TOKENS)

REASONING_TOKENS: tuple[str, ...] = ("The user", " greets", " me", ".")
REASONING_TEXT = "".join(REASONING_TOKENS)

TEST_MODES: tuple[str, ...] = (
    "break_once",
    "normal",
    "rate_limit",
    "stream_error",
    "server_error",
    "error_event",
    "malformed",
    "keepalive",
    "slow",
    "long",
    "include_usage",
    "insufficient_system_resource",
    "tool_calls",
    "parallel_tool_calls",
    "reasoning",
    "reasoning_tool_calls",
)

MODELS: tuple[str, ...] = ("deepseek-chat", "deepseek-reasoner")
DEFAULT_MODEL = "deepseek-chat"
SYSTEM_FINGERPRINT = "fp_mock"
SLOW_DEFAULT_DELAY = 0.2
LONG_DEFAULT_TOKENS = 1000
KEEPALIVE_COUNT = 3
KEEPALIVE_INTERVAL = 0.05

RATE_LIMIT_ERROR: dict[str, Any] = {
    "error": {
        "message": "Rate limit reached for requests",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
SERVER_ERROR: dict[str, Any] = {
    "error": {
        "message": "Internal server error (mock)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
}
ERROR_EVENT: dict[str, Any] = {
    "error": {"code": "mock_error", "message": "Mock upstream error event"},
}
MALFORMED_LINE = "data: {not valid json\n\n"

# (index, id, function name, argument fragments) of the scripted tool calls.
ToolCallScript = tuple[int, str, str, tuple[str, ...]]
WEATHER_CALL: ToolCallScript = (0, "call_00_mock", "get_weather", ('{"city": ', '"Paris"}'))
TIME_CALL: ToolCallScript = (1, "call_01_mock", "get_time", ('{"tz": ', '"Europe/Paris"}'))


class MockConnectionDrop(RuntimeError):
    """Raised inside a streaming body to make uvicorn close the connection mid-stream."""


# --------------------------------------------------------------------------------------------
# Scenario steps: every mode is a sequence of steps, rendered either as SSE or accumulated into
# one non-streaming chat.completion, so both forms always agree.


@dataclass(frozen=True)
class Chunk:
    """One ``chat.completion.chunk``; ``delta is None`` means an empty ``choices`` list."""

    delta: dict[str, Any] | None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class Raw:
    """Text written verbatim into the stream (ignored by the non-streaming form)."""

    text: str


@dataclass(frozen=True)
class Comment:
    """An SSE comment line (a blank line in the non-streaming form), then a pause."""

    text: str
    pause: float = 0.0


@dataclass(frozen=True)
class ErrorEvent:
    """A ``data: {"error": ...}`` event after which the stream ends without ``[DONE]``."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Done:
    """The terminating ``data: [DONE]`` event."""


@dataclass(frozen=True)
class Drop:
    """Abort the TCP connection (no finish chunk, no ``[DONE]``)."""


Step = Chunk | Raw | Comment | ErrorEvent | Done | Drop


@dataclass(frozen=True)
class Params:
    """Validated request parameters."""

    model: str
    stream: bool
    mode: str
    delay: float
    tokens: int
    prompt_tokens: int
    prefix: str | None = None  # chat prefix completion: the assistant text to continue after
    break_after: int = 4


def make_usage(prompt: int, completion: int, reasoning: int | None = None) -> dict[str, Any]:
    """DeepSeek-style usage object."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": prompt,
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def count_prompt_tokens(messages: Any) -> int:
    """Deterministic prompt size: whitespace-split words of all string contents (min 1)."""
    words = 0
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                words += len(content.split())
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        words += len(part["text"].split())
    return max(words, 1)


def _tool_call_steps(call: ToolCallScript, thinking: bool) -> Iterator[Chunk]:
    index, call_id, name, fragments = call
    extra: dict[str, Any] = {"content": None, "reasoning_content": None} if thinking else {}
    head = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    yield Chunk({**extra, "tool_calls": [head]})
    for fragment in fragments:
        yield Chunk(
            {**extra, "tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
        )


def continuation(tokens: list[str], prefix: str) -> list[str]:
    """The tokens that follow `prefix` in the concatenation of `tokens` (a cut token's tail
    first); everything when `prefix` is not a prefix of the text."""
    text = "".join(tokens)
    if not text.startswith(prefix):
        return tokens
    rest: list[str] = []
    position = 0
    for tok in tokens:
        end = position + len(tok)
        if end > len(prefix):
            rest.append(tok[max(0, len(prefix) - position) :])
        position = end
    return rest


def build_steps(p: Params) -> Iterator[Step]:
    """The scripted scenario of ``p.mode`` (not used for the plain HTTP error modes)."""
    mode = p.mode
    thinking = mode in ("reasoning", "reasoning_tool_calls")
    if thinking:
        yield Chunk({"role": "assistant", "content": None, "reasoning_content": ""})
        for tok in REASONING_TOKENS:
            yield Chunk({"content": None, "reasoning_content": tok})
    elif mode in ("tool_calls", "parallel_tool_calls"):
        yield Chunk({"role": "assistant", "content": None})
    else:
        if mode == "keepalive":
            for _ in range(KEEPALIVE_COUNT):
                yield Comment("keep-alive", KEEPALIVE_INTERVAL)
        yield Chunk({"role": "assistant", "content": ""})

    final_delta: dict[str, Any] = (
        {"content": "", "reasoning_content": None} if thinking else {"content": ""}
    )
    reasoning_count = len(REASONING_TOKENS) if thinking else None
    completion = len(REASONING_TOKENS) if thinking else 0

    if mode in ("tool_calls", "parallel_tool_calls", "reasoning_tool_calls"):
        calls = [WEATHER_CALL, TIME_CALL] if mode == "parallel_tool_calls" else [WEATHER_CALL]
        for call in calls:
            completion += 1 + len(call[3])  # one per tool-call delta chunk
            yield from _tool_call_steps(call, thinking)
        usage = make_usage(p.prompt_tokens, completion, reasoning_count)
        yield Chunk(final_delta, "tool_calls", usage)
        yield Done()
        return

    if p.prefix is not None:
        # Chat prefix completion (beta): continue exactly after the given assistant text.
        full = [f"tok{i} " for i in range(p.tokens)] if mode == "long" else list(NORMAL_TOKENS)
        rest = continuation(full, p.prefix)
        for tok in rest:
            yield Chunk({"content": tok, **({"reasoning_content": None} if thinking else {})})
        usage = make_usage(p.prompt_tokens, completion + len(rest), reasoning_count)
        yield Chunk(final_delta, "stop", usage)
        yield Done()
        return

    if mode == "break_once":
        for tok in NORMAL_TOKENS[: p.break_after]:
            yield Chunk({"content": tok})
        yield Drop()
        return

    if mode == "long":
        for i in range(p.tokens):
            yield Chunk({"content": f"tok{i} "})
        yield Chunk(final_delta, "stop", make_usage(p.prompt_tokens, p.tokens))
        yield Done()
        return

    content_extra: dict[str, Any] = {"reasoning_content": None} if thinking else {}
    cut = {"stream_error": 3, "error_event": 2, "insufficient_system_resource": 3}.get(mode)
    for i, tok in enumerate(NORMAL_TOKENS):
        if i == cut:
            break
        if mode == "malformed" and i == 2:
            yield Raw(MALFORMED_LINE)
        yield Chunk({"content": tok, **content_extra})
        completion += 1

    if mode == "stream_error":
        yield Drop()
        return
    if mode == "error_event":
        yield ErrorEvent(ERROR_EVENT)
        return
    usage = make_usage(p.prompt_tokens, completion, reasoning_count)
    if mode == "insufficient_system_resource":
        yield Chunk(final_delta, "insufficient_system_resource", usage)
    elif mode == "include_usage":
        yield Chunk(final_delta, "stop", None)
        yield Chunk(None, None, usage)
    else:
        yield Chunk(final_delta, "stop", usage)
    yield Done()


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Envelope:
    """Per-request constants shared by every chunk."""

    model: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, step: Chunk) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        if step.delta is not None:
            choices.append(
                {
                    "index": 0,
                    "delta": step.delta,
                    "logprobs": None,
                    "finish_reason": step.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": step.usage,
        }


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 text kept as is."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def render_sse(steps: Iterator[Step], env: Envelope, delay: float) -> AsyncIterator[bytes]:
    """Render steps as an SSE body; ``delay`` seconds pass between consecutive data events."""
    first_event = True
    for step in steps:
        if isinstance(step, Comment):
            yield f": {step.text}\n\n".encode()
            if step.pause > 0:
                await asyncio.sleep(step.pause)
            continue
        if isinstance(step, Drop):
            raise MockConnectionDrop("mock upstream: dropping the connection mid-stream")
        if not first_event and delay > 0:
            await asyncio.sleep(delay)
        first_event = False
        if isinstance(step, Chunk):
            text = f"data: {dumps(env.chunk(step))}\n\n"
        elif isinstance(step, Raw):
            text = step.text
        elif isinstance(step, ErrorEvent):
            text = f"data: {dumps(step.body)}\n\n"
        else:
            text = "data: [DONE]\n\n"
        yield text.encode()
        await asyncio.sleep(0)  # stay cooperative even for very long streams
        if isinstance(step, ErrorEvent):
            return


@dataclass
class Completion:
    """What a client would accumulate from the stream."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    blank_lines: list[float] = field(default_factory=list)
    error: dict[str, Any] | None = None

    def add(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("content"), str):
            self.content = (self.content or "") + delta["content"]
        if isinstance(delta.get("reasoning_content"), str):
            self.reasoning = (self.reasoning or "") + delta["reasoning_content"]
        for frag in delta.get("tool_calls") or []:
            call = self.tool_calls.setdefault(
                frag["index"],
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if "id" in frag:
                call["id"] = frag["id"]
            if "type" in frag:
                call["type"] = frag["type"]
            function = frag.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""

    def body(self, env: Envelope) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return {
            "id": env.id,
            "object": "chat.completion",
            "created": env.created,
            "model": env.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage,
        }


async def accumulate(steps: Iterator[Step]) -> Completion:
    """Fold a scenario into the non-streaming result (yielding to the loop now and then)."""
    result = Completion()
    for n, step in enumerate(steps, 1):
        if n % 1024 == 0:
            await asyncio.sleep(0)
        if isinstance(step, Chunk):
            if step.delta is not None:
                result.add(step.delta)
            if step.finish_reason is not None:
                result.finish_reason = step.finish_reason
            if step.usage is not None:
                result.usage = step.usage
        elif isinstance(step, Comment):
            result.blank_lines.append(step.pause)
        elif isinstance(step, Drop):
            result.error = SERVER_ERROR
        elif isinstance(step, ErrorEvent):
            result.error = step.body
    return result


async def render_json_with_blank_lines(pauses: list[float], body: bytes) -> AsyncIterator[bytes]:
    """Non-streaming body preceded by blank lines, as DeepSeek sends while a request waits."""
    for pause in pauses:
        yield b"\n"
        if pause > 0:
            await asyncio.sleep(pause)
    yield body


# --------------------------------------------------------------------------------------------
# HTTP layer


def error_response(
    message: str, param: str | None = None, code: str = "invalid_request_error"
) -> JSONResponse:
    """HTTP 400 with an OpenAI/DeepSeek-style error envelope."""
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return JSONResponse(body, status_code=400)


def parse_params(body: Any) -> Params | JSONResponse:
    """Validate the request body; unknown fields are ignored."""
    if not isinstance(body, dict):
        return error_response("request body must be a JSON object")
    model = body.get("model", DEFAULT_MODEL)
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, str):
        return error_response("model must be a string", "model")
    mode = body.get("test_mode", "normal")
    if mode is None:
        mode = "normal"
    if not isinstance(mode, str) or mode not in TEST_MODES:
        return error_response(
            f"unknown test_mode {mode!r}; expected one of: {', '.join(TEST_MODES)}",
            "test_mode",
            "invalid_test_mode",
        )
    default_delay = SLOW_DEFAULT_DELAY if mode == "slow" else 0.0
    delay = body.get("mock_delay")
    if delay is None:
        delay = default_delay
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 60:
        return error_response("mock_delay must be a number 0..60", "mock_delay")
    tokens = body.get("mock_tokens")
    if tokens is None:
        tokens = LONG_DEFAULT_TOKENS
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= 10_000_000:
        return error_response("mock_tokens must be an integer 0..10000000", "mock_tokens")
    break_after = body.get("mock_break_after", 4)
    if isinstance(break_after, bool) or not isinstance(break_after, int) or break_after < 0:
        return error_response("mock_break_after must be an integer >= 0", "mock_break_after")
    return Params(
        model=model,
        stream=body.get("stream") is True,
        mode=mode,
        delay=float(delay),
        tokens=tokens,
        prompt_tokens=count_prompt_tokens(body.get("messages")),
        prefix=prefix_of(body.get("messages")),
        break_after=break_after,
    )


def prefix_of(messages: Any) -> str | None:
    """The content of a last `{"role": "assistant", "prefix": true}` message, if any."""
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant" and last.get("prefix"):
            content = last.get("content")
            return content if isinstance(content, str) else ""
    return None


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """Print the ready line once the server has started."""
    print(READY_MESSAGE, flush=True)
    yield


app = FastAPI(title="Mock DeepSeek SSE upstream", lifespan=lifespan)


@app.get("/")
async def root() -> dict[str, str]:
    return {"message": READY_MESSAGE}


@app.get("/models")
@app.get("/v1/models")
async def list_models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "owned_by": "deepseek"} for name in MODELS],
    }


@app.post("/beta/chat/completions")
@app.post("/beta/v1/chat/completions")
async def beta_chat_completions(request: Request) -> Response:
    """DeepSeek's beta base URL: the same API, plus chat prefix completion."""
    return await answer(request, beta=True)


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await answer(request, beta=False)


async def answer(request: Request, *, beta: bool) -> Response:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return error_response("request body is not valid JSON")
    parsed = parse_params(body)
    if isinstance(parsed, JSONResponse):
        return parsed
    if parsed.prefix is not None and not beta:
        return error_response("prefix completion needs the beta base URL", "messages")
    if parsed.mode == "rate_limit":
        return JSONResponse(RATE_LIMIT_ERROR, status_code=429)
    if parsed.mode == "server_error":
        return JSONResponse(SERVER_ERROR, status_code=500)

    env = Envelope(model=parsed.model)
    if parsed.stream:
        return StreamingResponse(
            render_sse(build_steps(parsed), env, parsed.delay),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    result = await accumulate(build_steps(parsed))
    if result.error is not None:
        return JSONResponse(result.error, status_code=500)
    if parsed.delay > 0:
        await asyncio.sleep(parsed.delay)
    if result.blank_lines:
        payload = dumps(result.body(env)).encode()
        return StreamingResponse(
            render_json_with_blank_lines(result.blank_lines, payload),
            media_type="application/json",
        )
    return JSONResponse(result.body(env))
