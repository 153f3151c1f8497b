#!/usr/bin/env bash
# Call B (issue 11, twenty-third device session): int8 group scales in int_gemm (65-128 rows).
# GPU tests of the change; per linear at groups of 64 (1 / 96 / 128 rows: int_gemv against
# the Gluon twin at one row, int_gemm against dequantise + cuBLAS above 64); end to end on
# random Llama-3.1-8B int8-wo --group-size 64 (and per channel): base = main's kiln/ (carried
# as .ab-base), new = this tree, new-b1 = this tree with one-row linears of groups ≤ 128 on
# the Gluon twin (BATCH1_MAX_GROUP 32 → 128).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/callB.txt"
for name in int8-wo-g64 int8-wo; do
  groups=""; [ "$name" = int8-wo-g64 ] && groups="--group-size 64"
  timeout 200 python3 -P -m kiln.cli build llama-3.1-8b --random-weights --quant int8-wo $groups \
    -o /tmp/llama8b-$name --max-model-len 16384 > "$OUT/build-$name.log" 2>&1 &
done
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_int_gemm.py \
  tests/gpu/test_quant_gpu.py -k "int8 or int_gemm or default_config" > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$OUT/callB.txt"
wait
tail -1 "$OUT"/build-*.log | tee -a "$OUT/callB.txt"
timeout 150 python3 benchmarks/skinny_int8_bench.py "$OUT" --group-size 64 --rows 1 96 128 \
  > "$OUT/bench-g64.log" 2>&1
grep -vE "^\s*$" "$OUT/bench-g64.log" | tail -40 | tee -a "$OUT/callB.txt"
mkdir -p /tmp/ab-b1 && cp -r kiln /tmp/ab-b1/ && \
  sed -i 's/^BATCH1_MAX_GROUP = 32$/BATCH1_MAX_GROUP = 128/' /tmp/ab-b1/kiln/kernels/skinny_int8.py
grep -c "BATCH1_MAX_GROUP = 128" /tmp/ab-b1/kiln/kernels/skinny_int8.py | tee -a "$OUT/callB.txt"
run() {  # run NAME ROOT ENGINE BATCHES
  ( export PYTHONPATH="$2:/tmp/site"
    timeout 120 python3 -P -m kiln.cli bench latency /tmp/llama8b-$3 --batch-sizes $4 \
      --ttft-lens 128 --new-tokens 128 --output-dir /tmp/res-$1 > "$OUT/lat-$1.log" 2>&1 )
  cp /tmp/res-$1/*.json "$OUT/lat-$1.json" 2>/dev/null
  echo "== $1" | tee -a "$OUT/callB.txt"
  grep -E "^(decode_tok_s_bs|gpu_ms_per_step_bs|ttft_ms_128)|rror" "$OUT/lat-$1.log" | tee -a "$OUT/callB.txt"
}
run g64-base "$PWD/.ab-base" int8-wo-g64 "1 96 128"
run g64-new "$PWD" int8-wo-g64 "1 96 128"
run g64-new-b1 /tmp/ab-b1 int8-wo-g64 "1"
run g64-base-2 "$PWD/.ab-base" int8-wo-g64 "1"
run pc-base "$PWD/.ab-base" int8-wo "1 128"
run pc-new "$PWD" int8-wo "1 128"
true
