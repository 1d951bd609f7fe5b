"""A typed, synchronous client for the kvquilt HTTP API."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Type, TypeVar, Union

import httpx

#: A chunk in a request: a document's text, ``{"text": ...}``, ``{"tokens": [...]}`` or
#: ``{"id": ...}`` of a stored chunk.
ChunkRef = Union[str, Dict[str, Any]]

OBJECT_MEDIA_TYPE = "application/vnd.kvquilt.kv-object"


class KvquiltError(Exception):
    """The server refused a request: ``status``, the API's ``code`` and its ``message``;
    ``retry_after`` (seconds) when the server said when to try again (503 ``server_busy``,
    a full queue, a device out of memory: its ``Retry-After``)."""

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None):
        super().__init__(f"kvquilt API error {status} ({code}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class KvquiltConnectionError(KvquiltError):
    """The server could not be reached or did not answer in time (``status`` 0, ``code``
    ``unreachable`` or ``timeout``); the underlying ``httpx`` error is its ``__cause__``."""


def _retry_after(r: httpx.Response) -> Optional[float]:
    """The response's ``Retry-After`` in seconds (the delta form the server sends)."""
    try:
        return float(r.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _api_error(r: httpx.Response) -> KvquiltError:
    """The error a failed response carries (its JSON ``error``, or its text)."""
    try:
        err = r.json()["error"]
        code, message = err.get("code", ""), err.get("message", r.text)
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = "", r.text
    return KvquiltError(r.status_code, code, message, _retry_after(r))


class UnsendableText(ValueError):
    """A request text that cannot be encoded as UTF-8 (a lone surrogate, e.g. from a file
    decoded with ``surrogateescape``): nothing was sent."""


def _not_utf8(e: UnicodeEncodeError) -> ValueError:
    """What an encoding failure while sending raises: the JSON body's text (UTF-8) is named
    with its neighbourhood; anything else (a header) without its content, which may be the
    token."""
    if e.encoding.replace("-", "").lower() != "utf8":
        return ValueError(f"kvquilt: a request header is not {e.encoding} ({e.reason})")
    return UnsendableText(f"kvquilt: a request text is not valid Unicode ({e.reason} at index {e.start}: "
                          f"{e.object[max(0, e.start - 10):e.end + 10]!r}); decode it with errors='replace'")


def _auth(token: Optional[str]) -> Dict[str, str]:
    """The ``Authorization`` header of ``token``; a token that is not printable ASCII (what a
    header carries) is refused here, without repeating it."""
    if not token:
        return {}
    if not (token.isascii() and token.isprintable()):
        raise ValueError("kvquilt: the API token must be printable ASCII")
    return {"Authorization": f"Bearer {token}"}


def _check_id(chunk_id: str) -> str:
    """A chunk id as the API names chunks: 64 hexadecimal digits."""
    if not (isinstance(chunk_id, str) and len(chunk_id) == 64
            and all(c in "0123456789abcdefABCDEF" for c in chunk_id)):
        raise ValueError(f"a chunk id is 64 hexadecimal digits, not {chunk_id!r}")
    return chunk_id


def _chunk_list(chunks: Any, what: str) -> List[Any]:
    """``chunks`` as a list; one chunk on its own (a string, or a dict such as
    ``{"id": ...}``, which ``list`` would turn into its keys) is refused."""
    if isinstance(chunks, (str, bytes)):
        raise TypeError(f"{what} takes a list of chunks (texts or {{'id': ...}}), not one string")
    if isinstance(chunks, dict):
        raise TypeError(f"{what} takes a list of chunks, not one chunk: wrap it as [{chunks!r}]")
    return list(chunks)


_D = TypeVar("_D")


def _from_json(cls: Type[_D], body: Dict[str, Any]) -> _D:
    """``cls`` from a JSON object, ignoring fields this client does not know: the API only
    ever adds fields, so an older client keeps working against a newer server."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in body.items() if k in known})


@dataclass
class ChunkStatus:
    id: str
    tokens: int
    status: str  #: ``hit`` or ``stored``
    tier: Optional[str] = None
    #: held where it survives a restart (false: memory only, e.g. a read-only data dir)
    durable: bool = True


@dataclass
class ChunkInfo:
    id: str
    tokens: int
    tier: str
    bytes: int
    layout: Dict[str, Any]
    token_ids: Optional[List[int]] = None
    #: while a pin holds: ``{}`` (until unpinned) or ``{"until_unix_s": t}``
    pinned: Optional[Dict[str, int]] = None


@dataclass
class ChunkLookup:
    id: str
    tokens: int
    tier: Optional[str] = None  #: the fastest tier holding it; ``None``: not held


@dataclass
class BlendResult:
    token: Dict[str, Any]
    top_logprobs: List[Dict[str, Any]]
    chunk_ids: List[str]
    stats: Dict[str, Any]


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    #: OpenAI's usage: token counts, and ``prompt_tokens_details.cached_tokens`` (the prompt
    #: tokens reused exactly; blended documents count in ``stats``)
    usage: Dict[str, Any]
    stats: Dict[str, Any] = field(default_factory=dict)
    #: with ``logprobs``: each generated token's ``{token, logprob, bytes, top_logprobs}``
    #: (OpenAI's ``logprobs.content``; the end-of-turn token is not listed)
    logprobs: Optional[List[Dict[str, Any]]] = None


@dataclass
class StreamEvent:
    """One event of a streamed chat completion: a text piece (possibly empty), or, last,
    the end — ``finish_reason``, ``usage`` and the blend's ``stats``."""

    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None
    stats: Optional[Dict[str, Any]] = None
    #: with ``logprobs``: the piece's tokens as :attr:`ChatResult.logprobs` lists them
    logprobs: Optional[List[Dict[str, Any]]] = None


class Client:
    """One kvquilt server. ``base_url`` like ``http://127.0.0.1:8077``.

    ``timeout`` (seconds) bounds reading an answer and ``connect_timeout`` reaching the
    server (a host that drops packets fails in seconds, not after the read timeout), for the
    ``httpx`` client built here. A client passed as ``http`` (proxies, transports) keeps its
    own timeouts (``httpx``'s default is 5 s: too short for a long answer) and is not
    changed: the URL and the token go with each request, so one ``httpx`` client can serve
    several kvquilt clients; :meth:`close` leaves it open. Nothing is retried: a refusal
    with ``retry_after`` says when to try again.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = 300.0,
        http: Optional[httpx.Client] = None,
        connect_timeout: float = 5.0,
    ):
        self.base_url = base_url.rstrip("/")
        self._headers = _auth(token)
        self._owns_http = http is None
        if http is None:
            http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)))
        self._http = http

    def close(self) -> None:
        """Closes the ``httpx`` client built here (one passed as ``http`` stays open)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, **_send_args(self.base_url, self._headers, path, kw))
        except (UnicodeEncodeError, httpx.TransportError) as e:
            raise _sending_error(e, self.base_url) from e
        if r.is_success:
            return r
        raise _api_error(r)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # -- operations -------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        return self._json("GET", "/health")

    def model(self) -> str:
        """The served model's id (what OpenAI clients pass as ``model``)."""
        return self._json("GET", "/v1/models")["data"][0]["id"]

    def calibration(self) -> Dict[str, Any]:
        """What ``blend`` means for the served model (``kvquilt calibrate``): ``calibrated``,
        ``blend_ratio`` (``None``: a blend that names no ratio is served as exact prefix
        reuse), ``selection`` (how that blend picks the tokens it recomputes, e.g. ``qzero``),
        ``record`` and a ``note`` for people."""
        return self._json("GET", "/v1/models")["data"][0].get("kvquilt") or {}

    def stats(self) -> Dict[str, Any]:
        return self._json("GET", "/v1/stats")

    # -- chunks -----------------------------------------------------------------------------

    def put_chunks(self, chunks: Sequence[ChunkRef]) -> List[ChunkStatus]:
        """Precompute and store chunks' KV (a chunk already stored costs a lookup)."""
        body = self._json("POST", "/v1/chunks", json={"chunks": _chunk_list(chunks, "put_chunks")})
        return [_from_json(ChunkStatus, c) for c in body["chunks"]]

    def lookup(self, chunks: Sequence[ChunkRef], prefetch: bool = False) -> List[ChunkLookup]:
        """Where each chunk is held (``tier`` ``None``: nowhere), computing and storing
        nothing; with ``prefetch`` those held below the host tier are read up into it."""
        body = self._json("POST", "/v1/chunks/lookup",
                          json={"chunks": _chunk_list(chunks, "lookup"), "prefetch": prefetch})
        return [_from_json(ChunkLookup, c) for c in body["chunks"]]

    def chunk(self, chunk_id: str, include_tokens: bool = False) -> Optional[ChunkInfo]:
        try:
            body = self._json(
                "GET",
                f"/v1/chunks/{_check_id(chunk_id)}",
                params={"include_tokens": "true" if include_tokens else "false"},
            )
        except KvquiltError as e:
            if e.code == "unknown_chunk":
                return None
            raise
        return _from_json(ChunkInfo, body)

    def delete_chunk(self, chunk_id: str) -> bool:
        try:
            self._request("DELETE", f"/v1/chunks/{_check_id(chunk_id)}")
            return True
        except KvquiltError as e:
            if e.code == "unknown_chunk":
                return False
            raise

    def delete_chain(self, page_id: str) -> Optional[List[str]]:
        """Deletes a page of a conversation (an id of the stats' ``link_ids``) and every page
        after it, in every conversation of this tenant's through it: the ids deleted, the
        furthest first; ``None`` when the id is unknown. Deleting a conversation's first
        page of its own forgets it and leaves conversations that share its opening."""
        try:
            body = self._json(
                "DELETE", f"/v1/chunks/{_check_id(page_id)}", params={"descendants": "true"}
            )
        except KvquiltError as e:
            if e.code == "unknown_chunk":
                return None
            raise
        return list(body["deleted"])

    def pin(self, chunk_id: str, ttl_s: Optional[int] = None) -> Optional[ChunkInfo]:
        """Keeps the chunk from eviction in the local tiers, until :meth:`unpin` or for
        ``ttl_s`` seconds; its metadata, ``None`` when the id is unknown. The operator's
        tokens pin freely, a tenant's up to its ``pin_bytes`` (past it, a
        :class:`KvquiltError` with code ``pin_budget_exceeded``)."""
        return self._pin("POST", chunk_id, {} if ttl_s is None else {"ttl_s": ttl_s})

    def unpin(self, chunk_id: str) -> Optional[ChunkInfo]:
        """Lets the chunk be evicted again; its metadata, ``None`` when the id is unknown."""
        return self._pin("DELETE", chunk_id, None)

    def _pin(self, method: str, chunk_id: str, body: Optional[Dict[str, Any]]) -> Optional[ChunkInfo]:
        try:
            out = self._json(method, f"/v1/chunks/{_check_id(chunk_id)}/pin", json=body)
        except KvquiltError as e:
            if e.code == "unknown_chunk":
                return None
            raise
        return _from_json(ChunkInfo, out)

    def chunk_kv(self, chunk_id: str) -> bytes:
        """The chunk's KV object (kvquilt object format, version 1)."""
        return self._request("GET", f"/v1/chunks/{_check_id(chunk_id)}/kv").content

    def put_chunk_kv(self, chunk_id: str, data: bytes) -> ChunkStatus:
        body = self._json(
            "PUT",
            f"/v1/chunks/{_check_id(chunk_id)}/kv",
            content=data,
            headers={"Content-Type": OBJECT_MEDIA_TYPE},
        )
        return _from_json(ChunkStatus, body)

    # -- answering --------------------------------------------------------------------------

    def blend(
        self,
        question: str,
        chunks: Sequence[ChunkRef],
        mode: Optional[str] = None,
        ratio: Optional[float] = None,
        top_logprobs: int = 5,
        compress: Optional[Dict[str, Any]] = None,
    ) -> BlendResult:
        """The first token of a RAG prompt over ``chunks`` and what the blend did.

        ``compress`` (e.g. ``{"policy": "snapkv", "compression": 4}``) reports what a token
        policy would keep (``stats["compression"]``); the first token is the full prompt's.
        """
        body: Dict[str, Any] = {"question": question, "chunks": _chunk_list(chunks, "blend"),
                                "top_logprobs": top_logprobs}
        if mode is not None:
            body["mode"] = mode
        if ratio is not None:
            body["ratio"] = ratio
        if compress is not None:
            body["compress"] = compress
        r = self._json("POST", "/v1/blend", json=body)
        return BlendResult(r["token"], r["top_logprobs"], r["chunk_ids"], r["stats"])

    def chat(
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
        """A chat completion over ``documents`` (texts or ``{"id": ...}``), through blend.
        ``max_tokens`` left out: the server's default (its ``limits.max_new_tokens`` bound).
        ``top_p`` and ``seed`` sample as OpenAI's do (the same seed and request: the same
        tokens); ``logprobs`` (and ``top_logprobs``, up to 20 alternatives) fills
        :attr:`ChatResult.logprobs`.

        ``compress`` (e.g. ``{"policy": "snapkv", "compression": 4}``) prunes the prompt's KV
        with a token policy before decoding; ``stats["compression"]`` says what was kept.
        """
        body = _chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
                          compress, top_p, seed, logprobs=logprobs, top_logprobs=top_logprobs)
        return _chat_result(self._json("POST", "/v1/chat/completions", json=body))

    def chat_stream(
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
    ) -> Iterator[str]:
        """Yields the answer's text pieces as the server streams them (the options of
        :meth:`chat`); :meth:`chat_events` also gives the end (finish reason, usage, stats)."""
        for e in self.chat_events(question_or_messages, documents, max_tokens, temperature, stop, mode,
                                  ratio, compress, top_p, seed, logprobs, top_logprobs):
            if e.text:
                yield e.text

    def chat_events(
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
    ) -> Iterator[StreamEvent]:
        """A streamed chat completion as :class:`StreamEvent` s: the text pieces, then one
        event with the finish reason, the usage and the blend's stats. A stream that ends
        before the server's ``[DONE]`` (or whose connection breaks) raises
        :class:`KvquiltConnectionError` (``truncated``): what arrived is not the whole answer.
        An error the server sends inside the stream (after its 200: e.g. the device ran out
        of memory while decoding) raises :class:`KvquiltError` with the server's code and
        ``status`` 200; an event that is not JSON, ``malformed_event``."""
        body = _chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
                          compress, top_p, seed, stream=True, logprobs=logprobs,
                          top_logprobs=top_logprobs)
        args = _send_args(self.base_url, self._headers, "/v1/chat/completions", {"json": body})
        events = _Events(self.base_url)
        try:
            with self._http.stream("POST", **args) as r:
                if not r.is_success:
                    r.read()
                    raise _api_error(r)
                events.answering = True
                for line in r.iter_lines():
                    yield from events.read(line)
                    if events.done:
                        return
        except (UnicodeEncodeError, httpx.TransportError) as e:
            raise _sending_error(e, self.base_url, answering=events.answering) from e
        raise events.cut_short()


