"""A smoke test of a running sidecar, on any device: `python3 benches/sidecar_smoke.py [BASE]`
(default http://127.0.0.1:8077; the server's store should start empty, its model the default
SmolLM2). Python's standard library only. Each check prints PASS or FAIL with what it saw; the
exit status is 1 when any failed. `benches/gpu_run.sh sidecar` runs it against the GPU build.

What it checks: health and models (by id, an unknown one 404); a chat with three documents
three times (the first computes them, the next two hold them: every segment read, or the
request estimated faster as full prefill, as a small model on a GPU is; the same answer twice, the logprobs' tokens joined equal to the content); the streamed
answer equals the stored one and ends with usage and [DONE]; reuse, blend at 0.3 and full
answer; a conversation ending with an assistant's message; a token-id completion whose
`text_offset` has one entry per token; a text completion with a document; `echo` as lm-eval's
log-likelihood requests send it (the prompt scored, its first token null) and alone; chunk
lookup, pin and unpin; `usage.prompt_tokens_details.cached_tokens` of a prefix hit, and
growing over a four-turn conversation (its history read page by page), and without
documents reading the pages each answer left; the
stats' key identity; refusals (top_k,
n, an unknown role, max_tokens past the limit, a token id outside the vocabulary); stats and
metrics answer.
"""
import json, sys, time, urllib.request, urllib.error

BASE = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "http://127.0.0.1:8077"
fails = []

def call(method, path, body=None, raw=False):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
            return r.status, (text if raw else json.loads(text) if text else None)
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text)
        except Exception:
            return e.code, text

def check(name, ok, seen):
    print(("PASS" if ok else "FAIL"), name, "|", str(seen)[:600], flush=True)
    if not ok:
        fails.append(name)

DOCS = [
    "The Eiffel Tower is in Paris. It was completed in 1889 and is 330 metres tall. " * 6,
    "Mount Fuji is the highest mountain in Japan, at 3,776 metres. It last erupted in 1707. " * 6,
    "The Danube flows through ten countries, more than any other river in the world. " * 6,
]
Q = [{"role": "user", "content": "When was the Eiffel Tower completed?"}]

s, v = call("GET", "/health"); check("health", s == 200, v)
s, v = call("GET", "/v1/models"); check("models", s == 200 and v["data"], v)
mid = v["data"][0]["id"] if s == 200 else "x"
s, v = call("GET", "/v1/models/" + mid); check("model by id", s == 200 and v.get("id") == mid, v)
s, v = call("GET", "/v1/models/gpt-9"); check("unknown model 404", s == 404, v)

times = []
for attempt in range(3):
    t = time.time()
    s, v = call("POST", "/v1/chat/completions", {"messages": Q, "documents": DOCS, "max_tokens": 24,
                                                 "logprobs": True, "top_logprobs": 2})
    times.append(time.time() - t)
    if s != 200:
        check(f"chat with documents #{attempt}", False, v); break
    k = v["kvquilt"]
    print(f"  chat #{attempt}: {json.dumps(k)[:500]}")
    content = v["choices"][0]["message"]["content"]
    joined = "".join(t["token"] for t in v["choices"][0]["logprobs"]["content"])
    check(f"chat #{attempt} logprobs joined = content", joined == content, (content, joined))
    if attempt == 0:
        missed = content  # computed in full: the documents were not stored yet
    elif attempt == 1:
        first = content   # blended from the store; the stream below must repeat it
    else:
        check(f"chat #{attempt} same answer as #1", content == first, (content, first))
    if attempt > 0:
        # held: read, or the whole request estimated faster as full prefill (a small model on
        # a GPU: its prefill is a few launches), never recomputed as a miss
        held = (k["hits_gpu"] + k["hits_host"] + k["hits_ssd"]) >= len(DOCS) or k.get("fallback") in ("estimated", "measured")
        check(f"chat #{attempt} documents held", k["misses"] == 0 and held, k)
print("  chat wall times (s):", [round(x, 3) for x in times], "answers (miss, hit):", repr(missed), repr(first))

# stream: deltas joined = the non-streamed answer
req = urllib.request.Request(BASE + "/v1/chat/completions", method="POST",
    data=json.dumps({"messages": Q, "documents": DOCS, "max_tokens": 24, "stream": True,
                     "stream_options": {"include_usage": True}}).encode(),
    headers={"content-type": "application/json"})
