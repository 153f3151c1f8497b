#!/usr/bin/env bash
# One device call: install carried wheels, GPU tests, build a random Llama-3.1-8B engine,
# latency (with the transformers peer) and throughput benchmarks. Results land in $OUT.
# Usage on the GPU machine: bash benchmarks/gpu_run.sh [tests|latency|throughput]...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
kiln() { python3 -m kiln.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
engine=/tmp/llama8b
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests build latency throughput)
for step in "${steps[@]}"; do
  case $step in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    build)
      [ -f $engine/engine.json ] || /usr/bin/time -f "build %e s, %M KB" python3 -m kiln.cli build llama-3.1-8b --random-weights -o $engine --max-model-len 16384 2>&1 | tail -2 ;;
    latency)
      timeout ${LATENCY_TIMEOUT:-420} python3 -m kiln.cli bench latency $engine --hf-peer --plot --batch-sizes 1 8 32 64 128 256 \
        --ttft-lens 128 512 2048 8192 --output-dir "$OUT" 2>&1 | tee "$OUT/latency.log" | tail -40 ;;
    throughput)
      timeout ${THROUGHPUT_TIMEOUT:-300} python3 -m kiln.cli bench throughput $engine --dataset random --num-prompts ${THROUGHPUT_PROMPTS:-1000} \
        --input-len ${INPUT_LEN:-128} --output-len ${OUTPUT_LEN:-128} --output-dir "$OUT" 2>&1 | tee "$OUT/throughput.log" | tail -12 ;;
  esac
done