def _send_args(base_url: str, headers: Dict[str, str], path: str, kw: Dict[str, Any]) -> Dict[str, Any]:
    """The URL and headers of a request to ``path`` (the client's token with it)."""
    kw = dict(kw)
    kw["url"] = f"{base_url}{path}"
    kw["headers"] = {**headers, **kw.get("headers", {})}
    return kw


def _sending_error(e: Exception, base_url: str, answering: bool = False) -> Exception:
    """What a request that could not be sent, or whose streamed answer broke off once the
    server had begun it (``answering``), raises."""
    if isinstance(e, UnicodeEncodeError):
        return _not_utf8(e)
    if isinstance(e, httpx.TimeoutException):
        return KvquiltConnectionError(0, "timeout", f"{base_url}: {e}")
    if answering:
        # the connection closed or reset mid-answer (the server or a proxy went away)
        return KvquiltConnectionError(0, "truncated", f"{base_url}: {e}")
    return KvquiltConnectionError(0, "unreachable", f"{base_url}: {e}")


def _chat_result(r: Dict[str, Any]) -> ChatResult:
    choice = r["choices"][0]
    return ChatResult(choice["message"]["content"], choice["finish_reason"], r["usage"], r.get("kvquilt", {}),
                      (choice.get("logprobs") or {}).get("content"))