parts, usage, done = [], None, False
with urllib.request.urlopen(req, timeout=120) as r:
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data:"):
            continue
        d = line[5:].strip()
        if d == "[DONE]":
            done = True; break
        e = json.loads(d)
        if e.get("usage"):
            usage = e["usage"]
        for c in e.get("choices", []):
            parts.append(c["delta"].get("content") or "")
check("stream joined = answer", "".join(parts) == first and done and usage, ("".join(parts), usage))

# blend at an explicit ratio, and the modes
for mode in [{"mode": "reuse"}, {"mode": "blend", "ratio": 0.3}, {"mode": "full"}]:
    s, v = call("POST", "/v1/chat/completions", {"messages": Q, "documents": DOCS, "max_tokens": 16,
                                                 "kvquilt": mode})
    check(f"chat {mode}", s == 200, (v["choices"][0]["message"]["content"], v["kvquilt"]) if s == 200 else v)

# a conversation ending with an assistant message
s, v = call("POST", "/v1/chat/completions", {"messages": Q + [{"role": "assistant", "content": "In 1889."},
            {"role": "user", "content": "How tall is it?"}, {"role": "assistant", "content": "330 metres."}],
            "documents": DOCS, "max_tokens": 12})
check("trailing assistant message", s == 200, v["choices"][0]["message"]["content"] if s == 200 else v)

# token-id completion with legacy logprobs and text_offset
s, v = call("POST", "/v1/completions", {"prompt": [504, 3458, 314], "max_tokens": 8, "logprobs": 2})
ok = s == 200 and len(v["choices"][0]["logprobs"]["text_offset"]) == len(v["choices"][0]["logprobs"]["tokens"])
check("token-id completion, text_offset", ok, v)
s, v = call("POST", "/v1/completions", {"prompt": "The capital of France is", "documents": DOCS[:1], "max_tokens": 8})
check("text completion with a document", s == 200, v)

# lm-eval's log-likelihood request (`local-completions`): the prompt echoed and scored, one
# token generated; lm-eval sums token_logprobs[ctxlen:-1] and calls it greedy where each equals
# the best of its top_logprobs
ctx, cont = [504, 3458, 314, 3316, 282], [2630, 314]
s, v = call("POST", "/v1/completions", {"prompt": [ctx + cont], "max_tokens": 1, "logprobs": 1,
                                        "echo": True, "temperature": 0})
