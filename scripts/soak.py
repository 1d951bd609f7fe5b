#!/usr/bin/env python3
"""Soak test of `kvquilt serve` on loopback: mixed traffic for a bounded time, then a report.

Starts the server (the release binary, the default model unless --model) on a fresh data
directory, runs --concurrency client threads of mixed requests for --duration seconds
(chunk uploads, lookups, deletes racing blends that read the same chunks, blends, chat
completions with documents), probes /health every 100 ms from its own thread, samples the
server's RSS and open file descriptors every 5 s, then stops it with SIGINT.

Passes (exit 0) when: no 5xx, the server stopped cleanly (exit 0), /health p99 < 50 ms, and
RSS and fds level off (the last fifth's maximum within 1.25x of the middle fifth's). The
report is one JSON object on stdout (figures for BENCHMARKS.md).

    python3 scripts/soak.py --binary $CARGO_TARGET_DIR/release/kvquilt --duration 1800
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WORDS = (
    "tide harbour gull lantern quay north river stone bridge market winter salt ferry "
    "tower bell rope cliff island keeper signal fog anchor chart compass"
).split()


def document(i):
    """Document i: a few deterministic sentences (~60-120 tokens)."""
    rng = random.Random(i)
    sentences = []
    for _ in range(rng.randint(3, 6)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return f"Note {i}. " + " ".join(sentences)


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port, timeout):
        self.port, self.timeout = port, timeout
        self.conn = None

    def call(self, method, path, body=None):
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                data = None if body is None else json.dumps(body).encode()
                headers = {"content-type": "application/json"} if data is not None else {}
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, raw
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError):
                self.conn = None
                if attempt == 1:
                    return 0, b""
        return 0, b""


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_op = {}
        self.errors_5xx = []

    def record(self, op, status, raw):
        with self.lock:
            self.by_op.setdefault(op, {}).setdefault(str(status), 0)
            self.by_op[op][str(status)] += 1
            if status >= 500 or status == 0:
                if len(self.errors_5xx) < 20:
                    self.errors_5xx.append({"op": op, "status": status, "body": raw[:300].decode("utf-8", "replace")})


def worker(port, deadline, stats, ids, ids_lock, docs, seed):
    rng = random.Random(seed)
    c = Client(port, timeout=120)
    while time.time() < deadline:
        op = rng.choices(
            ["put", "lookup", "delete", "blend", "chat"], weights=[3, 3, 1, 4, 2]
        )[0]
        if op == "put":
            n = rng.randint(1, 3)
            chunks = [docs[rng.randrange(len(docs))] for _ in range(n)]
            status, raw = c.call("POST", "/v1/chunks", {"chunks": chunks})
            if status == 200:
                with ids_lock:
                    for ch in json.loads(raw)["chunks"]:
                        ids.add(ch["id"])
        elif op in ("lookup", "delete"):
            with ids_lock:
                pick = rng.choice(sorted(ids)) if ids else "0" * 64
            method = "GET" if op == "lookup" else "DELETE"
            status, raw = c.call(method, f"/v1/chunks/{pick}")
            if op == "delete" and status == 204:
                with ids_lock:
                    ids.discard(pick)
        elif op == "blend":
            chunks = [docs[rng.randrange(len(docs))] for _ in range(rng.randint(2, 4))]
            mode = rng.choice(["blend", "reuse", "prefix", "full"])
            status, raw = c.call("POST", "/v1/blend", {"question": "Which word comes first?", "chunks": chunks, "mode": mode})
        else:
            docs_ = [docs[rng.randrange(len(docs))] for _ in range(rng.randint(1, 3))]
            status, raw = c.call(
                "POST",
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Name one word from the notes."}], "documents": docs_, "max_tokens": 4},
            )
        stats.record(op, status, raw)


def health_prober(port, deadline, latencies):
    c = Client(port, timeout=10)
    while time.time() < deadline:
        t = time.perf_counter()
        status, _ = c.call("GET", "/health")
        latencies.append((time.perf_counter() - t, status))
        time.sleep(0.1)


def sample_process(pid, port, deadline, samples):
    c = Client(port, timeout=10)
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                rss_kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            status, raw = c.call("GET", "/v1/stats")
            tiers = {t["tier"]: t["used_bytes"] / 2**20 for t in json.loads(raw)["tiers"]} if status == 200 else {}
            samples.append({"t": time.time(), "rss_mb": rss_kb / 1024, "fds": fds, "tier_used_mb": tiers})
        except (FileNotFoundError, StopIteration, ProcessLookupError, ValueError):
            pass
        time.sleep(5)


def levels_off(values):
    """The last fifth's maximum is within 1.25x of the middle fifth's."""
    if len(values) < 10:
        return True
    n = len(values)
    middle = max(values[2 * n // 5 : 3 * n // 5])
    last = max(values[4 * n // 5 :])
    return last <= 1.25 * middle


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the kvquilt binary")
    ap.add_argument("--model", help="model argument for serve (default: the embedded default)")
    ap.add_argument("--duration", type=float, default=1800, help="seconds of traffic (default 1800)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--docs", type=int, default=300, help="distinct documents in the pool")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    a = ap.parse_args()

    port = a.port
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    data = tempfile.mkdtemp(prefix="kvquilt-soak-")
    config = os.path.join(data, "soak.toml")
    with open(config, "w") as f:
        # room for every client in the queue: a refusal (503) is not what this measures
        f.write(f"[limits]\nmax_queue = {a.concurrency * 2}\nmax_new_tokens = 16\n")
    cmd = [a.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(data, "d"), "--config", config]
    if a.model:
        cmd += ["--model", a.model]
    log = open(os.path.join(data, "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    started = time.time()
    while True:
        with open(os.path.join(data, "server.log")) as f:
            if "listening on" in f.read():
                break
        if proc.poll() is not None or time.time() - started > 600:
            print(f"server did not start; log in {data}/server.log", file=sys.stderr)
            return 2
        time.sleep(0.5)

    docs = [document(i) for i in range(a.docs)]
    deadline = time.time() + a.duration
    stats, ids, ids_lock = Stats(), set(), threading.Lock()
    latencies, samples = [], []
    threads = [threading.Thread(target=health_prober, args=(port, deadline, latencies), daemon=True)]
    threads.append(threading.Thread(target=sample_process, args=(proc.pid, port, deadline, samples), daemon=True))
    threads += [
        threading.Thread(target=worker, args=(port, deadline, stats, ids, ids_lock, docs, i), daemon=True)
        for i in range(a.concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0, deadline - time.time()) + 300)

    proc.send_signal(signal.SIGINT)
    try:
        exit_code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = "killed after 120 s"

    health = sorted(l for l, s in latencies if s == 200)
    health_bad = sum(1 for _, s in latencies if s != 200)
    p = lambda q: health[min(len(health) - 1, int(q * len(health)))] * 1e3 if health else None
    rss = [s["rss_mb"] for s in samples]
    fds = [s["fds"] for s in samples]
    total = sum(sum(v.values()) for v in stats.by_op.values())
    n5xx = sum(n for v in stats.by_op.values() for s, n in v.items() if s == "0" or int(s) >= 500)
    report = {
        "duration_s": a.duration,
        "concurrency": a.concurrency,
        "requests": total,
        "by_op": stats.by_op,
        "5xx_or_no_answer": n5xx,
        "examples_5xx": stats.errors_5xx,
        "health": {"probes": len(latencies), "failed": health_bad, "p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": p(1.0)},
        "rss_mb": {"first": rss[0] if rss else None, "max": max(rss) if rss else None, "last": rss[-1] if rss else None, "levels_off": levels_off(rss)},
        "fds": {"first": fds[0] if fds else None, "max": max(fds) if fds else None, "last": fds[-1] if fds else None, "levels_off": levels_off(fds)},
        # every sixth sample (30 s apart): RSS beside what the tiers hold
        "rss_vs_tiers": [
            {"t_s": round(s["t"] - samples[0]["t"]), "rss_mb": round(s["rss_mb"]), "tier_used_mb": {k: round(v) for k, v in s["tier_used_mb"].items()}}
            for s in samples[::6]
        ],
        "server_exit": exit_code,
        "data_dir": data,
    }
    print(json.dumps(report, indent=1))
    ok = (
        n5xx == 0
        and health_bad == 0
        and exit_code == 0
        and (p(0.99) or 0) < 50
        and report["rss_mb"]["levels_off"]
        and report["fds"]["levels_off"]
    )
    print("soak: " + ("PASS" if ok else "FAIL"), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