class _Events:
    """A streamed chat completion's server-sent events, read line by line: the text pieces,
    then, at the server's ``[DONE]``, the end (finish reason, usage, stats) and ``done``."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.end = StreamEvent()
        self.done = False
        #: the server accepted the request (its 200 arrived): a break from here cuts the answer
        self.answering = False

    def read(self, line: str) -> List[StreamEvent]:
        # `data:` with or without its one optional space
        if not line.startswith("data:"):
            return []
        data = line[len("data:"):]
        data = data[1:] if data.startswith(" ") else data
        if data == "[DONE]":
            self.done = True
            return [self.end]
        try:
            v = json.loads(data)
        except ValueError as e:
            raise KvquiltError(200, "malformed_event", f"an event of the stream is not JSON: {data[:80]!r}") from e
        if not isinstance(v, dict):
            raise KvquiltError(200, "malformed_event", f"an event of the stream is not an object: {data[:80]!r}")
        if "error" in v:
            err = v["error"] if isinstance(v["error"], dict) else {"message": str(v["error"])}
            raise KvquiltError(200, str(err.get("code", "")), str(err.get("message", "")))
        if v.get("usage"):
            self.end.usage = v["usage"]
        if v.get("kvquilt"):
            self.end.stats = v["kvquilt"]
        # OpenAI's usage chunk (`stream_options.include_usage`) has no choices
        choice = (v.get("choices") or [{}])[0]
        if choice.get("finish_reason"):
            self.end.finish_reason = choice["finish_reason"]
        piece = (choice.get("delta") or {}).get("content") or ""
        listed = (choice.get("logprobs") or {}).get("content")
        # a token whose text is held back (a stop string's start, part of a character) comes
        # with no text but its log-probability
        return [StreamEvent(text=piece, logprobs=listed)] if piece or listed is not None else []

    def cut_short(self) -> KvquiltConnectionError:
        return KvquiltConnectionError(0, "truncated", f"{self.base_url}: the answer's stream ended before [DONE]")


def _chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
               compress=None, top_p=None, seed=None, stream=False, logprobs=None,
               top_logprobs=None) -> Dict[str, Any]:
    messages = (
        [{"role": "user", "content": question_or_messages}]
        if isinstance(question_or_messages, str)
        else list(question_or_messages)
    )
    body: Dict[str, Any] = {"messages": messages, "documents": _chunk_list(documents, "documents")}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if top_p is not None:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    # `logprobs` left out follows `top_logprobs`; given, it is sent as given
    if logprobs is None:
        logprobs = top_logprobs is not None
    if logprobs:
        body["logprobs"] = True
    if top_logprobs is not None:
        body["top_logprobs"] = top_logprobs
    if stop:
        body["stop"] = stop
    ext = {k: v for k, v in (("mode", mode), ("ratio", ratio), ("compress", compress)) if v is not None}
    if ext:
        body["kvquilt"] = ext
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body
