"""An asyncio client for the kvquilt HTTP API: what an async RAG service calls per request
(storing chunks, answering, streaming), with the same arguments, results and errors as
:class:`kvquilt.Client`. Bodies are built and answers read by the same code as the
synchronous client's, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, Iterable, List, Optional, Sequence, Union

import httpx

from .client import (
    ChatResult,
    ChunkRef,
    ChunkStatus,
    StreamEvent,
    _api_error,
    _chat_body,
    _chat_result,
    _chunk_list,
    _auth,
    _Events,
    _from_json,
    _send_args,
    _sending_error,
)


class AsyncClient:
    """One kvquilt server, for ``asyncio`` code (``base_url``, ``token``, ``timeout``,
    ``connect_timeout`` and ``http`` — an ``httpx.AsyncClient`` of your own, never changed
    or closed here — as :class:`kvquilt.Client` takes them).

    The ``httpx`` client built here is made on first use inside a running loop and made
    again when used from another loop (its pooled connections belong to the loop that opened
    them: an ``asyncio.run`` per request would otherwise meet "Event loop is closed"). One
    passed as ``http`` is bound to its loop by ``httpx``: use it from that loop only."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = 300.0,
        http: Optional[httpx.AsyncClient] = None,
        connect_timeout: float = 5.0,
    ):
        self.base_url = base_url.rstrip("/")
        self._headers = _auth(token)
        self._timeout = httpx.Timeout(timeout, connect=min(connect_timeout, timeout))
        self._given = http
        self._owned: Optional[httpx.AsyncClient] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def _client(self) -> httpx.AsyncClient:
        """The ``httpx`` client for the running loop."""
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        if self._owned is None or self._loop is not loop:
            # (a client of a loop that has ended cannot be closed from this one: its
            # connections went with that loop)
            self._owned, self._loop = httpx.AsyncClient(timeout=self._timeout), loop
        return self._owned

    async def aclose(self) -> None:
        """Closes the ``httpx`` client built here (one passed as ``http`` stays open)."""
        if self._owned is not None and self._loop is asyncio.get_running_loop():
            await self._owned.aclose()
        self._owned = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = await self._client().request(method, **_send_args(self.base_url, self._headers, path, kw))
        except (UnicodeEncodeError, httpx.TransportError) as e:
            raise _sending_error(e, self.base_url) from e
        if not r.is_success:
            raise _api_error(r)
        return r.json()

    async def health(self) -> Dict[str, Any]:
        return await self._json("GET", "/health")

    async def model(self) -> str:
        """The served model's id."""
        return (await self._json("GET", "/v1/models"))["data"][0]["id"]

    async def stats(self) -> Dict[str, Any]:
        return await self._json("GET", "/v1/stats")

    async def put_chunks(self, chunks: Sequence[ChunkRef]) -> List[ChunkStatus]:
        """Precompute and store chunks' KV (:meth:`kvquilt.Client.put_chunks`)."""
        body = await self._json("POST", "/v1/chunks", json={"chunks": _chunk_list(chunks, "put_chunks")})
        return [_from_json(ChunkStatus, c) for c in body["chunks"]]

    async def chat(
        self,
        question_or_messages: Union[str, List[Dict[str, str]]],
        documents: Iterable[ChunkRef] = (),
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        stop: Optional[List[str]] = None,
        mode: Optional[str] = None,
        ratio: Optional[float] = None,
        compress: Optional[Dict[str, Any]] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ) -> ChatResult:
        """A chat completion over ``documents`` (:meth:`kvquilt.Client.chat`)."""
        body = _chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
                          compress, top_p, seed, logprobs=logprobs, top_logprobs=top_logprobs)
        return _chat_result(await self._json("POST", "/v1/chat/completions", json=body))

    async def chat_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        """The answer's text pieces as the server streams them (:meth:`chat_events`'s
        arguments)."""
        events = self.chat_events(*args, **kwargs)
        try:
            async for e in events:
                if e.text:
                    yield e.text
        finally:
            # a caller that stops early closes the answer's stream now, not at collection
            await events.aclose()

    async def chat_events(
        self,
        question_or_messages: Union[str, List[Dict[str, str]]],
        documents: Iterable[ChunkRef] = (),
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        stop: Optional[List[str]] = None,
        mode: Optional[str] = None,
        ratio: Optional[float] = None,
        compress: Optional[Dict[str, Any]] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ) -> AsyncIterator[StreamEvent]:
        """A streamed chat completion as :class:`StreamEvent` s, ending with the finish
        reason, usage and stats; errors as :meth:`kvquilt.Client.chat_events` raises them
        (``truncated`` for a stream cut before ``[DONE]``)."""
        body = _chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
                          compress, top_p, seed, stream=True, logprobs=logprobs,
                          top_logprobs=top_logprobs)
        args = _send_args(self.base_url, self._headers, "/v1/chat/completions", {"json": body})
        events = _Events(self.base_url)
        try:
            async with self._client().stream("POST", **args) as r:
                if not r.is_success:
                    await r.aread()
                    raise _api_error(r)
                events.answering = True
                async for line in r.aiter_lines():
                    for e in events.read(line):
                        yield e
                    if events.done:
                        return
        except (UnicodeEncodeError, httpx.TransportError) as e:
            raise _sending_error(e, self.base_url, answering=events.answering) from e
        raise events.cut_short()
