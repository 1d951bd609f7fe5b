#!/usr/bin/env python3
"""An independent implementation of kvquilt's chunk-key derivation (kvstore/src/key.rs), with
the `blake3` package from PyPI. It reproduces the golden vector pinned in key.rs's tests:

    pip install blake3 && scripts/key_reference.py
    3d76b1c5d10d1a5b4bc40c877c95d0884b4733f656bb1de21caa7d779811bc3e
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


def chunk_key(ctx: bytes, tokens) -> str:
    h = blake3.blake3(derive_key_context="kvquilt 2026-11 chunk key")
    h.update(field(ctx) + struct.pack("<Q", len(tokens)) + struct.pack(f"<{len(tokens)}I", *tokens))
    return h.hexdigest()


if __name__ == "__main__":
    c = context(b"", bytes([1] * 32), bytes([2] * 32), 30, 3, 64, 1, True, 100000.0)
    print(chunk_key(c, [504, 3575, 282, 4649, 314]))
