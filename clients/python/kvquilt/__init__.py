"""Client for the kvquilt sidecar: store chunk KV caches once, answer over them fast.

>>> from kvquilt import Client
>>> c = Client("http://127.0.0.1:8077", token="...")          # doctest: +SKIP
>>> ids = [s.id for s in c.put_chunks(["Paris is in France."])]  # doctest: +SKIP
>>> c.chat("Where is Paris?", documents=[{"id": ids[0]}]).text   # doctest: +SKIP

:class:`AsyncClient` (:mod:`kvquilt.aio`) is the same for ``asyncio`` code. The LangChain
integration lives in :mod:`kvquilt.langchain` (needs ``langchain-core``).
"""

from .aio import AsyncClient
from .client import (
    BlendResult,
    ChatResult,
    ChunkInfo,
    ChunkLookup,
    ChunkStatus,
    Client,
    KvquiltConnectionError,
    KvquiltError,
    StreamEvent,
    UnsendableText,
)

__all__ = [
    "AsyncClient",
    "BlendResult",
    "ChatResult",
    "ChunkInfo",
    "ChunkLookup",
    "ChunkStatus",
    "Client",
    "KvquiltConnectionError",
    "KvquiltError",
    "StreamEvent",
    "UnsendableText",
]
