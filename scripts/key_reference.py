#!/usr/bin/env python3
"""An independent implementation of kvquilt's chunk-key derivation (kvstore/src/key.rs), with
the `blake3` package from PyPI. It prints the golden vectors pinned in key.rs's tests
(`pip install blake3 && scripts/key_reference.py`).
"""
import struct

import blake3


def field(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def context(namespace: bytes, model: bytes, tokenizer: bytes, layers, kv_heads, head_dim,
            dtype_code, k_pre_rope, theta, scaling_kind=0, scaling=(0.0, 0.0, 0.0, 0.0)) -> bytes:
    h = blake3.blake3(derive_key_context="kvquilt 2026-11 key context")
    h.update(struct.pack("<I", 1) + field(namespace) + field(model) + field(tokenizer))
    h.update(struct.pack("<III", layers, kv_heads, head_dim) + bytes([dtype_code, int(k_pre_rope)]))
    h.update(struct.pack("<f", theta) + bytes([scaling_kind]) + struct.pack("<4f", *scaling))
    return h.digest()


def token_field(tokens) -> bytes:
    d = blake3.blake3(struct.pack(f"<{len(tokens)}I", *tokens), derive_key_context="kvquilt 2026-11 token ids")
    return struct.pack("<Q", len(tokens)) + d.digest()


def chunk_key(ctx: bytes, tokens) -> str:
    h = blake3.blake3(derive_key_context="kvquilt 2026-11 chunk key")
    h.update(field(ctx) + token_field(tokens))
    return h.hexdigest()


def prefix_root(ctx: bytes) -> bytes:
    return blake3.blake3(field(ctx), derive_key_context="kvquilt 2026-11 prefix root").digest()


def prefix_key(parent: bytes, tokens) -> str:
    h = blake3.blake3(derive_key_context="kvquilt 2026-11 prefix key")
    h.update(field(parent) + token_field(tokens))
    return h.hexdigest()


if __name__ == "__main__":
    c = context(b"", bytes([1] * 32), bytes([2] * 32), 30, 3, 64, 1, True, 100000.0)
    print(chunk_key(c, [504, 3575, 282, 4649, 314]))
    print(chunk_key(c, []))
    t = context(b"tenant-a", bytes([1] * 32), bytes([2] * 32), 30, 3, 64, 1, True, 100000.0)
    print(chunk_key(t, [504, 3575, 282, 4649, 314]))
    print(prefix_key(prefix_root(c), [1, 2, 3]))
