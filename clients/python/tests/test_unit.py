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
from langchain_core.retrievers import BaseRetriever

from kvquilt import Client, KvquiltConnectionError, KvquiltError
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
    assert caught, "the refusal is reported"


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
