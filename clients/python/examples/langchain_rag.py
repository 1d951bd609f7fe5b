"""A retrieval chain whose documents' KV is computed once and reused: LangChain's in-memory
vector store retrieves, kvquilt warms the retrieved chunks and answers over their cached KV.

Run against a server (``scripts/run.sh`` starts one on 127.0.0.1:8077)::

    pip install "./clients/python[example]"
    python clients/python/examples/langchain_rag.py --url http://127.0.0.1:8077

The embedding is a hashed bag of words so the example needs no model download; use any
LangChain ``Embeddings`` in practice.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from typing import Any, Dict, List, Optional

from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore

from kvquilt import Client
from kvquilt.langchain import ChatKvquilt, KvquiltRetriever, rag_chain

PASSAGES = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911.",
    "Quenmoor is a fishing town on the northern coast, known for its grey stone houses.",
    "The secret number is 4817. Nobody in Quenmoor knows who chose it.",
    "Bicycles were first sold in Quenmoor in 1899 by a merchant named Ada Pell.",
]


class HashedBagOfWords(Embeddings):
    """Words hashed into 256 buckets, L2-normalised: deterministic, no download."""

    def _embed(self, text: str) -> List[float]:
        v = [0.0] * 256
        for w in re.findall(r"[a-z0-9]+", text.lower()):
            v[int(hashlib.blake2b(w.encode(), digest_size=4).hexdigest(), 16) % 256] += 1.0
        n = math.sqrt(sum(x * x for x in v)) or 1.0
        return [x / n for x in v]

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> List[float]:
        return self._embed(text)


def run(url: str, token: Optional[str], question: str) -> Dict[str, Any]:
    """Builds the chain, asks twice, and returns the second answer with its stats (the
    second time every document is a cache hit)."""
    with Client(url, token=token) as client:
        store = InMemoryVectorStore(HashedBagOfWords())
        store.add_texts(PASSAGES)
        retriever = KvquiltRetriever(base=store.as_retriever(search_kwargs={"k": 2}), client=client)
        chain = rag_chain(retriever, ChatKvquilt(client=client, max_tokens=16))
        chain.invoke(question)
        return chain.invoke(question)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8077")
    p.add_argument("--token", default=None)
    p.add_argument("--question", default="What is the secret number? Answer with the number only.")
    a = p.parse_args()
    out = run(a.url, a.token, a.question)
    stats = out["stats"]
    print(f"answer: {out['answer'].strip()}")
    print(f"documents: {[d.page_content[:40] for d in out['documents']]}")
    # a blend of two short passages may be estimated slower than their full prefill
    fell_back = f" (fell back: {stats.get('fallback')})" if stats.get("fell_back_to_full") else ""
    print(
        f"kvquilt: mode {stats['mode']}{fell_back}, hits {stats['hits_host'] + stats['hits_ssd'] + stats['hits_gpu']},"
        f" misses {stats['misses']}, recomputed {stats['recompute_fraction']:.0%}, TTFT {stats['ttft_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()
