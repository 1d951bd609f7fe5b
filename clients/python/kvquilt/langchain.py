"""LangChain integration (``langchain-core``).

- :class:`KvquiltRetriever` wraps any retriever: it returns the same documents with their
  kvquilt chunk id in ``metadata["kvquilt_chunk_id"]``, after making sure their KV is stored
  (warming: the first sight precomputes, later ones are lookups).
- :class:`ChatKvquilt` is a chat model answering through kvquilt's blend completion; pass
  the retrieved documents as ``documents=`` (at ``invoke`` or with ``.bind``).
- :func:`rag_chain` joins them: ``question -> retrieve -> answer``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ConfigDict

from .client import Client, KvquiltError, StreamEvent

CHUNK_ID = "kvquilt_chunk_id"

T = TypeVar("T")


class KvquiltRetriever(BaseRetriever):
    """Any retriever, with the kvquilt chunk id of each document and its KV warmed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base: BaseRetriever
    client: Client

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> List[Document]:
        docs = self.base.invoke(query, config={"callbacks": run_manager.get_child()})
        if not docs:
            return []
        stored = self._warm([d.page_content for d in docs])
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
        A refusal of one document (400, 413: over a limit) is found by warming the texts one
        by one; one of the whole batch (403 over the tenant's quota, 503 busy, 507 store
        full, the sidecar unreachable) leaves every document unwarmed."""
        try:
            return list(self.client.put_chunks(texts))
        except KvquiltError as e:
            if e.status not in (400, 413) or len(texts) == 1:
                warnings.warn(f"kvquilt: documents were not warmed: {e}", stacklevel=2)
                return [None] * len(texts)
        out: List[Any] = []
        for t in texts:
            try:
                out.append(self.client.put_chunks([t])[0])
            except KvquiltError as e:
                warnings.warn(f"kvquilt: a document was not warmed: {e}", stacklevel=2)
                out.append(None)
        return out


def _role(m: BaseMessage) -> str:
    return {"human": "user", "ai": "assistant", "system": "system"}.get(m.type, "user")


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


def _by_id_or_text(call: Callable[[List[Any]], T], documents: Sequence[Any]) -> T:
    """``call`` with the documents by chunk id; again with their texts when a warmed
    document's chunk was evicted or deleted since (`unknown_chunk`)."""
    try:
        return call([_document_ref(d) for d in documents])
    except KvquiltError as e:
        if e.code != "unknown_chunk":
            raise
        return call([_document_ref(d, by_id=False) for d in documents])


class ChatKvquilt(BaseChatModel):
    """A chat model served by kvquilt; ``documents`` (LangChain documents, texts or chunk
    ids) are assembled from their cached KV through blend."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Client
    #: ``None``: the server's default
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    mode: Optional[str] = None
    ratio: Optional[float] = None

    @property
    def _llm_type(self) -> str:
        return "kvquilt"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return {"base_url": self.client.base_url, "mode": self.mode, "ratio": self.ratio}

    def _request(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: Dict[str, Any]
                 ) -> Dict[str, Any]:
        """The client's arguments: the model's settings, overridden per call (``max_tokens``,
        ``temperature``, ``mode``, ``ratio``, ``compress``)."""
        known = {"max_tokens", "temperature", "mode", "ratio", "compress"}
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
        result = _by_id_or_text(lambda refs: self.client.chat(documents=refs, **args), documents)
        msg = AIMessage(
            content=result.text,
            response_metadata={"finish_reason": result.finish_reason, "kvquilt": result.stats},
            usage_metadata={
                "input_tokens": result.usage["prompt_tokens"],
                "output_tokens": result.usage["completion_tokens"],
                "total_tokens": result.usage["total_tokens"],
            },
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])

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
            if e.text:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=e.text))
                if run_manager:
                    run_manager.on_llm_new_token(e.text, chunk=chunk)
                yield chunk
                continue
            # the end (always sent, so an empty answer is a generation too): what `invoke`
            # reports, merged into the streamed message
            usage = e.usage or {}
            yield ChatGenerationChunk(
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
