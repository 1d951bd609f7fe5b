"""LangChain integration (``langchain-core``).

- :class:`KvquiltRetriever` wraps any retriever: it returns the same documents with their
  kvquilt chunk id in ``metadata["kvquilt_chunk_id"]``, after making sure their KV is stored
  (warming: the first sight precomputes, later ones are lookups).
- :class:`ChatKvquilt` is a chat model answering through kvquilt's blend completion; pass
  the retrieved documents as ``documents=`` (at ``invoke`` or with ``.bind``).
- :func:`rag_chain` joins them: ``question -> retrieve -> answer``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ConfigDict

from .client import Client

CHUNK_ID = "kvquilt_chunk_id"


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
        stored = self.client.put_chunks([d.page_content for d in docs])
        out = []
        for d, s in zip(docs, stored):
            meta = dict(d.metadata)
            meta[CHUNK_ID] = s.id
            meta["kvquilt_warm"] = s.status == "hit"
            out.append(Document(page_content=d.page_content, metadata=meta, id=d.id))
        return out


def _role(m: BaseMessage) -> str:
    return {"human": "user", "ai": "assistant", "system": "system"}.get(m.type, "user")


def _document_ref(d: Any) -> Any:
    if isinstance(d, Document):
        cid = d.metadata.get(CHUNK_ID)
        return {"id": cid} if cid else d.page_content
    return d


class ChatKvquilt(BaseChatModel):
    """A chat model served by kvquilt; ``documents`` (LangChain documents, texts or chunk
    ids) are assembled from their cached KV through blend."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Client
    max_tokens: int = 128
    temperature: Optional[float] = None
    mode: Optional[str] = None
    ratio: Optional[float] = None

    @property
    def _llm_type(self) -> str:
        return "kvquilt"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return {"base_url": self.client.base_url, "mode": self.mode, "ratio": self.ratio}

    def _generate(
        self,
        messages: List[BaseMessage],
        stop: Optional[List[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        documents: Sequence[Any] = (),
        **kwargs: Any,
    ) -> ChatResult:
        result = self.client.chat(
            [{"role": _role(m), "content": str(m.content)} for m in messages],
            documents=[_document_ref(d) for d in documents],
            max_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=self.temperature,
            stop=stop,
            mode=self.mode,
            ratio=self.ratio,
        )
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
