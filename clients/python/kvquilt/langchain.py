"""LangChain integration (``langchain-core``).

- :class:`KvquiltRetriever` wraps any retriever: it returns the same documents with their
  kvquilt chunk id in ``metadata["kvquilt_chunk_id"]``, after making sure their KV is stored
  (warming: the first sight precomputes, later ones are lookups). Warming never fails a
  retrieval: a document it could not warm is returned without a chunk id (and sent as text).
  Empty documents are neither warmed nor sent.
- :class:`ChatKvquilt` is a chat model answering through kvquilt's blend completion; pass
  the retrieved documents as ``documents=`` (at ``invoke`` or with ``.bind``).

Both take an optional ``async_client`` (:class:`kvquilt.aio.AsyncClient`): with it,
``ainvoke``/``astream`` run on the event loop; without it, LangChain runs the synchronous
client in worker threads.
- :func:`rag_chain` joins them: ``question -> retrieve -> answer``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict

from .aio import AsyncClient
from .client import Client, KvquiltError, StreamEvent, UnsendableText, _chunk_list

CHUNK_ID = "kvquilt_chunk_id"

T = TypeVar("T")


class KvquiltRetriever(BaseRetriever):
    """Any retriever, with the kvquilt chunk id of each document and its KV warmed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base: BaseRetriever
    client: Client
    #: warms on the event loop in ``ainvoke`` (``None``: in a worker thread)
    async_client: Optional[AsyncClient] = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> List[Document]:
        docs = self.base.invoke(query, config={"callbacks": run_manager.get_child()})
        return self._with_ids(docs, self._warm_docs(docs))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> List[Document]:
        # the base retriever's own async path (some have no other); warming, a blocking
        # HTTP call, in a worker thread
        docs = await self.base.ainvoke(query, config={"callbacks": run_manager.get_child()})
        texts = [d.page_content for d in docs if d.page_content]
        if not texts:
            warmed: List[Any] = []
        elif self.async_client is not None:
            warmed = await self._awarm(texts)
        else:
            warmed = await run_in_executor(None, self._warm, texts)
        return self._with_ids(docs, self._each(docs, warmed))

    def _warm_docs(self, docs: Sequence[Document]) -> List[Any]:
        """Each document's chunk status (``None``: empty, or not warmed)."""
        texts = [d.page_content for d in docs if d.page_content]
        return self._each(docs, self._warm(texts) if texts else [])

    @staticmethod
    def _each(docs: Sequence[Document], warmed: List[Any]) -> List[Any]:
        """The statuses of the non-empty documents' texts, spread over all documents."""
        stored = iter(warmed)
        return [next(stored) if d.page_content else None for d in docs]

    @staticmethod
    def _with_ids(docs: Sequence[Document], stored: List[Any]) -> List[Document]:
        out = []
        for d, s in zip(docs, stored):
            meta = dict(d.metadata)
            if s is not None:
                meta[CHUNK_ID] = s.id
            meta["kvquilt_warm"] = s is not None and s.status == "hit"
            out.append(Document(page_content=d.page_content, metadata=meta, id=d.id))
        return out

    def _warm(self, texts: List[str]) -> List[Any]:
        """Each text's chunk status, ``None`` where it was not warmed: warming is a
        speed-up, so no refusal fails the retrieval — the document is then sent as text.
        A batch refused for its size or for one document in it (400, 413: over a limit, such
        as the server's ``max_chunks``) is warmed in halves, so a large retrieval takes a few
        requests and one bad document costs about two per halving; a refusal of the whole
        store (403 over the tenant's quota, 503 busy, 507 store full, the sidecar
        unreachable, an answer it cannot read) leaves every document unwarmed."""
        try:
            return list(self.client.put_chunks(texts))
        except Exception as e:  # warming is a speed-up: nothing it meets fails a retrieval
            unwarmed = _unwarmed(e, len(texts))
            if unwarmed is not None:
                return unwarmed
        half = len(texts) // 2
        return self._warm(texts[:half]) + self._warm(texts[half:])

    async def _awarm(self, texts: List[str]) -> List[Any]:
        """:meth:`_warm` through the async client."""
        assert self.async_client is not None
        try:
            return list(await self.async_client.put_chunks(texts))
        except Exception as e:  # as in `_warm`
            unwarmed = _unwarmed(e, len(texts))
            if unwarmed is not None:
                return unwarmed
        half = len(texts) // 2
        return await self._awarm(texts[:half]) + await self._awarm(texts[half:])


