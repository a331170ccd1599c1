"""The upstream call: the innermost handler of the chain, and the only aiohttp client code.

`UpstreamClient` owns the process's one pooled `aiohttp.ClientSession`. It POSTs the exchange's
`upstream_body` to `{base_url}/v1/chat/completions` with the gateway's own key, and returns a
`Reply` whose body is the raw upstream byte stream (read with `iter_any()`, no line limit).
Transport errors are translated into the ds2oai tree here and only here, body iteration
included: before headers into `UpstreamConnectError` / `UpstreamTimeoutError`, during the body
into `UpstreamStreamError`. Closing the body before its end closes the TCP connection, which is
how a client disconnect stops the upstream generating tokens nobody will read.
"""

from __future__ import annotations

import aiohttp

from ds2oai import jsonutil
from ds2oai.chain import Body, Exchange, Reply
from ds2oai.config import UpstreamConfig
from ds2oai.errors import UpstreamConnectError, UpstreamStreamError, UpstreamTimeoutError
from ds2oai.metrics import ATTEMPTS
from ds2oai.upstream_errors import BROKEN_MESSAGE

__all__ = ["UpstreamClient", "read_limited"]

# Headers the upstream request never takes from anywhere but this module.
_RESERVED = frozenset(
    {"authorization", "host", "content-length", "transfer-encoding", "connection"}
)


class UpstreamClient:
    """Callable as the chain's endpoint: `await client(exchange) -> Reply`."""

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._session = session
        self._url = config.base_url.rstrip("/") + "/v1/chat/completions"
        self._read_timeout = config.read_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None,  # a long stream is not an error; silence is (sock_read)
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._auth = f"Bearer {config.api_key}" if config.api_key else None
        self._open: set[aiohttp.ClientResponse] = set()
        self._abort_reason: str | None = None

    @classmethod
    def create(cls, config: UpstreamConfig) -> UpstreamClient:
        connector = aiohttp.TCPConnector(
            limit=config.max_connections,
            limit_per_host=0,
            keepalive_timeout=30.0,
            enable_cleanup_closed=False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            trust_env=False,  # the upstream URL comes from the config, never from proxy env vars
            raise_for_status=False,
            skip_auto_headers=("User-Agent",),
        )
        return cls(config, session)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    async def close(self) -> None:
        await self._session.close()

    async def probe(self) -> tuple[bool, str]:
        """(reachable, detail): GET {base_url}/models; any HTTP status counts as reachable."""
        url = self._config.base_url.rstrip("/") + "/models"
        timeout = aiohttp.ClientTimeout(total=self._config.connect_timeout)
        headers = {"Authorization": self._auth} if self._auth else {}
        try:
            async with self._session.get(url, headers=headers, timeout=timeout) as response:
                return True, f"HTTP {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return False, type(exc).__name__

    async def __call__(self, exchange: Exchange) -> Reply:
        exchange.trace.attempts += 1
        headers = {k: v for k, v in exchange.upstream_headers.items() if k.lower() not in _RESERVED}
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "text/event-stream"
        if self._auth is not None:
            headers["Authorization"] = self._auth  # SECURITY: the gateway's key, never the client's
        try:
            response = await self._session.post(
                exchange.upstream_url or self._url,
                data=jsonutil.dumps(exchange.upstream_body),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except aiohttp.ConnectionTimeoutError:
            ATTEMPTS.labels("connect_error").inc()
            raise UpstreamConnectError("Timed out connecting to the upstream") from None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            ATTEMPTS.labels("timeout").inc()
            raise UpstreamTimeoutError(
                f"The upstream sent no response within {self._read_timeout:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            ATTEMPTS.labels("connect_error").inc()
            raise UpstreamConnectError(f"Cannot connect to the upstream ({exc.os_error})") from None
        except (aiohttp.ClientError, OSError) as exc:
            ATTEMPTS.labels("connect_error").inc()
            raise UpstreamConnectError(
                f"Upstream connection failed before a response ({type(exc).__name__})"
            ) from None
        exchange.trace.upstream_statuses.append(response.status)
        ATTEMPTS.labels(str(response.status)).inc()
        reply_headers = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status, reply_headers, self._body(response), from_upstream=True)

    def abort_all(self, reason: str) -> None:
        """Cut every open upstream body (shutdown grace is over): each stream then ends with
        its dialect's terminal error carrying `reason`, instead of a bare truncation."""
        self._abort_reason = reason
        for response in list(self._open):
            response.close()

    async def _body(self, response: aiohttp.ClientResponse) -> Body:
        complete = False
        self._open.add(response)
        try:
            async for data in response.content.iter_any():
                yield data
            if self._abort_reason is not None:
                raise UpstreamStreamError(self._abort_reason)  # cut by abort_all, not an EOF
            complete = True
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise UpstreamStreamError(
                f"Upstream SSE stream timed out: no data for {self._read_timeout:g} s",
                timeout=True,
            ) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamStreamError(self._abort_reason or BROKEN_MESSAGE) from None
        finally:
            self._open.discard(response)
            if complete:
                response.release()
            else:
                response.close()  # drop the TCP connection: the upstream stops generating


async def read_limited(body: Body | bytes, limit: int = 64 * 1024) -> bytes:
    """Read at most `limit` bytes of a body (error answers), then close it."""
    if isinstance(body, bytes):
        return body[:limit]
    parts: list[bytes] = []
    size = 0
    try:
        async for data in body:
            parts.append(data)
            size += len(data)
            if size >= limit:
                break
    except UpstreamStreamError:
        pass  # an error answer cut short still has its status; keep what arrived
    finally:
        await body.aclose()
    return b"".join(parts)[:limit]
