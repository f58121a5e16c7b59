"""The only module that imports aiohttp: POST bytes, get (status, headers, body).

aiohttp's exceptions are translated here into the package's error tree, so
the engine and providers never see a library type. Tests swap nothing: they
point this real client at a real server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp

from pipeline import errors


class Transport(Protocol):
    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Mapping[str, str], bytes]: ...

    async def get(self, url: str) -> int: ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """One session and one connection pool, sized to the concurrency cap."""

    def __init__(self, *, concurrency: int, timeout: float) -> None:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=300)
        self._timeout = timeout
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 15.0)),
            # No cookies: a batch job must not carry state from one row to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Mapping[str, str], bytes]:
        return await self.request("POST", url, headers, body)

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        upload: tuple[str, bytes] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Any method; `upload` is (file name, bytes) sent as the multipart form a files endpoint
        takes (`purpose=batch`), with its own Content-Type."""
        data: bytes | aiohttp.FormData | None = body
        if upload is not None:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", upload[1], filename=upload[0], content_type="application/jsonl")
            data = form
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        try:
            async with self._session.request(method, url, data=data, headers=headers) as resp:
                return resp.status, resp.headers, await resp.read()
        except TimeoutError:
            raise errors.RequestTimeout(f"no answer within {self._timeout:g} s", kind="timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise errors.TransportError(
                f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})", kind="connect"
            ) from None
        except aiohttp.ServerDisconnectedError:
            raise errors.TransportError("server closed the connection before answering", kind="disconnected") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise errors.TransportError(f"connection failed mid-reply: {type(exc).__name__}", kind="connection_reset") from None
        except aiohttp.ClientError as exc:
            raise errors.TransportError(f"HTTP client error: {type(exc).__name__}", kind="transport") from None

    async def get(self, url: str) -> int:
        """Status of a GET, or 0 if nothing answered (used to wait for a local server)."""
        try:
            async with self._session.get(url) as resp:
                await resp.read()
                return resp.status
        except (TimeoutError, aiohttp.ClientError):
            return 0

    async def close(self) -> None:
        await self._session.close()
