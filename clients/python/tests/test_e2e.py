"""End-to-end tests against a running `kvquilt serve` (started by the Rust integration test
`tests/python_clients.rs`, which passes KVQUILT_URL and KVQUILT_TOKEN)."""

import importlib.util
import os
import pathlib

import openai
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore

from kvquilt import AsyncClient, Client, KvquiltConnectionError, KvquiltError
from kvquilt.langchain import CHUNK_ID, ChatKvquilt, KvquiltRetriever, rag_chain

# the README's example: its passages and embedding serve these tests too
_EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "langchain_rag.py"
_spec = importlib.util.spec_from_file_location("langchain_rag", _EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
PASSAGES = example.PASSAGES
HashedBagOfWords = example.HashedBagOfWords

URL = os.environ.get("KVQUILT_URL", "")
TOKEN = os.environ.get("KVQUILT_TOKEN", "")
pytestmark = pytest.mark.skipif(not URL, reason="needs a running kvquilt (KVQUILT_URL)")

@pytest.fixture(scope="module")
def client():
    with Client(URL, token=TOKEN) as c:
        yield c


def test_openai_chat_completion_with_documents(client):
    oa = openai.OpenAI(base_url=URL + "/v1", api_key=TOKEN)
    model = oa.models.list().data[0].id
    assert oa.models.retrieve(model).id == model
    resp = oa.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the secret number? Answer with the number only."}],
        max_tokens=8,
        extra_body={"documents": PASSAGES},
    )
    text = resp.choices[0].message.content
    assert text.strip(), resp
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 50 and 1 <= resp.usage.completion_tokens <= 8
    assert resp.model_extra["kvquilt"]["tokens"] == resp.usage.prompt_tokens
    # the same documents again: every chunk is now a stored hit
    again = oa.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Where is the Zorblat Tower?"}],
        max_tokens=8,
        extra_body={"documents": PASSAGES},
    )
    stats = again.model_extra["kvquilt"]
    assert stats["misses"] == 0, stats


def test_the_default_model_is_calibrated(client):
    cal = client.calibration()
    assert cal["calibrated"] is True, cal
    assert cal["blend_ratio"] == pytest.approx(0.3), cal
    assert cal["selection"] == "qzero", cal  # the CPU's record: ranked before layer 0
    assert cal["record"].startswith("built-in"), cal
    # a blend without a ratio runs the record's ratio and says so
    out = client.blend("What is the secret number?", ["The secret number is 4817."])
    assert "calibrated: ratio 0.3" in out.stats["calibration"], out.stats


