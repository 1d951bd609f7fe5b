#!/usr/bin/env python3
"""An independent re-derivation of kvquilt's sentence embedder (model/src/embed.rs), in numpy.

Reads all-MiniLM-L6-v2 from a folder holding model.safetensors, tokenizer.json and
config.json (what `kvquilt` fetches into <cache>/models/all-minilm-l6-v2), runs BERT's
encoder as HF transformers defines it (post-LayerNorm, erf GELU, bidirectional attention),
mean-pools the last hidden states and L2-normalises, as sentence-transformers does for this
model (max 256 tokens). Prints the values model/tests/embed.rs pins.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install numpy tokenizers
    /tmp/v/bin/python scripts/minilm_reference.py ~/.cache/kvquilt/models/all-minilm-l6-v2
"""

import json
import math
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

SENTENCES = [
    "The Eiffel Tower is in Paris.",
    "Paris is home to the Eiffel Tower, a wrought-iron lattice tower.",
    "User said, \"My cat Miso refuses to eat dry food.\"",
]


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(meta["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def embed(w, cfg, ids):
    n = len(ids)
    eps = cfg["layer_norm_eps"]
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda t, name: t @ w[p + name + ".weight"].T + w[p + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        a = layer_norm(
            lin(ctx, "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        f = lin(gelu(lin(a, "intermediate.dense")), "output.dense")
        x = layer_norm(f + a, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    m = x.mean(0)
    return m / np.linalg.norm(m)


def main():
    folder = sys.argv[1]
    cfg = json.load(open(f"{folder}/config.json"))
    w = load_safetensors(f"{folder}/model.safetensors")
    tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(256)
    vecs = []
    for s in SENTENCES:
        ids = tok.encode(s).ids
        v = embed(w, cfg, ids)
        vecs.append(v)
        print(f"{s!r}: ids {ids}")
        print("  first 6:", ", ".join(f"{x:.6f}" for x in v[:6]))
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            print(f"cos({i},{j}) = {float(vecs[i] @ vecs[j]):.6f}")


if __name__ == "__main__":
    main()
