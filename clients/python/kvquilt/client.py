"""A typed, synchronous client for the kvquilt HTTP API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import httpx

#: A chunk in a request: a document's text, ``{"text": ...}``, ``{"tokens": [...]}`` or
#: ``{"id": ...}`` of a stored chunk.
ChunkRef = Union[str, Dict[str, Any]]

OBJECT_MEDIA_TYPE = "application/vnd.kvquilt.kv-object"


class KvquiltError(Exception):
    """The server refused a request: ``status``, the API's ``code`` and its ``message``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"kvquilt API error {status} ({code}): {message}")
        self.status = status
        self.code = code
        self.message = message


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
    usage: Dict[str, int]
    stats: Dict[str, Any] = field(default_factory=dict)


class Client:
    """One kvquilt server. ``base_url`` like ``http://127.0.0.1:8077``."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = 300.0,
        http: Optional[httpx.Client] = None,
    ):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.is_success:
            return r
        try:
            err = r.json()["error"]
            raise KvquiltError(r.status_code, err.get("code", ""), err.get("message", r.text))
        except (ValueError, KeyError, TypeError):
            raise KvquiltError(r.status_code, "", r.text) from None

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
        reuse), ``record`` and a ``note`` for people."""
        return self._json("GET", "/v1/models")["data"][0].get("kvquilt") or {}

    def stats(self) -> Dict[str, Any]:
        return self._json("GET", "/v1/stats")

    # -- chunks -----------------------------------------------------------------------------

    def put_chunks(self, chunks: Sequence[ChunkRef]) -> List[ChunkStatus]:
        """Precompute and store chunks' KV (a chunk already stored costs a lookup)."""
        body = self._json("POST", "/v1/chunks", json={"chunks": list(chunks)})
        return [ChunkStatus(**c) for c in body["chunks"]]

    def chunk(self, chunk_id: str, include_tokens: bool = False) -> Optional[ChunkInfo]:
        try:
            body = self._json(
                "GET",
                f"/v1/chunks/{chunk_id}",
                params={"include_tokens": "true" if include_tokens else "false"},
            )
        except KvquiltError as e:
            if e.status == 404:
                return None
            raise
        return ChunkInfo(**body)

    def delete_chunk(self, chunk_id: str) -> bool:
        try:
            self._request("DELETE", f"/v1/chunks/{chunk_id}")
            return True
        except KvquiltError as e:
            if e.status == 404:
                return False
            raise

    def chunk_kv(self, chunk_id: str) -> bytes:
        """The chunk's KV object (kvquilt object format, version 1)."""
        return self._request("GET", f"/v1/chunks/{chunk_id}/kv").content

    def put_chunk_kv(self, chunk_id: str, data: bytes) -> ChunkStatus:
        body = self._json(
            "PUT",
            f"/v1/chunks/{chunk_id}/kv",
            content=data,
            headers={"Content-Type": OBJECT_MEDIA_TYPE},
        )
        return ChunkStatus(**body)

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
        body: Dict[str, Any] = {"question": question, "chunks": list(chunks), "top_logprobs": top_logprobs}
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
        max_tokens: int = 128,
        temperature: Optional[float] = None,
        stop: Optional[List[str]] = None,
        mode: Optional[str] = None,
        ratio: Optional[float] = None,
        compress: Optional[Dict[str, Any]] = None,
    ) -> ChatResult:
        """A chat completion over ``documents`` (texts or ``{"id": ...}``), through blend.

        ``compress`` (e.g. ``{"policy": "snapkv", "compression": 4}``) prunes the prompt's KV
        with a token policy before decoding; ``stats["compression"]`` says what was kept.
        """
        body = self._chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
                               compress)
        r = self._json("POST", "/v1/chat/completions", json=body)
        choice = r["choices"][0]
        return ChatResult(choice["message"]["content"], choice["finish_reason"], r["usage"], r.get("kvquilt", {}))

    def chat_stream(
        self,
        question_or_messages: Union[str, List[Dict[str, str]]],
        documents: Iterable[ChunkRef] = (),
        max_tokens: int = 128,
        **kw: Any,
    ) -> Iterator[str]:
        """Yields the answer's text pieces as the server streams them."""
        import json

        body = self._chat_body(question_or_messages, documents, max_tokens, kw.get("temperature"),
                               kw.get("stop"), kw.get("mode"), kw.get("ratio"), kw.get("compress"))
        body["stream"] = True
        with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
            if not r.is_success:
                r.read()
                err = r.json().get("error", {})
                raise KvquiltError(r.status_code, err.get("code", ""), err.get("message", ""))
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                v = json.loads(data)
                if "error" in v:
                    raise KvquiltError(200, v["error"].get("code", ""), v["error"].get("message", ""))
                piece = v["choices"][0].get("delta", {}).get("content")
                if piece:
                    yield piece

    @staticmethod
    def _chat_body(question_or_messages, documents, max_tokens, temperature, stop, mode, ratio,
                   compress=None) -> Dict[str, Any]:
        messages = (
            [{"role": "user", "content": question_or_messages}]
            if isinstance(question_or_messages, str)
            else list(question_or_messages)
        )
        body: Dict[str, Any] = {"messages": messages, "documents": list(documents), "max_tokens": max_tokens}
        if temperature is not None:
            body["temperature"] = temperature
        if stop:
            body["stop"] = stop
        ext = {k: v for k, v in (("mode", mode), ("ratio", ratio), ("compress", compress)) if v is not None}
        if ext:
            body["kvquilt"] = ext
        return body
