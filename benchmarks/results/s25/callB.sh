#!/usr/bin/env bash
# Call B (same warm machine as call A, engine still in /tmp): offline 128/128 fp8 with the
# issue's 30,000 requests at the default 1,024 sequences and at $SEQS (call A's best).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
S="$OUT/callB.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$S"
[ -d /tmp/llama8b-fp8 ] || timeout 200 python3 -P -m kiln.cli build llama-3.1-8b \
  --random-weights --quant fp8 -o /tmp/llama8b-fp8 --max-model-len 4096 > "$OUT/build-fp8.log" 2>&1
bench() {
  local name=$1; shift
  timeout ${T:-280} python3 -P -m kiln.cli bench "$@" --output-dir /tmp/res-$name > "$OUT/$name.log" 2>&1
  cp /tmp/res-$name/*.json "$OUT/$name.json" 2>/dev/null
  echo "== $name" | tee -a "$S"
  grep -E "^(output_tok_s|batched_steps |batched_gpu_s_|batched_preemptions|batched_cpu_below_gpu)|rror" "$OUT/$name.log" | tee -a "$S"
}
T128="throughput /tmp/llama8b-fp8 --dataset random --num-prompts 30000 --input-len 128 --output-len 128"
bench t128-30k-s${SEQS:-2048} $T128 --max-num-seqs ${SEQS:-2048} ${EXTRA:-}
[ "${BASE:-1}" = 1 ] && bench t128-30k-s1024 $T128
