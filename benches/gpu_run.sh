#!/usr/bin/env bash
# Runs on the GPU machine through the `device` tool (see BENCHMARKS.md for the exact calls).
# Expects the GPU build of kvquilt at .devbin/kvquilt with the harness binary beside it
# (.devbin/kvquilt-bench: `kvquilt bench` and `kvquilt eval` run it) and, for the SmolLM2
# quality runs, the default model's GGUF at $KVQ_MODEL. Writes JSON reports under $OUT.
#
#   benches/gpu_run.sh perf      # prefill vs HF transformers, blend TTFT (random 8B shape)
#   benches/gpu_run.sh gpu-path  # the GPU path (issue 12): fused attention --check and timings;
#                                # prefill/decode, reference vs fused attention, beside HF;
#                                # blend TTFT with phases and compute floor, device tier; the
#                                # same for SmolLM2-135M's shape (random weights throughout)
#   benches/gpu_run.sh needle N  # eval, needle task, N examples (SmolLM2, f32)
#   benches/gpu_run.sh musique N # eval, MuSiQue, N examples (SmolLM2, f32)
#   benches/gpu_run.sh policies N # token policies beside full KV, needle + MuSiQue, N examples
#                                # each (SmolLM2, f32); decode over compressed caches (8B shape)
#   benches/gpu_run.sh longgen N # SCOPE and decoding baselines, 1,024-token generations (SmolLM2)
#   benches/gpu_run.sh decode    # batched decoding (BENCHMARKS §9): the 8B shape at 8k and
#                                # SmolLM2's at 6k, batches of 1-16 (each checked against its
#                                # sequences' own steps), concurrent sessions alone, batched
#                                # and graphed; then the sidecar under chat completions
#                                # (needs $KVQ_MODEL), batching on vs off, full and SnapKV 4x
#   benches/gpu_run.sh ttft      # time to first token under concurrent decoding (needs
#                                # $KVQ_MODEL): streamed chat completions, decode steps
#                                # yielding to prompts (limits.decode_yield_ms 100) vs not (0)
#   benches/gpu_run.sh trace     # the RAG query stream (bench trace): costs of the 8B shape
#                                # (random weights, bf16; corpus tokenized by $KVQ_MODEL),
#                                # then a short trace of real blends, lru vs s3fifo
#   benches/gpu_run.sh trace-codecs # the same stream with 512-token chunks over a host tier
#                                # per codec (raw, int8, kivi4; decoded on the device), s3fifo
#                                # at Zipf 0.8 (~5 min on the H200: a lossy tier's replay is
#                                # ~2 min, its 24k gets each decoding a 2 MB layer on the CPU),
#                                # each codec's runs closed by the reference host tiers
#   benches/gpu_run.sh trace-real CODEC # real blends of that stream over a host tier of CODEC
#                                # (300 chunks, 160 queries, the first 80 a warm-up; raw:
#                                # 3 min on the H200), then over the corpus precomputed (the
#                                # stream's warm-store reference), one codec per call
#   benches/gpu_run.sh trace-stream CODEC / trace-ref CODEC # the same in two calls: the
#                                # stream alone, then its reference alone (--reference-only),
#                                # for streams too long for one (KVQ_QUERIES, KVQ_WARMUP)
#   benches/gpu_run.sh codecs N  # issue 13 on the GPU: codecs-kernel, then codecs-eval N
#   benches/gpu_run.sh codecs-kernel # the dequant kernel (bits vs the CPU decoder, throughput
#                                # beside a device copy and pinned PCIe); host-tier hits of the
#                                # 8B shape per codec, dequantised on the device vs on the CPU
#   benches/gpu_run.sh codecs-eval N # answer agreement of fp8/int8 beside the floor of exact
#                                # arithmetic (reference vs fused attention over the same raw
#                                # chunks), N examples per task (SmolLM2, bf16)
#   benches/gpu_run.sh qzero     # ranking before layer 0 beside the default's ranking (8B and
#                                # SmolLM2 shapes, device tier), then `calibrate --variant
#                                # qzero` in bf16 (needs $KVQ_MODEL)
#   benches/gpu_run.sh sidecar   # the sidecar on CUDA (needs $KVQ_MODEL): `serve --device
#                                # cuda`, then benches/sidecar_smoke.py against it; the
#                                # server's log in $OUT/serve.log (KVQ_DEVICE=cpu: the same
#                                # on the CPU)
#   benches/gpu_run.sh cpu TASK FIRST END STEP
#                                # the same eval on the host's CPU, examples FIRST..END in
#                                # parts of STEP (one JSON each, merged by merge_eval.py);
#                                # starts no part after KVQ_DEADLINE_S seconds (default 480)
#                                # and skips parts already in $OUT (a run can resume)
# KVQ_HOST_CAPACITY sets the trace steps' host tier (fractions of the corpus; default 0.2).
# KVQ_BIN overrides the binary (e.g. a CPU build when the cpu step runs on another machine).
# KVQ_VARIANTS and KVQ_RATIOS override the blend variants and ratios of the eval steps.
set -euo pipefail
: "${OUT:?set by the device tool}"
# the GPU binaries are ~70 MB each stripped, over the device tool's 64 MiB carry: carry them
# compressed (.devbin/kvquilt-bench.xz, `xz -9`: 13 MB; or .gz: 24 MB) and unpack them here.
# With the default model's GGUF (98 MB; 90 MB as `xz -9`, split in two with `split -b 55000000`)
# a session needs two calls within the machine's 30 s warm window: the first carries part one
# and moves it to an ignored folder (.devkeep/), the second carries part two and the harness,
# joins them (`cat … | xz -d > .devkeep/smol.gguf`) and runs a step with KVQ_MODEL set.
for f in .devbin/*.gz .devbin/*.xz; do
  [ -e "$f" ] || continue
  case "$f" in
    *.gz) gunzip -f "$f" ;;
    *.xz) xz -d -f "$f" ;;
  esac
  chmod +x "${f%.*}"
done
bin=${KVQ_BIN:-.devbin/kvquilt}
bench=${KVQ_BENCH:-.devbin/kvquilt-bench}
variants=${KVQ_VARIANTS:-cacheblend,starts,kv,gradual,perchunk}
ratios=${KVQ_RATIOS:-0.05,0.15,0.3}
case "${1:-perf}" in
  sidecar)
    data=$(mktemp -d)
    "$bin" serve --device "${KVQ_DEVICE:-cuda}" --model "${KVQ_MODEL:?}" --listen 127.0.0.1:8077 \
      --data-dir "$data" > "$OUT/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 120); do
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8077/health', timeout=1)" \
        2>/dev/null && break
      sleep 1
    done
    rc=0
    python3 benches/sidecar_smoke.py http://127.0.0.1:8077 | tee "$OUT/sidecar_smoke.txt" || rc=$?
    kill -INT "$pid"; wait "$pid" || true
    exit "$rc"
    ;;
  trace)
    "$bench" trace --random llama3.1-8b --device cuda --model "$KVQ_MODEL" \
      --json "$OUT/trace_8b.json"
    "$bench" trace --random llama3.1-8b --device cuda --model "$KVQ_MODEL" --real \
      --corpus-limit 600 --queries 480 --warmup 160 --window 80 --zipf 0.8 \
      --policies lru,s3fifo --hit-threads 1 --json "$OUT/trace_8b_real.json"
    ;;
  trace-codecs)
    "$bench" trace --random llama3.1-8b --device cuda --model "$KVQ_MODEL" --chunk-tokens 512 \
      --policies s3fifo --zipf 0.8 --host-codecs raw,int8,kivi4 --repeats 3 --hit-threads 1 \
      --host-capacity "${KVQ_HOST_CAPACITY:-0.2}" \
      --json "$OUT/trace_8b_codecs.json" 2> "$OUT/trace_8b_codecs.log"
    ;;
  trace-real|trace-stream|trace-ref)
    case "$1" in
      trace-real) which=(--reference) ;;
      trace-stream) which=() ;;
      trace-ref) which=(--reference-only) ;;
    esac
    "$bench" trace --random llama3.1-8b --device cuda --model "$KVQ_MODEL" --chunk-tokens 512 \
      --real --corpus-limit 300 --queries "${KVQ_QUERIES:-160}" --warmup "${KVQ_WARMUP:-80}" \
      --window 40 --zipf 0.8 --policies s3fifo --host-codecs "${2:?codec}" --repeats 3 \
      --hit-threads 1 "${which[@]}" --host-capacity "${KVQ_HOST_CAPACITY:-0.2}" \
      --json "$OUT/${1}_8b_$2.json" 2> "$OUT/${1}_8b_$2.log"
    ;;
  decode)
    "$bench" decode --random llama3.1-8b --device cuda --policy snapkv --compression 4 \
      --context 8192 --steps 32 --repeats 3 --batch 1,4,8,16 --sessions 4,8 \
      --json "$OUT/decode_8b.json"
    "$bench" decode --random smollm2-135m --device cuda --policy snapkv --compression 4 \
      --context 6000 --steps 64 --repeats 3 --batch 1,8 --sessions 1,2,4,8 \
      --json "$OUT/decode_smollm2.json"
    printf '[limits]\n' > "$OUT/batching_on.toml"
    printf '[limits]\ndecode_batch = 0\n' > "$OUT/batching_off.toml"
    for cfg in on off; do
      for compress in none snapkv:4; do
        extra=(); [[ $compress != none ]] && extra=(--compress "$compress")
        "$bench" load --concurrency 1,4,8 --lookup-s 0.2 --blend-s 0.2 --completion-s 12 \
          --max-tokens 128 --chunks-per-blend 16 --workers 8 "${extra[@]}" \
          --serve-arg=--config --serve-arg="$OUT/batching_$cfg.toml" --serve-arg=--device \
          --serve-arg=cuda --serve-arg=--model --serve-arg="${KVQ_MODEL:?}" \
          --out "$OUT/load_${cfg}_${compress/:/}.json"
      done
    done
    ;;
  ttft)
    for y in 100 0; do
      printf '[limits]\ndecode_yield_ms = %s\n' "$y" > "$OUT/yield_$y.toml"
      for compress in none snapkv:4; do
        extra=(); [[ $compress != none ]] && extra=(--compress "$compress")
        "$bench" load --concurrency 1,4,8 --lookup-s 0.1 --blend-s 0.1 --completion-s 10 \
          --max-tokens 128 --chunks-per-blend 16 --workers 8 --stream "${extra[@]}" \
          --serve-arg=--config --serve-arg="$OUT/yield_$y.toml" --serve-arg=--device \
          --serve-arg=cuda --serve-arg=--model --serve-arg="${KVQ_MODEL:?}" \
          --out "$OUT/ttft_yield${y}_${compress/:/}.json"
      done
    done
    ;;
  codecs)
    bash "$0" codecs-kernel
    bash "$0" codecs-eval "${2:-30}"
    ;;
  codecs-kernel)
    # (fp8 has zero points since 2026-12-05; fp8sym is the per-head form measured before: the
    # codec run checks both against the CPU decoder bit for bit, on real layers and the 8B shape)
    "$bench" codec --model "$KVQ_MODEL" --device cuda --codecs fp8,fp8sym,int8 --cold-codecs "" \
      --json "$OUT/codec_device.json"
    "$bench" blend --random llama3.1-8b --device cuda --chunks 10 --chunk-tokens 512 \
      --ratios 0.15 --host-codecs raw,int8,fp8,fp8sym --phases --repeats 7 --json "$OUT/blend_codecs.json"
    "$bench" blend --random llama3.1-8b --device cuda --chunks 10 --chunk-tokens 512 \
      --ratios 0.15 --host-codecs raw,int8,fp8,fp8sym --decode-in-store --phases --repeats 7 \
      --json "$OUT/blend_codecs_cpu_decode.json"
    ;;
  codecs-eval)
    for task in needle musique; do
      for att in fused reference; do
        "$bench" eval --model "$KVQ_MODEL" --device cuda --attention "$att" --task "$task" \
          --limit "${2:-30}" --modes full,reuse,blend --variants kvquilt --ratios 0.3 \
          --codecs fp8,fp8sym,int8 --json "$OUT/eval_${task}_${att}.json"
      done
    done
    ;;
  qzero)
    # ranking before layer 0 (BENCHMARKS §12 "Ranking before layer 0"): TTFT beside the
    # default's ranking on both shapes (device tier, phases), then the bf16 calibration of
    # the default model with it (the record that would replace blend/calibrations/33f5cf6b…)
    "$bench" blend --random llama3.1-8b --device cuda --chunks 10 --chunk-tokens 512 \
      --ratios 0.15,0.3 --variants query,qzero --device-tier --phases --repeats 7 --rounds \
      --json "$OUT/blend_qzero_8b.json"
    "$bench" blend --random smollm2-135m --device cuda --chunks 12 --chunk-tokens 512 \
      --ratios 0.15,0.3 --variants query,qzero --device-tier --phases --repeats 10 --rounds \
      --json "$OUT/blend_qzero_smol.json"
    "$bench" calibrate --model "$KVQ_MODEL" --device cuda --variant qzero --out "$OUT"
    ;;
  perf)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
    "$bin" bench model --random llama3.1-8b --device cuda --tokens 4096 --decode 32 \
      --decode-context 4096 --repeats 5 --json "$OUT/prefill_ours.json"
    python3 benches/hf_prefill.py --tokens 4096 --repeats 5 --decode 32 --decode-context 4096 \
      --json "$OUT/prefill_hf.json"
    "$bin" bench blend --random llama3.1-8b --device cuda --chunks 10 --chunk-tokens 512 \
      --ratios 0.05,0.15,0.3 --repeats 5 --json "$OUT/blend_8b.json"
    ;;
  gpu-path)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    # the kernel's test (exit status 1 on a mismatch) and its timings
    "$bench" attention --check --shapes prefill4096,prefill8192,blend5216r15,decode4096,suffix5216 \
      --json "$OUT/attention.json" 2>&1 | grep -v '^ok ' || echo "attention: check FAILED"
    # Llama-3.1-8B shape: prefill and decode, reference vs fused attention, beside HF
    for k in reference fused; do
      KVQ_ATTENTION=$k "$bench" model --random llama3.1-8b --device cuda --tokens 4096,8192 \
        --decode 32 --decode-context 4096 --repeats 3 --json "$OUT/model_8b_$k.json" || echo "model $k failed"
    done
    python3 benches/hf_prefill.py --tokens 4096 5216 8192 --repeats 3 --decode 32 \
      --decode-context 4096 --json "$OUT/hf_8b.json" || echo "hf 8b failed"
    "$bench" upload --device cuda --json "$OUT/upload.json" || echo "upload failed"
    "$bench" blend --random llama3.1-8b --device cuda --chunks 10 --chunk-tokens 512 \
      --ratios 0.15,0.3 --variants cacheblend,query --device-tier --phases --repeats 5 \
      --json "$OUT/blend_8b.json" || echo "blend 8b failed"
    # the default model's shape (SmolLM2-135M), bf16, a 6,240-token RAG prompt
    python3 benches/hf_prefill.py --shape smollm2-135m --tokens 6240 --repeats 5 --decode 32 \
      --decode-context 4096 --json "$OUT/hf_small.json" || echo "hf small failed"
    "$bench" blend --random smollm2-135m --device cuda --chunks 12 --chunk-tokens 512 \
      --ratios 0.15,0.3 --variants cacheblend,query --device-tier --eager-too --phases \
      --repeats 5 --json "$OUT/blend_small.json" || echo "blend small failed"
    # short passes replayed as CUDA graphs: bit-equality with the eager pass (exit status 1
    # on a mismatch), at the exact capacity and at the engine's pooled one (rounded up to
    # 1,024 rows), then their speed (question and decode)
    for r in 32 1; do
      "$bench" graph --check --rows "$r" --json "$OUT/graph_small_$r.json" || echo "graph check FAILED"
    done
    "$bench" graph --check --capacity 7168 --json "$OUT/graph_small_pooled.json" \
      || echo "graph check FAILED"
    "$bench" graph --check --shape llama3.1-8b --keys 5184 --repeats 5 \
      --json "$OUT/graph_8b.json" || echo "graph check FAILED"
    # what the host pays per op of one SmolLM2-shape layer (a question pass, blend's recompute)
    "$bench" ops --rows 32 --json "$OUT/ops_small_32.json" || echo "ops failed"
    "$bench" ops --rows 931 --json "$OUT/ops_small_931.json" || echo "ops failed"
    ;;
  needle|musique)
    "$bin" eval --model "${KVQ_MODEL:?}" --device cuda --dtype f32 --task "$1" --limit "${2:-30}" \
      --modes full,reuse,blend --ratios "$ratios" --variants "$variants" \
      --json "$OUT/eval_$1.json" | tee "$OUT/eval_$1.md"
    ;;
  policies)
    # token policies (issue 14): needle and MuSiQue on SmolLM2 (f32), one observed prefill per
    # example and awareness; decode over compressed caches on the 8B shape at 8k context
    for task in needle musique; do
      "$bench" eval --model "${KVQ_MODEL:?}" --device cuda --dtype f32 --task "$task" \
        --limit "${2:-30}" --policies "${KVQ_POLICIES:-full,streaming,h2o,snapkv,sage}" \
        --compression 2,4,8 --query-aware yes,no --json "$OUT/policies_$task.json" \
        > "$OUT/policies_$task.md" || echo "policies $task failed"
    done
    "$bench" decode --random llama3.1-8b --device cuda --policy snapkv --compression 2,4,8 \
      --context 8192 --steps 32 --repeats 3 --json "$OUT/decode_8b.json" || echo "decode 8b failed"
    ;;
  longgen)
    # decode-time eviction (SCOPE, H2O, StreamingLLM decoding) on long generations (issue 14)
    "$bench" eval --model "${KVQ_MODEL:?}" --device cuda --dtype f32 --task longgen \
      --limit "${2:-3}" --passages 5 --new-tokens 1024 --decode-pool 0.25,0.125 \
      --policies scope-slide,scope-adaptive,scope-discontinuous,h2o,streaming \
      --json "$OUT/longgen.json" > "$OUT/longgen.md"
    ;;
  cpu)
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread)' > "$OUT/cpu.txt"
    task=${2:?task}; first=${3:?first}; end=${4:?end}; step=${5:?step}
    for ((s = first; s < end; s += step)); do
      if [[ -s "$OUT/eval_${task}_cpu_$s.json" ]]; then continue; fi
      if ((SECONDS > ${KVQ_DEADLINE_S:-480})); then echo "deadline: next part starts at $s"; break; fi
      "$bin" eval --model "${KVQ_MODEL:?}" --device cpu --task "$task" --skip "$s" \
        --limit "$((step < end - s ? step : end - s))" --modes full,reuse,blend \
        --ratios "$ratios" --variants "$variants" --json "$OUT/eval_${task}_cpu_$s.json" \
        > "$OUT/eval_${task}_cpu_$s.md"
      echo "part $s done at ${SECONDS}s"
    done
    ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
