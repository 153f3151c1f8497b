#!/usr/bin/env bash
# For the next session with a device (H200 for the issue's figures): the int8 kernels' GPU
# tests (groups of 16 are new), then offline 128/128 fp8 with
# the 30,000 requests, this session's tree (offline batch frozen for the run, graph /
# eager steps timed apart) against the base f11052e (in .ab-base: `git archive f11052e kiln`),
# then fp8 batch-1 decode. Carry .whl and .ab-base.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
S="$OUT/next.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$S"
PART=${1:-all}  # "a": tests + this tree; "b": base + latency (one call each, < 600 s)
if [ "$PART" != b ]; then
# This session's GPU-untested path first: int8 groups of 16 (GGUF Q6_K) on every int8 kernel.
PYTHONPATH="$PWD:/tmp/site" timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/gpu/test_quant_gpu.py tests/kernels/test_int_gemv.py tests/kernels/test_int_gemm.py \
  tests/kernels/test_quant_kernels.py > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$S"
fi
[ -d /tmp/llama8b-fp8 ] || \
PYTHONPATH="$PWD:/tmp/site" timeout 200 python3 -P -m kiln.cli build llama-3.1-8b \
  --random-weights --quant fp8 -o /tmp/llama8b-fp8 --max-model-len 4096 > "$OUT/build-fp8.log" 2>&1
bench() {  # bench NAME ROOT SUBCOMMAND ARGS...
  local name=$1 root=$2; shift 2
  PYTHONPATH="$root:/tmp/site" timeout ${T:-280} python3 -P -m kiln.cli bench "$@" \
    --output-dir /tmp/res-$name > "$OUT/$name.log" 2>&1
  cp /tmp/res-$name/*.json "$OUT/$name.json" 2>/dev/null
  echo "== $name" | tee -a "$S"
  grep -E "^(output_tok_s|decode_tok_s_bs|batched_(seconds|gpu_ms_per_step|cpu_ms_per_step|graph_|eager_|cpu_below))|rror" \
    "$OUT/$name.log" | tee -a "$S"
}
T128="throughput /tmp/llama8b-fp8 --dataset random --num-prompts 30000 --input-len 128 --output-len 128"
[ "$PART" != b ] && bench t128-30k-new "$PWD" $T128
[ "$PART" = a ] && exit 0
bench t128-30k-base "$PWD/.ab-base" $T128
T=100 bench lat-fp8 "$PWD" latency /tmp/llama8b-fp8 --batch-sizes 1 --ttft-lens 128 8192 --new-tokens 128