def _unwarmed(e: Exception, n: int) -> Optional[List[Any]]:
    """What a failed warming of ``n`` texts gives: all of them unwarmed (said in a warning),
    or ``None`` where warming them in halves may store the rest — a refusal for the batch's
    size or for one text in it (400, 413), or a text that cannot be sent."""
    one_bad = (isinstance(e, KvquiltError) and e.status in (400, 413)) or isinstance(e, UnsendableText)
    if one_bad and n > 1:
        return None
    warnings.warn(f"kvquilt: {n} document(s) were not warmed: {e}")
    return [None] * n


def _role(m: BaseMessage) -> str:
    """The API role of a LangChain message (its chunks included: ``AIMessageChunk`` is an
    ``AIMessage``); tool and function messages are refused, as kvquilt calls no tools."""
    if isinstance(m, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(m.role, m.role)
        if role in ("system", "user", "assistant", "developer"):
            return role
        raise ValueError(f"kvquilt serves system, user and assistant messages; got role {m.role!r}")
    for kind, role in ((HumanMessage, "user"), (AIMessage, "assistant"), (SystemMessage, "system")):
        if isinstance(m, kind):
            return role
    raise ValueError(f"kvquilt serves system, user and assistant messages (no tool calling); "
                     f"got a {type(m).__name__}")


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content blocks."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            raise ValueError(f"kvquilt serves text only; got a content block {block!r}")
    return "".join(parts)


def _document_ref(d: Any, by_id: bool = True) -> Any:
    if isinstance(d, Document):
        cid = d.metadata.get(CHUNK_ID)
        return {"id": cid} if cid and by_id else d.page_content
    return d


def _is_empty(d: Any) -> bool:
    """A document with no text (a retriever may return one; the server refuses it)."""
    return (isinstance(d, Document) and not d.page_content) or (isinstance(d, str) and not d)


def _documents(documents: Any) -> List[Any]:
    """The documents of a call as a list: one on its own (a string, a ``Document``, a dict)
    is refused, not taken apart; empty ones are left out."""
    if isinstance(documents, Document):
        raise TypeError("documents takes a list of documents, not one: wrap it as [doc]")
    return [d for d in _chunk_list(documents, "documents") if not _is_empty(d)]


def _by_id_or_text(call: Callable[[List[Any]], T], documents: Any) -> T:
    """``call`` with the documents by chunk id; again with their texts when a warmed
    document's chunk was evicted or deleted since (`unknown_chunk`)."""
    documents = _documents(documents)
    try:
        return call([_document_ref(d) for d in documents])
    except KvquiltError as e:
        if e.code != "unknown_chunk":
            raise
        return call([_document_ref(d, by_id=False) for d in documents])


async def _aby_id_or_text(call: Callable[[List[Any]], Awaitable[T]], documents: Any) -> T:
    """:func:`_by_id_or_text` for a coroutine."""
    documents = _documents(documents)
    try:
        return await call([_document_ref(d) for d in documents])
    except KvquiltError as e:
        if e.code != "unknown_chunk":
            raise
        return await call([_document_ref(d, by_id=False) for d in documents])


class ChatKvquilt(BaseChatModel):
    """A chat model served by kvquilt; ``documents`` (LangChain documents, texts or chunk
    ids) are assembled from their cached KV through blend."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Client
    #: answers ``ainvoke``/``astream`` on the event loop (``None``: in a worker thread)
    async_client: Optional[AsyncClient] = None
    #: ``None``: the server's default
    max_tokens: Optional[int] = None
    #: each token's log-probability in ``response_metadata["logprobs"]`` (OpenAI's
    #: ``{"content": [...]}``, as ``ChatOpenAI`` gives it); ``top_logprobs`` alternatives
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    temperature: Optional[float] = None
    mode: Optional[str] = None
    ratio: Optional[float] = None

    @property
    def _llm_type(self) -> str:
        return "kvquilt"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        # every setting that changes an answer: LangChain's LLM cache keys on these
        return {"base_url": self.client.base_url,
                "async_base_url": self.async_client.base_url if self.async_client else None,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "mode": self.mode,
                "ratio": self.ratio, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    def _request(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: Dict[str, Any]
                 ) -> Dict[str, Any]:
        """The client's arguments: the model's settings, overridden per call (``max_tokens``,
        ``temperature``, ``mode``, ``ratio``, ``compress``, ``top_p``, ``seed``)."""
        known = {"max_tokens", "temperature", "mode", "ratio", "compress", "top_p", "seed", "logprobs",
                 "top_logprobs"}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"ChatKvquilt does not take {sorted(unknown)} (it takes {sorted(known)})")
        return {
            "question_or_messages": [{"role": _role(m), "content": _text(m.content)} for m in messages],
            "max_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "stop": stop,
            "mode": kwargs.get("mode", self.mode),
            "ratio": kwargs.get("ratio", self.ratio),
            "compress": kwargs.get("compress"),
            "top_p": kwargs.get("top_p"),
            "seed": kwargs.get("seed"),
            "logprobs": kwargs.get("logprobs", self.logprobs),
            "top_logprobs": kwargs.get("top_logprobs", self.top_logprobs),
        }

    def _generate(
        self,
        messages: List[BaseMessage],
        stop: Optional[List[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        documents: Sequence[Any] = (),
        **kwargs: Any,
    ) -> ChatResult:
        args = self._request(messages, stop, kwargs)
        return _chat_result(_by_id_or_text(lambda refs: self.client.chat(documents=refs, **args), documents))

    async def _agenerate(
        self,
        messages: List[BaseMessage],
        stop: Optional[List[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        documents: Sequence[Any] = (),
        **kwargs: Any,
    ) -> ChatResult:
        if self.async_client is None:
            return await super()._agenerate(messages, stop, run_manager, documents=documents, **kwargs)
        ac, args = self.async_client, self._request(messages, stop, kwargs)
        return _chat_result(await _aby_id_or_text(lambda refs: ac.chat(documents=refs, **args), documents))

    def _stream(
        self,
        messages: List[BaseMessage],
        stop: Optional[List[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        documents: Sequence[Any] = (),
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        args = self._request(messages, stop, kwargs)

        def started(refs: List[Any]) -> Iterator[StreamEvent]:
            # the server's refusal comes before the first event: take it here
            events = self.client.chat_events(documents=refs, **args)
            first = next(events, None)
            return itertools.chain([] if first is None else [first], events)

        for e in _by_id_or_text(started, documents):
            chunk = _chunk(e)
            if run_manager and e.text:
                run_manager.on_llm_new_token(e.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: List[BaseMessage],
        stop: Optional[List[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        documents: Sequence[Any] = (),
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if self.async_client is None:
            async for chunk in super()._astream(messages, stop, run_manager, documents=documents, **kwargs):
                yield chunk
            return
        ac, args = self.async_client, self._request(messages, stop, kwargs)

        async def started(refs: List[Any]) -> AsyncIterator[StreamEvent]:
            # the server's refusal comes before the first event: take it here
            events = ac.chat_events(documents=refs, **args)
            first = await events.__anext__()

            async def chained() -> AsyncIterator[StreamEvent]:
                try:
                    yield first
                    async for e in events:
                        yield e
                finally:
                    # a caller that stops early closes the answer's stream now
                    await events.aclose()

            return chained()

        async for e in await _aby_id_or_text(started, documents):
            chunk = _chunk(e)
            if run_manager and e.text:
                await run_manager.on_llm_new_token(e.text, chunk=chunk)
            yield chunk


def _chat_result(result: Any) -> ChatResult:
    """LangChain's result of a kvquilt chat answer."""
    msg = AIMessage(
        content=result.text,
        response_metadata={
            "finish_reason": result.finish_reason,
            "kvquilt": result.stats,
            **({"logprobs": {"content": result.logprobs}} if result.logprobs is not None else {}),
        },
        usage_metadata={
            "input_tokens": result.usage["prompt_tokens"],
            "output_tokens": result.usage["completion_tokens"],
            "total_tokens": result.usage["total_tokens"],
        },
    )
    return ChatResult(generations=[ChatGeneration(message=msg)])


def _chunk(e: StreamEvent) -> ChatGenerationChunk:
    """LangChain's chunk of a streamed event: a text piece, or the end (always sent, so an
    empty answer is a generation too), which carries what ``invoke`` reports — usage and
    ``response_metadata`` — to be merged into the streamed message."""
    if e.text or e.logprobs is not None:
        # (a piece's log-probabilities where ChatOpenAI puts them: its generation info)
        info = {"logprobs": {"content": e.logprobs}} if e.logprobs is not None else None
        return ChatGenerationChunk(message=AIMessageChunk(content=e.text), generation_info=info)
    usage = e.usage or {}
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            response_metadata={"finish_reason": e.finish_reason, "kvquilt": e.stats or {}},
            usage_metadata={
                "input_tokens": usage.get("prompt_tokens", 0),
                "output_tokens": usage.get("completion_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
            },
        )
    )


def rag_chain(retriever: BaseRetriever, llm: ChatKvquilt) -> Runnable:
    """``question -> {"answer", "documents", "stats"}``: retrieve (and warm), then answer
    over the retrieved documents' cached KV."""

    def answer(question: str) -> Dict[str, Any]:
        docs = retriever.invoke(question)
        msg = llm.invoke(question, documents=docs)
        return {
            "answer": msg.content,
            "documents": docs,
            "stats": msg.response_metadata.get("kvquilt", {}),
        }

    return RunnableLambda(answer)
