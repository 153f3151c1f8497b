#!/usr/bin/env bash
# Call A: int_gemv reads weights as denormal floats (one LOP3 a weight, no subtraction).
# GPU tests of the change (and of next/int8-groups-triton under it), the one-row kernel A/B
# (base = main's kiln/ in .ab-base) with a tiling grid for the new kernel, and random
# Llama-3.1-8B int8-wo / int4-wo batch-1 decode base vs new (int4: the Gluon twin on
# the three large linears as on main, or int_gemv on all four).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
S="$OUT/callA.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$S"
for q in int8-wo int4-wo; do
  ( PYTHONPATH="$PWD:/tmp/site" timeout 200 python3 -P -m kiln.cli build llama-3.1-8b \
      --random-weights --quant $q -o /tmp/llama8b-$q --max-model-len 4096 > "$OUT/build-$q.log" 2>&1 ) &
done
PYTHONPATH="$PWD:/tmp/site" timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_int_gemv.py tests/kernels/test_skinny_int8.py \
  > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$S"
grep -E "^FAILED" "$OUT/gpu_tests.log" | head -10 | tee -a "$S"
wait
for q in int8-wo int4-wo; do tail -n 1 "$OUT/build-$q.log" | tee -a "$S"; done
TILINGS="8x128x2 16x128x4 32x128x4 32x64x4 64x32x2 32x32x2 16x64x4"
PYTHONPATH="$PWD/.ab-base:/tmp/site" timeout 120 python3 benchmarks/int_gemv_ab.py "$OUT" \
  --label base > "$OUT/ab-base.log" 2>&1
PYTHONPATH="$PWD:/tmp/site" timeout 200 python3 benchmarks/int_gemv_ab.py "$OUT" \
  --label new --tilings $TILINGS > "$OUT/ab-new.log" 2>&1
echo "== base" | tee -a "$S"; grep -v "gemv_" "$OUT/ab-base.log" | tee -a "$S"
echo "== new" | tee -a "$S"; grep -v "gemv_" "$OUT/ab-new.log" | tee -a "$S"
run() {  # run NAME ROOT ENGINE [ENV=VALUE]
  ( export PYTHONPATH="$2:/tmp/site" ${4:-KILN_NOTHING=1}
    timeout 100 python3 -P -m kiln.cli bench latency /tmp/llama8b-$3 --batch-sizes 1 \
      --ttft-lens 128 --new-tokens 128 --output-dir /tmp/res-$1 > "$OUT/lat-$1.log" 2>&1 )
  cp /tmp/res-$1/*.json "$OUT/lat-$1.json" 2>/dev/null
  echo "== $1" | tee -a "$S"
  grep -E "^(decode_tok_s_bs|gpu_ms_per_step_bs|ttft_ms_128)|rror" "$OUT/lat-$1.log" | tee -a "$S"
}
run int8-base "$PWD/.ab-base" int8-wo
run int8-new "$PWD" int8-wo
run int4-base "$PWD/.ab-base" int4-wo
run int4-new-gemv "$PWD" int4-wo KILN_SKINNY_INT4_BATCH1=0
run int4-new "$PWD" int4-wo
( cd "$OUT" && tar czf /tmp/callA.tgz --exclude=callA.txt . && find . -mindepth 1 ! -name callA.txt -delete \
  && mv /tmp/callA.tgz callA.tgz )
true
