"""The client and the LangChain integration against answers from ``httpx.MockTransport``:
no server needed. Each test pins a behaviour a review found missing (the server's side of
the same paths is tested against a live sidecar in ``test_e2e.py``)."""

import json
import warnings
from functools import reduce
from operator import add

import httpx
import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.retrievers import BaseRetriever

from kvquilt import AsyncClient, Client, KvquiltConnectionError, KvquiltError
from kvquilt.langchain import CHUNK_ID, ChatKvquilt, KvquiltRetriever

ID = "ab" * 32


def client(handler):
    """A client whose requests ``handler`` answers (it gets the ``httpx.Request``)."""
    return Client("http://kvquilt.test", http=httpx.Client(transport=httpx.MockTransport(handler)))


def sse(*events, done=True):
    """A streamed chat completion's body: ``events`` as server-sent events, then ``[DONE]``."""
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return httpx.Response(200, text="".join(lines), headers={"content-type": "text/event-stream"})


def piece(text):
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


FINISH = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
USAGE = {
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42},
    "kvquilt": {"mode": "blend", "hits_host": 1},
}


def test_a_refusal_says_when_to_retry():
    busy = {"error": {"code": "server_busy", "message": "the queue is full"}}
    c = client(lambda r: httpx.Response(503, json=busy, headers={"retry-after": "2"}))
    with pytest.raises(KvquiltError) as e:
        c.put_chunks(["a text"])
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "server_busy", 2.0)


def test_one_chunk_where_a_list_belongs_is_refused():
    c = client(lambda r: pytest.fail("nothing may be sent"))
    for one in ["a text", {"text": "a text"}, {"id": ID}]:
        with pytest.raises(TypeError):
            c.put_chunks(one)
        with pytest.raises(TypeError):
            c.chat("q", documents=one)


def test_fields_a_newer_server_adds_are_ignored():
    status = {"id": ID, "tokens": 9, "status": "stored", "tier": "ssd", "durable": True, "codec": "raw"}
    c = client(lambda r: httpx.Response(200, json={"model": "m", "chunks": [status]}))
    [s] = c.put_chunks(["a text"])
    assert (s.id, s.tokens, s.status) == (ID, 9, "stored")


def test_max_tokens_left_out_is_the_server_s_default():
    sent = []

    def answer(r):
        sent.append(json.loads(r.content))
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    c = client(answer)
    c.chat("q")
    c.chat("q", max_tokens=5)
    assert "max_tokens" not in sent[0] and sent[1]["max_tokens"] == 5


def test_a_stream_cut_before_done_is_an_error():
    c = client(lambda r: sse(piece("Par"), done=False))
    with pytest.raises(KvquiltConnectionError) as e:
        list(c.chat_stream("q"))
    assert e.value.code == "truncated"


def test_a_stream_ends_with_its_finish_usage_and_stats():
    sent = []

    def answer(r):
        sent.append(json.loads(r.content))
        return sse(piece("Par"), piece("is"), FINISH, USAGE)

    events = list(client(answer).chat_events("q"))
    assert [e.text for e in events[:-1]] == ["Par", "is"]
    end = events[-1]
    assert (end.finish_reason, end.usage["completion_tokens"], end.stats["mode"]) == ("stop", 2, "blend")
    assert sent[0]["stream"] and sent[0]["stream_options"] == {"include_usage": True}


class _Two(BaseRetriever):
    def _get_relevant_documents(self, query, *, run_manager):
        return [Document(page_content="Paris is in France."), Document(page_content="Rome is in Italy.")]


