#!/usr/bin/env bash
# A/B on one GPU machine: the working tree ("new") against a base checkout carried in
# .ab-base/ (git archive of the base commit, ignored by git), alternating on the same card,
# on one random Llama-3.1-8B engine built by the BASE code (so the new code also proves it
# loads engines written before it). Results: $OUT/<step>-<base|new>.json and $OUT/ab.txt.
# Usage on the GPU machine: bash benchmarks/ab_run.sh [tests|build|latency|t128|t2048]...
# (make the base here: mkdir .ab-base && git archive BASE | tar -x -C .ab-base; carry .ab-base
#  and .whl with the call)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
engine=/tmp/llama8b
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a "$OUT/ab.txt"
kiln() {  # kiln VARIANT ARGS...: the CLI of the base or the new tree
  local root=$PWD
  [ "$1" = base ] && root=$PWD/.ab-base
  shift
  PYTHONPATH="$root:/tmp/site" python3 -P -m kiln.cli "$@"  # -P: not the cwd first
}
bench() {  # bench STEP VARIANT ARGS...: one bench run; its JSON becomes $OUT/STEP-VARIANT.json
  local step=$1 variant=$2 dir="/tmp/results-$1-$2"
  shift 2
  rm -rf "$dir"
  kiln "$variant" bench "$@" --output-dir "$dir" > "/tmp/$step-$variant.log" 2>&1
  cp "$dir"/*.json "$OUT/$step-$variant.json" 2>/dev/null
  echo "== $step $variant" | tee -a "$OUT/ab.txt"
  grep -E "^(output_tok_s|bs1_decode_tok_s|bs1_pct_of_copy|batched_num_preemptions|batched_triton_compiles|startup_s|bs1_gpu_ms_per_step|bs1_cpu_ms_per_step|batched_gpu_ms_per_step|batched_cpu_ms_per_step)|Error|error" \
    "/tmp/$step-$variant.log" | tee -a "$OUT/ab.txt"
}
for step in "$@"; do
  case $step in
    tests)
      PYTHONPATH="$PWD:/tmp/site" timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider \
        ${GPU_TESTS:-tests/gpu} > "$OUT/gpu_tests.log" 2>&1
      tail -25 "$OUT/gpu_tests.log" ;;
    build)
      [ -f $engine/engine.json ] || /usr/bin/time -f "build %e s, %M KB" \
        bash -c "PYTHONPATH=$PWD/.ab-base:/tmp/site python3 -P -m kiln.cli build llama-3.1-8b --random-weights -o $engine --max-model-len 16384" 2>&1 | tail -2 | tee -a "$OUT/ab.txt" ;;
    latency)
      for variant in base new; do
        bench latency $variant latency $engine --batch-sizes 1 --ttft-lens 128 --new-tokens 200
      done ;;
    t128)
      for variant in ${T128_ORDER:-base new}; do
        bench t128 $variant throughput $engine --dataset random --num-prompts ${T128_PROMPTS:-3000} --input-len 128 --output-len 128
      done ;;
    t2048)
      for variant in ${T2048_ORDER:-base new}; do
        bench t2048 $variant throughput $engine --dataset random --num-prompts 500 --input-len 2048 --output-len 2048
      done ;;
  esac
done