def test_openai_streaming_and_legacy_completion(client):
    oa = openai.OpenAI(base_url=URL + "/v1", api_key=TOKEN)
    model = client.model()
    ask = dict(
        model=model,
        messages=[{"role": "user", "content": "Who sold the first bicycles in Quenmoor?"}],
        max_tokens=12,
        # full prefill: a blend's plan (which chunks load, which recompute) follows the cost
        # model's timings, so two blended requests may differ; a full prefill is exact
        extra_body={"documents": PASSAGES, "kvquilt": {"mode": "full"}},
    )
    first = oa.chat.completions.create(**ask)
    whole = first.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in oa.chat.completions.create(stream=True, **ask) if c.choices]
    assert "".join(pieces) == whole  # greedy: streaming assembles the same text
    assert len([p for p in pieces if p]) >= 2
    # with include_usage, OpenAI's last chunk: no choices, the usage the SDK reads
    chunks = list(oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    assert chunks[-1].choices == [] and chunks[-1].usage == first.usage
    assert all(c.usage is None for c in chunks[:-1])
    comp = oa.completions.create(model=model, prompt="The capital of France is", max_tokens=4)
    assert comp.choices[0].text.strip() != ""


def test_openai_errors_name_the_problem():
    bad = openai.OpenAI(base_url=URL + "/v1", api_key="wrong-token-123")
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert "not valid" in str(e.value)
    oa = openai.OpenAI(base_url=URL + "/v1", api_key=TOKEN)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_langchain_retrieve_warm_answer(client):
    store = InMemoryVectorStore(HashedBagOfWords())
    store.add_texts(PASSAGES)
    retriever = KvquiltRetriever(base=store.as_retriever(search_kwargs={"k": 2}), client=client)
    docs = retriever.invoke("What is the secret number?")
    assert len(docs) == 2
    assert "4817" in docs[0].page_content  # the retriever found the passage that answers
    ids = [d.metadata[CHUNK_ID] for d in docs]
    assert all(client.chunk(i) is not None for i in ids)
    llm = ChatKvquilt(client=client, max_tokens=8)
    chain = rag_chain(retriever, llm)
    out = chain.invoke("What is the secret number? Answer with the number only.")
    assert out["answer"].strip(), out
    assert out["stats"]["misses"] == 0  # warmed by the retriever
    assert all(d.metadata["kvquilt_warm"] for d in out["documents"])


def test_chat_with_a_token_policy(client):
    r = client.chat("Where is the Zorblat Tower?", PASSAGES, max_tokens=6,
                    compress={"policy": "snapkv", "window": 8, "compression": 4})
    c = r.stats["compression"]
    assert c["applied"] and c["entries_kept"] * 4 <= c["entries_before"], c
    with pytest.raises(KvquiltError) as e:
        client.chat("Where?", PASSAGES, compress={"policy": "snapkv", "compression": 1})
    assert e.value.status == 400 and e.value.code == "invalid_compression"


def test_lookup_computes_nothing(client):
    held = "The harbour master of Quenmoor keeps the tide tables."
    cid = client.put_chunks([held])[0].id
    found = client.lookup([held, "A passage nobody stored, about the moon."])
    assert [f.id for f in found][:1] == [cid] and found[0].tier is not None, found
    assert found[1].tier is None and client.chunk(found[1].id) is None  # still not stored


def test_pin_and_unpin(client):
    cid = client.put_chunks(["The lighthouse at Quenmoor was built in 1902."])[0].id
    assert client.chunk(cid).pinned is None
    assert client.pin(cid).pinned == {}
    assert client.pin(cid, ttl_s=60).pinned["until_unix_s"] > 0
    assert client.chunk(cid).pinned is not None
    assert client.unpin(cid).pinned is None
    with pytest.raises(KvquiltError) as e:
        client.pin(cid, ttl_s=0)
    assert e.value.status == 400 and e.value.code == "invalid_ttl"


def test_a_conversation_is_forgotten_from_its_first_page(client):
    oa = openai.OpenAI(base_url=URL + "/v1", api_key=TOKEN)
    model = oa.models.list().data[0].id
    # a system prompt over one page (256 tokens): its pages are the conversation's
    messages = [{"role": "system", "content": "You answer in one short sentence, kindly. " * 40},
                {"role": "user", "content": "Name a colour of the sea."}]
    resp = oa.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                      temperature=0)
    ids = resp.model_extra["kvquilt"]["link_ids"]
    assert ids and all(client.chunk(i) is not None for i in ids)
    deleted = client.delete_chain(ids[0])
    assert deleted is not None and deleted[-1] == ids[0] and set(ids) <= set(deleted)
    assert all(client.chunk(i) is None for i in ids)
    assert client.delete_chain(ids[0]) is None


def test_client_errors(client):
    with pytest.raises(KvquiltError) as e:
        client.blend("q?", [{"id": "00" * 32}])
    assert e.value.status == 404 and e.value.code == "unknown_chunk"


def test_readme_example_runs():
    """The example the package README points to (examples/langchain_rag.py) works as written."""
    out = example.run(URL, TOKEN, "What is the secret number? Answer with the number only.")
    assert out["answer"].strip(), out
    assert out["stats"]["misses"] == 0  # the second ask hits every document
    assert len(out["documents"]) == 2


def test_client_mistakes_are_clear_errors(client):
    """Found by a probe of the client: each of these once went wrong quietly."""
    with pytest.raises(ValueError):
        client.chunk("../health")  # was a request to another route, read as "not stored"
    assert client.chunk("ab" * 32) is None  # unknown: None, only for `unknown_chunk`
    assert client.pin("ab" * 32) is None and client.unpin("ab" * 32) is None
    with pytest.raises(TypeError):
        client.put_chunks("one text")  # was stored as one chunk per character
    with pytest.raises(KvquiltError) as e:  # was a 404 from another route read as "not stored"
        Client(URL + "/v1", token=TOKEN).delete_chunk("ab" * 32)
    assert e.value.code != "unknown_chunk"
    with pytest.raises(KvquiltConnectionError) as e:  # was a raw httpx error
        Client("http://127.0.0.1:1").health()
    assert e.value.code == "unreachable"