@pytest.mark.parametrize("status,code", [(403, "quota_exceeded"), (503, "server_busy"), (507, "store_full")])
def test_a_refused_warming_still_retrieves(status, code):
    c = client(lambda r: httpx.Response(status, json={"error": {"code": code, "message": "no"}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = KvquiltRetriever(base=_Two(), client=c).invoke("where?")
    assert [d.page_content for d in docs] == ["Paris is in France.", "Rome is in Italy."]
    assert not any(CHUNK_ID in d.metadata for d in docs)
    said = [str(w.message) for w in caught if "not warmed" in str(w.message)]
    assert said and code in said[0], "the refusal is reported"


def test_an_unreachable_sidecar_still_retrieves():
    def down(r):
        raise httpx.ConnectError("refused")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = KvquiltRetriever(base=_Two(), client=client(down)).invoke("where?")
    assert len(docs) == 2 and not any(CHUNK_ID in d.metadata for d in docs)


def test_a_streamed_answer_carries_usage_and_stats_even_when_empty():
    llm = ChatKvquilt(client=client(lambda r: sse(piece("Par"), piece("is"), FINISH, USAGE)))
    merged = reduce(add, llm.stream("q"))
    assert merged.content == "Paris"
    assert merged.usage_metadata["output_tokens"] == 2
    assert merged.response_metadata["kvquilt"]["mode"] == "blend"
    assert merged.response_metadata["finish_reason"] == "stop"
    # an answer of no text (the first token ended it) is still a generation
    empty = ChatKvquilt(client=client(lambda r: sse(FINISH, USAGE)))
    merged = reduce(add, empty.stream("q"))  # (it raised "No generation chunks were returned")
    assert merged.content == "" and merged.usage_metadata["output_tokens"] == 2


def answer_with(sent):
    """A handler recording each request's JSON body and answering a chat completion (or,
    for ``/v1/chunks``, storing every chunk)."""

    def answer(r):
        body = json.loads(r.content)
        sent.append((r.url.path, body, r.headers.get("authorization")))
        if r.url.path == "/v1/chunks":
            return httpx.Response(200, json={"chunks": [
                {"id": ID, "tokens": 3, "status": "stored"} for _ in body["chunks"]]})
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    return answer


def test_one_document_is_refused_not_taken_apart_and_empty_ones_left_out():
    sent = []
    llm = ChatKvquilt(client=client(answer_with(sent)))
    # one string was sent as one chunk per character; one Document as its fields
    for one in ["Paris is in France.", Document(page_content="Paris is in France."), {"id": ID}]:
        with pytest.raises(TypeError):
            llm.invoke("Where?", documents=one)
    assert not sent
    llm.invoke("Where?", documents=[Document(page_content=""), "", Document(page_content="Rome.")])
    assert sent[0][1]["documents"] == ["Rome."]  # an empty one was a 400 for the whole answer


def test_messages_keep_their_roles():
    sent = []
    llm = ChatKvquilt(client=client(answer_with(sent)))
    history = [
        SystemMessage(content="s"),
        HumanMessage(content="q"),
        AIMessageChunk(content="a"),  # what merging a stream gives
        ChatMessage(role="assistant", content="b"),
        HumanMessage(content="q2"),
    ]
    llm.invoke(history)
    assert [m["role"] for m in sent[0][1]["messages"]] == ["system", "user", "assistant", "assistant", "user"]
    for bad in [ToolMessage(content="42", tool_call_id="t"), ChatMessage(role="tool", content="x")]:
        with pytest.raises(ValueError):
            llm.invoke([HumanMessage(content="q"), bad])
    assert len(sent) == 1


def test_settings_that_change_the_answer_key_the_cache():
    c = client(answer_with([]))
    a, b = ChatKvquilt(client=c, max_tokens=8), ChatKvquilt(client=c, max_tokens=512)
    assert a._identifying_params != b._identifying_params
    assert ChatKvquilt(client=c, temperature=0.0)._identifying_params != ChatKvquilt(
        client=c, temperature=1.0)._identifying_params


def test_per_call_sampling_options_are_sent():
    sent = []
    ChatKvquilt(client=client(answer_with(sent))).invoke("q", top_p=0.5, seed=7)
    assert (sent[0][1]["top_p"], sent[0][1]["seed"]) == (0.5, 7)


def test_a_shared_http_client_is_not_changed():
    sent = []
    shared = httpx.Client(transport=httpx.MockTransport(answer_with(sent)))
    a = Client("http://a.test", token="token-a", http=shared)
    b = Client("http://b.test", token="token-b", http=shared)
    a.chat("q")
    b.chat("q")
    a.close()
    a.chat("q")  # the shared client stays open
    assert [t for _, _, t in sent] == ["Bearer token-a", "Bearer token-b", "Bearer token-a"]
    assert "authorization" not in shared.headers


class _Docs(BaseRetriever):
    texts: list

    def _get_relevant_documents(self, query, *, run_manager):
        return [Document(page_content=t) for t in self.texts]


def test_a_large_or_bad_batch_is_warmed_in_halves():
    sent = []
    store = answer_with(sent)

    def at_most_16_and_no_bad(r):
        chunks = json.loads(r.content)["chunks"]
        if len(chunks) > 16 or "bad" in chunks:
            sent.append(("refused", len(chunks), None))
            return httpx.Response(400, json={"error": {"code": "too_many_chunks", "message": "no"}})
        return store(r)

    texts = [f"note {i}" for i in range(50)]
    texts[37] = "bad"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = KvquiltRetriever(base=_Docs(texts=texts), client=client(at_most_16_and_no_bad)).invoke("q")
    assert [CHUNK_ID in d.metadata for d in docs] == [t != "bad" for t in texts]
    assert len(sent) < 16, f"{len(sent)} requests (one per document was {len(texts) + 1})"
    assert sum("not warmed" in str(w.message) for w in caught) == 1


def test_text_that_cannot_be_sent_does_not_fail_a_retrieval():
    sent = []
    texts = ["Paris is in France.", "caf\udce9 au lait", "", "Rome is in Italy."]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = KvquiltRetriever(base=_Docs(texts=texts), client=client(answer_with(sent))).invoke("q")
    assert [CHUNK_ID in d.metadata for d in docs] == [True, False, False, True]
    assert any("not valid Unicode" in str(w.message) for w in caught)
    # the client names the problem
    with pytest.raises(ValueError, match="not valid Unicode"):
        client(answer_with([])).put_chunks(["caf\udce9"])


def test_the_async_retriever_uses_the_base_s_async_path():
    class AsyncOnly(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager):
            raise NotImplementedError("async only")

        async def _aget_relevant_documents(self, query, *, run_manager):
            return [Document(page_content="Paris is in France.")]

    import asyncio

    docs = asyncio.run(KvquiltRetriever(base=AsyncOnly(), client=client(answer_with([]))).ainvoke("q"))
    assert docs[0].metadata[CHUNK_ID] == ID


def test_stream_events_are_read_as_sse_allows():
    no_space = httpx.Response(200, text="data:" + json.dumps(piece("Hi")) + "\n\ndata:[DONE]\n\n",
                              headers={"content-type": "text/event-stream"})
    assert list(client(lambda r: no_space).chat_stream("q")) == ["Hi"]
    garbled = httpx.Response(200, text="data: {not json\n\n", headers={"content-type": "text/event-stream"})
    with pytest.raises(KvquiltError) as e:
        list(client(lambda r: garbled).chat_stream("q"))
    assert e.value.code == "malformed_event"
    failed = sse(piece("Par"), {"error": {"code": "device_out_of_memory", "message": "oom"}}, done=False)
    with pytest.raises(KvquiltError) as e:
        list(client(lambda r: failed).chat_stream("q"))
    assert (e.value.status, e.value.code) == (200, "device_out_of_memory")


def test_a_connection_cut_mid_answer_is_a_truncated_answer():
    class Cut(httpx.SyncByteStream):
        def __iter__(self):
            yield ("data: " + json.dumps(piece("Par")) + "\n\n").encode()
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    c = client(lambda r: httpx.Response(200, stream=Cut(), headers={"content-type": "text/event-stream"}))
    with pytest.raises(KvquiltConnectionError) as e:
        list(c.chat_stream("q"))
    assert e.value.code == "truncated"

    class Reset(httpx.SyncByteStream):
        def __iter__(self):
            yield ("data: " + json.dumps(piece("Par")) + "\n\n").encode()
            raise httpx.ReadError("connection reset by peer")

    c = client(lambda r: httpx.Response(200, stream=Reset(), headers={"content-type": "text/event-stream"}))
    with pytest.raises(KvquiltConnectionError) as e:
        list(c.chat_stream("q"))
    assert e.value.code == "truncated"  # was "unreachable"

    def gone(r):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    with pytest.raises(KvquiltConnectionError) as e:
        list(client(gone).chat_stream("q"))
    assert e.value.code == "unreachable"  # nothing of an answer arrived: not a cut answer


def test_connecting_has_its_own_short_timeout():
    c = Client("http://kvquilt.test", timeout=300.0)
    assert (c._http.timeout.connect, c._http.timeout.read) == (5.0, 300.0)


def aclient(handler):
    """An async client whose requests ``handler`` answers."""
    return AsyncClient("http://kvquilt.test", http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


def no_sync_calls(r):
    pytest.fail("the synchronous client was called on the async path")


def test_the_async_client_answers_streams_and_fails_as_the_sync_one():
    import asyncio

    sent = []

    async def run():
        c = aclient(answer_with(sent))
        [s] = await c.put_chunks(["a text"])
        r = await c.chat("q", documents=[{"id": s.id}], top_p=0.5)
        events = [e async for e in aclient(lambda r: sse(piece("Par"), piece("is"), FINISH, USAGE)).chat_events("q")]
        with pytest.raises(KvquiltConnectionError) as cut:
            [p async for p in aclient(lambda r: sse(piece("Par"), done=False)).chat_stream("q")]
        busy = {"error": {"code": "server_busy", "message": "full"}}
        with pytest.raises(KvquiltError) as refused:
            await aclient(lambda r: httpx.Response(503, json=busy, headers={"retry-after": "2"})).chat("q")
        with pytest.raises(TypeError):
            await c.put_chunks("one string")
        return s, r, events, cut.value, refused.value

    s, r, events, cut, refused = asyncio.run(run())
    assert (s.id, r.text, r.usage["total_tokens"]) == (ID, "hi", 4)
    assert sent[1][1]["documents"] == [{"id": ID}] and sent[1][1]["top_p"] == 0.5
    assert [e.text for e in events[:-1]] == ["Par", "is"] and events[-1].usage["completion_tokens"] == 2
    assert cut.code == "truncated"
    assert (refused.status, refused.code, refused.retry_after) == (503, "server_busy", 2.0)


def test_the_chat_model_and_retriever_run_on_the_event_loop_with_an_async_client():
    import asyncio

    sent = []
    stale = {"error": {"code": "unknown_chunk", "message": "gone"}}

    def answer(r):
        body = json.loads(r.content)
        if r.url.path == "/v1/chat/completions" and {"id": ID} in body["documents"]:
            sent.append("by id")
            return httpx.Response(404, json=stale)
        if body.get("stream"):
            sent.append("stream")
            return sse(piece("Par"), piece("is"), FINISH, USAGE)
        return answer_with(sent)(r)

    llm = ChatKvquilt(client=client(no_sync_calls), async_client=aclient(answer))
    retriever = KvquiltRetriever(base=_Two(), client=client(no_sync_calls), async_client=aclient(answer))

    async def run():
        docs = await retriever.ainvoke("where?")
        msg = await llm.ainvoke("Where?", documents=docs)
        pieces = [p async for p in llm.astream("Where?", documents=docs)]
        return docs, msg, pieces

    docs, msg, pieces = asyncio.run(run())
    assert all(d.metadata[CHUNK_ID] == ID for d in docs)
    assert msg.content == "hi" and msg.usage_metadata["total_tokens"] == 4
    merged = reduce(add, pieces)
    assert merged.content == "Paris" and merged.usage_metadata["output_tokens"] == 2
    # a stored chunk gone since warming: asked again with the documents' texts, both ways
    assert sent.count("by id") == 2 and "stream" in sent


def test_without_an_async_client_ainvoke_runs_the_sync_client():
    import asyncio

    sent = []
    msg = asyncio.run(ChatKvquilt(client=client(answer_with(sent))).ainvoke("Where?"))
    assert msg.content == "hi" and len(sent) == 1


def test_a_token_that_cannot_be_a_header_is_refused_without_repeating_it():
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError) as e:
            make("http://kvquilt.test", token="tök-SECRETSECRET")
        assert "SECRET" not in str(e.value)


def test_an_unreadable_warming_answer_leaves_the_batch_unwarmed_in_one_request():
    sent = []

    def proxy_page(r):
        sent.append(r)
        return httpx.Response(200, text="<html>a captive portal</html>")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = KvquiltRetriever(base=_Two(), client=client(proxy_page)).invoke("where?")
    assert len(docs) == 2 and not any(CHUNK_ID in d.metadata for d in docs)
    assert len(sent) == 1, "no halving for a failure that is not one document's"
    assert sum("not warmed" in str(w.message) for w in caught) == 1


def test_async_warming_halves_past_a_bad_text_and_errors_map_as_sync():
    import asyncio

    sent = []
    texts = ["Paris is in France.", "caf\udce9 au lait", "Rome is in Italy.", "Oslo is in Norway."]

    def down(r):
        raise httpx.ConnectError("refused")

    async def run():
        r = KvquiltRetriever(base=_Docs(texts=texts), client=client(no_sync_calls),
                             async_client=aclient(answer_with(sent)))
        docs = await r.ainvoke("q")
        with pytest.raises(KvquiltConnectionError) as e:
            await aclient(down).chat("q")
        return docs, e.value

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs, err = asyncio.run(run())
    assert [CHUNK_ID in d.metadata for d in docs] == [True, False, True, True]
    assert sum("not warmed" in str(w.message) for w in caught) == 1
    assert err.code == "unreachable"


def test_astream_without_an_async_client_streams_through_the_sync_one():
    import asyncio

    llm = ChatKvquilt(client=client(lambda r: sse(piece("Par"), piece("is"), FINISH, USAGE)))

    async def run():
        return [p async for p in llm.astream("q")]

    merged = reduce(add, asyncio.run(run()))
    assert merged.content == "Paris" and merged.usage_metadata["output_tokens"] == 2


def test_an_owned_async_client_follows_the_running_loop():
    import asyncio

    c = AsyncClient("http://kvquilt.test")

    async def current():
        return c._client()

    first, second = asyncio.run(current()), asyncio.run(current())
    assert first is not second  # a loop's pooled connections die with it

    async def same():
        return c._client() is c._client()

    assert asyncio.run(same())


def test_logprobs_are_asked_for_and_read_as_chat_openai_gives_them():
    sent = []
    listed = [{"token": "hi", "logprob": -0.1, "bytes": [104, 105], "top_logprobs": []}]

    def answer(r):
        sent.append(json.loads(r.content))
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop", "logprobs": {"content": listed}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })

    r = client(answer).chat("q", logprobs=True, top_logprobs=3)
    assert (sent[0]["logprobs"], sent[0]["top_logprobs"]) == (True, 3) and r.logprobs == listed
    client(answer).chat("q")
    assert "logprobs" not in sent[1]
    msg = ChatKvquilt(client=client(answer), logprobs=True).invoke("q")
    assert msg.response_metadata["logprobs"] == {"content": listed} and sent[2]["logprobs"] is True
    stream = sse({"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": listed}}]},
                 FINISH, USAGE)
    [first] = [e for e in client(lambda r: stream).chat_events("q", logprobs=True) if e.text]
    assert first.logprobs == listed
    # a token whose text is held back still brings its log-probability (it was dropped)
    held = {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": {"content": listed}}]}
    two = sse(held, {"object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": listed}}]},
              FINISH, USAGE)
    events = list(client(lambda r: two).chat_events("q", logprobs=True))
    assert sum(len(e.logprobs or []) for e in events) == 2
    merged = reduce(add, ChatKvquilt(client=client(lambda r: two), logprobs=True).stream("q"))
    assert merged.content == "hi" and merged.usage_metadata["output_tokens"] == 2
    # `logprobs=False` given wins over a model's `top_logprobs`
    ChatKvquilt(client=client(answer), top_logprobs=3).invoke("q", logprobs=False)
    assert "logprobs" not in sent[-1] and sent[-1]["top_logprobs"] == 3