ok = s == 200
if ok:
    lp = v["choices"][0]["logprobs"]
    n = len(ctx) + len(cont)
    scored = lp["token_logprobs"][len(ctx):-1]
    ok = (len(lp["tokens"]) == n + 1 and lp["token_logprobs"][0] is None
          and lp["top_logprobs"][0] is None and len(scored) == len(cont)
          and all(x is not None and x <= 0 for x in scored)
          and all(x <= max(t.values()) + 1e-5 for x, t in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
          and abs(lp["token_logprobs"][-1] - max(lp["top_logprobs"][-1].values())) < 1e-5
          and "".join(lp["tokens"]) == v["choices"][0]["text"])
    v = {"text": v["choices"][0]["text"], "loglikelihood": sum(scored), "continuation": scored}
check("echo with logprobs (lm-eval log-likelihood)", ok, v)
s, v = call("POST", "/v1/completions", {"prompt": "The capital of France is", "echo": True, "max_tokens": 0})
check("echo alone, max_tokens 0", s == 200 and v["choices"][0]["text"] == "The capital of France is", v)

# chunks: lookup computes nothing; a pin holds until unpinned; usage names exactly cached tokens
s, v = call("POST", "/v1/chunks/lookup", {"chunks": DOCS + ["A passage nobody stored."]})
check("lookup", s == 200 and all(c["tier"] for c in v["chunks"][:3]) and v["chunks"][3]["tier"] is None, v)
if s == 200:
    cid = v["chunks"][0]["id"]
    s1, p = call("POST", f"/v1/chunks/{cid}/pin", {})
    s2, u = call("DELETE", f"/v1/chunks/{cid}/pin")
    check("pin and unpin", s1 == 200 and p.get("pinned") == {} and s2 == 200 and "pinned" not in u, (p, u))
s, v = call("POST", "/v1/chat/completions", {"messages": Q, "documents": DOCS, "max_tokens": 4,
                                             "kvquilt": {"mode": "prefix"}})
s, v = call("POST", "/v1/chat/completions", {"messages": Q, "documents": DOCS, "max_tokens": 4,
                                             "kvquilt": {"mode": "prefix"}})
ok = s == 200 and v["usage"]["prompt_tokens_details"]["cached_tokens"] == v["kvquilt"]["cached_tokens"] > 0
check("usage cached_tokens (prefix hit)", ok, (v.get("usage"), v.get("kvquilt", {}).get("cached_tokens")) if s == 200 else v)
# a conversation whose history passes a page (256 tokens): from the third turn on, each
# turn reads the history the turn before stored (`prefix` mode: no fallback to full prefill)
# (the system prompt alone passes a page: every turn's prefix is paged, its first page shared)
history = [{"role": "system", "content": "You answer questions about European capitals. " * 60}]
seen = []
for q in ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Portugal?"]:
    history.append({"role": "user", "content": q})
    s, v = call("POST", "/v1/chat/completions", {"messages": history, "documents": DOCS[:1], "max_tokens": 24,
                                                 "kvquilt": {"mode": "prefix"}})
    if s != 200:
        seen.append(v); break
    seen.append(v["usage"]["prompt_tokens_details"]["cached_tokens"])
    history.append({"role": "assistant", "content": v["choices"][0]["message"]["content"]})
ok = len(seen) == 4 and all(isinstance(c, int) for c in seen) and seen[1] >= 256 and seen[3] >= seen[2] >= seen[1]
check("conversation reads its history (cached_tokens per turn)", ok, seen)
# a conversation without documents: after each answer its pages (prompt and answer, in full
# pages of 256) are stored, so the next turn reads at least those
history = [{"role": "system", "content": "You answer questions about European rivers. " * 69}]
turns = []
for q in ["Which river flows through Paris?", "And through Rome?", "And through Vienna?", "And through London?"]:
    history.append({"role": "user", "content": q})
    s, v = call("POST", "/v1/chat/completions", {"messages": history, "max_tokens": 64, "temperature": 0,
                                                 "kvquilt": {"mode": "prefix"}})
    if s != 200:
        turns.append(v); break
    turns.append((v["usage"]["prompt_tokens"], v["usage"]["completion_tokens"],
                  v["usage"]["prompt_tokens_details"]["cached_tokens"], len(v["kvquilt"].get("link_ids", []))))
    history.append({"role": "assistant", "content": v["choices"][0]["message"]["content"]})
ok = len(turns) == 4 and all(isinstance(t, tuple) for t in turns)
if ok:
    left = [256 * ((p + c - 1) // 256) for p, c, _, _ in turns[:-1]]
    ok = all(t[2] >= w for t, w in zip(turns[1:], left))
check("conversation without documents reads the answers' pages (prompt, completion, cached, link ids)", ok, turns)
# forgotten from its first page on: that page and every page after it, nothing held after
ids = v.get("kvquilt", {}).get("link_ids", []) if s == 200 else []
s, d = call("DELETE", f"/v1/chunks/{ids[0]}?descendants=true") if ids else (0, {})
gone = [call("GET", f"/v1/chunks/{i}")[0] for i in ids]
ok = s == 200 and d["deleted"][-1] == ids[0] and set(gone) == {404}
check("conversation deleted from its first page (deleted, GET after)", ok, (len(d.get("deleted", [])), gone))
s, v = call("GET", "/v1/stats")
check("stats key_identity", s == 200 and len(v.get("key_identity", {}).get("model", "")) == 64, v.get("key_identity") if s == 200 else v)

# refusals
for body, want in [({"messages": Q, "top_k": 5}, "top_k"), ({"messages": Q, "n": 2}, "n"),
                   ({"messages": [{"role": "robot", "content": "x"}]}, "robot"),
                   ({"messages": Q, "max_tokens": 10**9}, "max_tokens")]:
    s, v = call("POST", "/v1/chat/completions", body)
    check(f"refused {want}", s == 400 and want in json.dumps(v), (s, v))
s, v = call("POST", "/v1/completions", {"prompt": [10**8], "max_tokens": 2})
check("token id out of vocabulary refused", s == 400, (s, v))

s, v = call("GET", "/v1/stats"); check("stats", s == 200, json.dumps(v)[:800])
s, v = call("GET", "/metrics", raw=True)
check("metrics", s == 200, "\n".join(l for l in v.splitlines() if l.startswith("kvquilt_") and ("hit" in l or "graph" in l or "fallback" in l))[:1500])
print("FAILS:", fails)
sys.exit(1 if fails else 0)
