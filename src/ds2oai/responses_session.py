"""One Responses API request: its dialect, its non-streaming collector, and storing the result.

The route in server.py parses the request (`responses_input`), loads the conversation named by
`previous_response_id` from the store, and puts a `ResponsesSession` on the exchange as its
`context`. The reframe stage asks it for the dialect (streaming) or a collector (`"stream":
false`) and awaits `save()` once the answer reached its terminal state — before the client sees
the end, so `GET /v1/responses/{id}` works as soon as the stream is over. May touch: the store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from ds2oai.dialects.responses import ResponsesDialect
from ds2oai.errors import ClientError
from ds2oai.events import UpstreamEvent
from ds2oai.responses_input import ResponsesRequest, new_id
from ds2oai.sealing import Sealer
from ds2oai.store import ResponseStore, StoredResponse, StoreError
from ds2oai.upstream_errors import BROKEN_MESSAGE, broken_error

__all__ = ["SAVE_TIMEOUT", "ResponsesSession"]

# The save runs before the client sees the end of the answer: a stalled store (its own timeouts
# and retries add up to 15 s with Redis) must not hold every answer's end for long.
SAVE_TIMEOUT: Final = 5.0


class ResponsesSession:
    def __init__(
        self,
        request: ResponsesRequest,
        *,
        history: list[dict[str, Any]],
        store: ResponseStore,
        sealer: Sealer,
        owner: str | None = None,
    ) -> None:
        self.request = request
        self.response_id = new_id("resp")
        self.created_at = int(time.time())
        self._history = history
        self._store = store
        self._owner = owner
        seal = sealer.seal if request.include_encrypted_reasoning else None
        self.dialect = ResponsesDialect(
            response_id=self.response_id,
            created_at=self.created_at,
            model=request.exposed_model,
            echo=request.echo,
            seal=seal,
            clock=lambda: int(time.time()),
        )

    def make_dialect(self) -> ResponsesDialect:
        return self.dialect

    def make_collector(self) -> _Collector:
        return _Collector(self.dialect)

    async def save(self) -> None:
        """Keep the ended response and its conversation (`store`, default true).

        A failed stream is kept too, status `failed` with its error and whatever output came
        before the failure, so `GET /v1/responses/{id}` answers for every id a client saw. Its
        conversation is not kept: a turn cut short cannot be continued (see server.py), so the
        client continues from the response before it instead of from a silently shortened one.
        A store that fails, or takes over `SAVE_TIMEOUT`, raises `StoreError`; reframe logs it
        and the answer still ends normally (the client has it; only continuing it fails).
        """
        outcome = self.dialect.outcome
        if not self.request.store or outcome is None:
            return
        messages: list[dict[str, Any]] = []
        if outcome == "completed":
            messages = [*self._history, *self.request.new_messages]
            assistant = self.dialect.assistant_message()
            if assistant is not None:
                messages.append(assistant)
        item = StoredResponse(
            id=self.response_id,
            created_at=self.created_at,
            response=self.dialect.response(),
            input_items=list(self.request.input_items),
            messages=messages,
            owner=self._owner,
        )
        try:
            async with asyncio.timeout(SAVE_TIMEOUT):
                await self._store.put(item)
        except TimeoutError:
            raise StoreError(
                f"saving response {self.response_id} took over {SAVE_TIMEOUT:g} s"
            ) from None


class _Collector:
    """`"stream": false`: feed the dialect, drop its bytes, answer the final Response object.

    A failed answer is an HTTP error (nothing was sent yet); `incomplete` is a normal answer.
    """

    text_literals = True  # as its dialect

    def __init__(self, dialect: ResponsesDialect) -> None:
        self._dialect = dialect

    @property
    def ended(self) -> bool:
        return self._dialect.outcome is not None

    def feed(self, event: UpstreamEvent) -> None:
        self._dialect.feed(event)

    def result(self) -> dict[str, Any]:
        outcome = self._dialect.outcome
        response = self._dialect.response()
        if outcome == "completed":
            return response
        error = response.get("error") or {}
        message = str(error.get("message") or BROKEN_MESSAGE)
        if outcome == "timeout":
            raise broken_error(message, timeout=True)
        if outcome == "upstream_error":
            code, message = self._dialect.upstream_error or ("upstream_error", message)
            raise ClientError(502, "upstream_error", code, message)
        raise broken_error(message)
