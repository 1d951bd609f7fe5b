#!/usr/bin/env python3
"""Writes model/tests/fixtures/tiny-chat: the tiny random llama of tiny-llama (its weights,
linked) with a tokenizer, so server and end-to-end tests can serve text in milliseconds.

The tokenizer is byte-level BPE with no merges: ids 0..256 are the bytes (GPT-2's byte to
character map), 256 `<|endoftext|>` (BOS), 257 `<|im_start|>`, 258 `<|im_end|>` (EOS); text
is one token per byte. Deterministic: running it again writes the same files.
"""

import json
import os
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "model" / "tests" / "fixtures"
out = root / "tiny-chat"
out.mkdir(exist_ok=True)

config = json.loads((root / "tiny-llama" / "config.json").read_text())
config["bos_token_id"] = 256
config["eos_token_id"] = 258
(out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

weights = out / "model.safetensors"
if weights.is_symlink() or weights.exists():
    weights.unlink()
os.symlink("../tiny-llama/model.safetensors", weights)

printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
chars = list(printable)
extra = 0
for b in range(256):
    if b not in printable:
        printable.append(b)
        chars.append(256 + extra)
        extra += 1
vocab = {chr(c): b for b, c in zip(printable, chars)}


def special(i, content):
    return {"id": i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


tokenizer = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [special(256, "<|endoftext|>"), special(257, "<|im_start|>"), special(258, "<|im_end|>")],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "ignore_merges": False, "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])), "merges": []},
}
(out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1) + "\n")
print(out)
