#!/usr/bin/env python3
"""Reference outputs from HF transformers, an implementation nobody on this project wrote.

Writes the fixtures that `model/tests/hf_agreement.rs` compares kvquilt's forward pass with:

* `hf_smollm2.json`: the real SmolLM2-135M-Instruct GGUF, loaded by transformers with
  `gguf_file=` in float32; for each prompt, the token ids, the last token's top-20 logits and
  16 greedy tokens (no early stop at EOS). Also the ids under SmolLM2's original
  pre-tokenizer (see `smollm2()`), which kvquilt's tokenizer follows.
* `tiny-qwen2/` and `tiny-llama/`: tiny random models saved with `save_pretrained`
  (Qwen2 with QKV bias and a GQA ratio of 8; Llama with tied embeddings and llama3 RoPE
  scaling), and `hf_tiny_qwen2.json` / `hf_tiny_llama.json` with the same outputs for fixed
  random token ids, plus layer 1's post-RoPE keys of one prompt (to pin where RoPE applies).

Usage (needs torch, transformers, accelerate, gguf, numpy, safetensors; see scripts/oracle-venv):
    scripts/hf_reference.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out model/tests/fixtures
"""
import argparse
import copy
import hashlib
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TOP = 20
GREEDY = 16
HERE = os.path.dirname(os.path.abspath(__file__))


def greedy_run(model, ids):
    """Last-token top-20 logits and 16 greedy tokens after prefilling `ids`."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0, -1].float()
        vals, idx = torch.topk(logits, TOP)
        top = [[int(i), float(v)] for i, v in zip(idx, vals)]
        pkv = out.past_key_values
        greedy, margins = [], []
        for _ in range(GREEDY):
            two = torch.topk(logits, 2).values
            margins.append(float(two[0] - two[1]))
            tok = int(torch.argmax(logits))
            greedy.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            logits = out.logits[0, -1].float()
    return top, greedy, min(margins), out


def musique_prompts():
    with open(os.path.join(HERE, "..", "data", "musique_dev.json")) as f:
        ex = json.load(f)
    def passages(e, n):
        return "".join(f"{c['title']}\n\n{c['text']}\n\n" for c in e["ctxs"][:n])
    mid = ex[1]
    long = ex[2]
    return [
        ("passage_500", False, passages(mid, 1) + f"Question: {mid['question']}\nAnswer:"),
        ("rag_2000", True, passages(long, 3) + f"Answer within 5 words. Question: {long['question']}"),
    ]


def smollm2(gguf_path, out_dir):
    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    # transformers' GGUF converter gives SmolLM2 a plain byte-level pre-tokenizer; the model's
    # own tokenizer.json (and llama.cpp's `smollm` pre-type) split digits one by one first. They
    # differ where a run of whitespace precedes a digit. Record ids under the original rule too,
    # computed by HF `tokenizers` with the original pre-tokenizer swapped in.
    from tokenizers import pre_tokenizers
    orig = copy.deepcopy(tok.backend_tokenizer)
    orig.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    prompts = [
        ("capital_raw", False, "The capital of France is"),
        ("capital_chat", True, "What is the capital of France?"),
        ("digits_unicode", False, "In 1889, the Eiffel Tower (324 m) opened; café prices were 0.25 francs — über cheap!\n\tNext line:"),
    ] + musique_prompts()
    rows = []
    for pname, chat, text in prompts:
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        top, greedy, margin, _ = greedy_run(model, ids)
        orig_ids = orig.encode(text, add_special_tokens=False).ids
        rows.append({"name": pname, "text": text, "input_ids": ids, "input_ids_original_pretokenizer": orig_ids,
                     "top_logits": top,
                     "greedy": greedy, "min_greedy_margin": margin})
        print(f"{pname}: {len(ids)} tokens, greedy {tok.decode(greedy)!r}, min margin {margin:.4f}")
    with open(gguf_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    write(os.path.join(out_dir, "hf_smollm2.json"), {
        "model": name, "model_sha256": sha, "dtype": "float32", **versions(), "prompts": rows})


def tiny(kind, out_dir):
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=4096,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            initializer_range=0.08, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_theta=10_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.08,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
        cls = transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    if kind == "qwen2":  # random (non-zero) biases, so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    mdir = os.path.join(out_dir, f"tiny-{kind}")
    model.save_pretrained(mdir, safe_serialization=True)
    model = cls.from_pretrained(mdir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (5, 40, 300, 1500):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
        top, greedy, margin, _ = greedy_run(model, ids)
        row = {"name": f"random_{n}", "input_ids": ids, "top_logits": top, "greedy": greedy,
               "min_greedy_margin": margin}
        if n == 40:
            with torch.no_grad():
                pkv = model(torch.tensor([ids]), use_cache=True).past_key_values
            keys = pkv.layers[1].keys[0]  # [kv_heads, T, head_dim], post-RoPE
            row["layer1_keys_post_rope"] = keys.permute(1, 0, 2).tolist()  # [T, kv_heads, d]
        rows.append(row)
        print(f"tiny-{kind} random_{n}: min greedy margin {margin:.4f}")
    write(os.path.join(out_dir, f"hf_tiny_{kind}.json"), {
        "model": f"tiny-{kind}", "dtype": "float32", **versions(), "prompts": rows})


def versions():
    return {"transformers": transformers.__version__, "torch": torch.__version__}


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "model", "tests", "fixtures"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    tiny("qwen2", a.out)
    tiny("llama", a.out)
    smollm2(a.gguf, a.out)


if __name__ == "__main__":
    main()