def test_chat_model_streams_and_reads_content_blocks(client):
    llm = ChatKvquilt(client=client, max_tokens=8)
    whole = llm.invoke("Where is the Zorblat Tower?", documents=PASSAGES)
    pieces = list(llm.stream("Where is the Zorblat Tower?", documents=PASSAGES))
    assert all(isinstance(p, AIMessageChunk) for p in pieces)
    # text arrives in pieces (the end's chunk, with usage, carries none)
    assert whole.usage_metadata["output_tokens"] >= 2 and len([p for p in pieces if p.content]) >= 2
    assert "".join(p.content for p in pieces) == whole.content
    # the streamed message carries what `invoke` reports: usage and the blend's stats
    merged = pieces[0]
    for p in pieces[1:]:
        merged = merged + p
    assert merged.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]
    assert merged.response_metadata["kvquilt"]["tokens"] == whole.response_metadata["kvquilt"]["tokens"]
    # a message of content blocks is its text, not their repr
    blocks = llm.invoke([HumanMessage(content=[{"type": "text", "text": "Where is the Zorblat Tower?"}])],
                        documents=PASSAGES)
    assert blocks.content == whole.content
    assert blocks.usage_metadata["input_tokens"] == whole.usage_metadata["input_tokens"]
    # log-probabilities as ChatOpenAI gives them: the answer's tokens, joined its text
    scored = llm.invoke("Where is the Zorblat Tower?", documents=PASSAGES, logprobs=True, top_logprobs=2)
    tokens = scored.response_metadata["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == scored.content
    assert all(len(t["top_logprobs"]) == 2 for t in tokens)
    # per-call options are honoured, unknown ones refused
    assert llm.invoke("Where?", documents=PASSAGES, max_tokens=1).usage_metadata["output_tokens"] == 1
    with pytest.raises(TypeError):
        llm.invoke("Where?", documents=PASSAGES, temprature=0.5)
    # a document whose stored chunk is gone is sent as its text
    stale = Document(page_content=PASSAGES[0], metadata={CHUNK_ID: "cd" * 32})
    assert llm.invoke("Where?", documents=[stale]).content
    assert "".join(p.content for p in llm.stream("Where?", documents=[stale]))


class _Many(BaseRetriever):
    """More documents than one request may carry (the server's `max_chunks`, 64)."""

    def _get_relevant_documents(self, query, *, run_manager):
        return [Document(page_content=f"Note {i}: the code is {i * 7}.") for i in range(65)]


def test_warming_over_the_request_limit_still_retrieves(client):
    docs = KvquiltRetriever(base=_Many(), client=client).invoke("code?")
    assert len(docs) == 65  # was a `too_many_chunks` error for the whole retrieval
    assert all(d.metadata.get(CHUNK_ID) for d in docs)



def test_async_paths_answer_as_the_sync_ones(client):
    import asyncio

    # full prefill: exact, so the two paths must give the same tokens (a blend's plan
    # follows the cost model's timings and may differ between two requests)
    llm = ChatKvquilt(client=client, max_tokens=8, mode="full")
    whole = llm.invoke("Where is the Zorblat Tower?", documents=PASSAGES)

    async def run():
        async with AsyncClient(URL, token=TOKEN) as ac:
            allm = ChatKvquilt(client=client, async_client=ac, max_tokens=8, mode="full")
            msg = await allm.ainvoke("Where is the Zorblat Tower?", documents=PASSAGES)
            pieces = [p async for p in allm.astream("Where is the Zorblat Tower?", documents=PASSAGES)]
            stored = await ac.put_chunks(PASSAGES[:1])
            return msg, pieces, stored

    msg, pieces, stored = asyncio.run(run())
    assert msg.content == whole.content
    assert "".join(p.content for p in pieces) == whole.content
    assert stored[0].status == "hit"
    # one async client across event loops (an `asyncio.run` per request): its connections
    # are the loop's, and it opens new ones in the next
    ac = AsyncClient(URL, token=TOKEN)
    for _ in range(2):
        assert asyncio.run(ac.health())
