#!/usr/bin/env bash
# Call A: offline 128/128 fp8 at a larger batch. TensorRT-LLM's trtllm-bench runs Llama-3.1-8B
# with batches well above kiln's offline default of 1,024 sequences; the decode GEMMs at
# M ~ 1,024 run _scaled_mm at 560-710 TFLOP/s (H200), so a larger M should fill the waves.
# A/B in one call: --max-num-seqs 1024 (default) vs 2048, then 2048 with FP8 KV; plus fp8
# batch-1 decode (not re-timed since the nineteenth session's skinny_fp8 edit).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
S="$OUT/callA.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$S"
/usr/bin/time -f "build fp8 %e s" timeout 200 python3 -P -m kiln.cli build llama-3.1-8b \
  --random-weights --quant fp8 -o /tmp/llama8b-fp8 --max-model-len 4096 > "$OUT/build-fp8.log" 2>&1
tail -n 1 "$OUT/build-fp8.log" | tee -a "$S"
bench() {  # bench NAME SUBCOMMAND ARGS...
  local name=$1; shift
  timeout ${T:-200} python3 -P -m kiln.cli bench "$@" --output-dir /tmp/res-$name > "$OUT/$name.log" 2>&1
  cp /tmp/res-$name/*.json "$OUT/$name.json" 2>/dev/null
  echo "== $name" | tee -a "$S"
  grep -E "^(output_tok_s|decode_tok_s_bs|gpu_ms_per_step_bs|num_kv_blocks|batched_gpu_ms_per_step|batched_cpu_ms_per_step|batched_cpu_below_gpu)|rror" "$OUT/$name.log" | head -12 | tee -a "$S"
}
T=100 bench lat-fp8 latency /tmp/llama8b-fp8 --batch-sizes 1 --ttft-lens 128 --new-tokens 128
N=${N:-10000}
T128="throughput /tmp/llama8b-fp8 --dataset random --num-prompts $N --input-len 128 --output-len 128"
bench t128-s1024 $T128
bench t128-s2048 $T128 --max-num-seqs 2048
bench t128-s2048-kvfp8 $T128 --max-num-seqs 2048 --kv-cache-dtype fp8
