#!/usr/bin/env python3
"""Prefill and decode timing of HF transformers on a random-weight model of Llama-3.1-8B's
(or, with --shape smollm2-135m, SmolLM2-135M's) shape (bf16, attn_implementation="sdpa"): the baseline `kvquilt bench model --random
llama3.1-8b --device cuda` is compared with, on the same machine in the same run.

Weights are random (performance does not depend on their values). Prefill computes the
last token's logits only (`logits_to_keep=1`), as kvquilt does.

    python3 benches/hf_prefill.py --tokens 4096 --repeats 5 --json OUT.json
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def llama31_8b():
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        attn_implementation="sdpa")


def smollm2_135m():
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")


SHAPES = {"llama3.1-8b": llama31_8b, "smollm2-135m": smollm2_135m}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3.1-8b")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        config = SHAPES[a.shape]()
        model = LlamaForCausalLM(config).eval()
    vocab = config.vocab_size
    sync = torch.cuda.synchronize
    rows = []
    with torch.no_grad():
        for n in a.tokens:
            ids = torch.randint(0, vocab, (1, n), device="cuda")
            model(ids, use_cache=True, logits_to_keep=1)  # warm-up
            sync()
            runs = []
            for _ in range(a.repeats):
                sync()
                t = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                sync()
                runs.append(time.perf_counter() - t)
            med = statistics.median(runs)
            rows.append({"tokens": n, "median_s": med, "tokens_per_s": n / med, "runs_s": runs})
            print(f"HF prefill {n} tokens: median {med * 1e3:.1f} ms, {n / med:.0f} tokens/s", flush=True)
        ctx = torch.randint(0, vocab, (1, a.decode_context), device="cuda")
        decode_runs = []
        for rep in range(a.repeats + 1):
            out = model(ctx, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            tok = torch.randint(0, vocab, (1, 1), device="cuda")
            sync()
            t = time.perf_counter()
            for _ in range(a.decode):
                out = model(tok, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
            sync()
            if rep > 0:
                decode_runs.append(time.perf_counter() - t)
        dtps = a.decode / statistics.median(decode_runs)
        print(f"HF decode after {a.decode_context} tokens: {dtps:.1f} tokens/s", flush=True)
    report = {"implementation": f"transformers {transformers.__version__} (sdpa), torch {torch.__version__}",
              "model": f"random weights, {a.shape} shape", "dtype": "bf16",
              "device": torch.cuda.get_device_name(0), "prefill": rows,
              "decode_context": a.decode_context, "decode_steps": a.decode, "decode_tokens_per_s_median": dtps}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
