#!/usr/bin/env bash
# int4 batch-1 with two bf16 weights an instruction (int_gemv's packed path), on the GPU:
# its tests, the per-linear A/B against the fp32 unpacking and the Gluon kernel
# (int_gemv_ab.py), then batch-1 decode of one int4-wo engine three ways. Carry .whl.
# `int4_packed.sh rule`: the second call, after the per-shape rule (wide matrices on 1-warp
# packed programs): tests, the tilings near 16x32x1, then decode new / old / new.
source benchmarks/device_preamble.sh  # as run: these lines were inline
MODE=${1:-all}
TILINGS="16x128x4 32x64x4 64x32x4 32x32x2 16x32x1 8x128x2"
[ "$MODE" = rule ] && TILINGS="16x32x1 16x32x2 32x32x1 8x32x1 16x16x1 16x64x1 8x64x1 16x64x2"
if true; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_int_gemv.py \
    tests/kernels/test_skinny_int4.py tests/gpu/test_quant_gpu.py -k "int4 or packed or nibble or fractional" \
    > "$OUT/gpu_tests.log" 2>&1
  tail -2 "$OUT/gpu_tests.log" | tee -a "$S"
  (cd benchmarks && timeout 150 python3 int_gemv_ab.py "$OUT" --label packed --formats int4-g128 \
    --tilings $TILINGS) > "$OUT/int_gemv_ab.log" 2>&1
  grep -E "int4|bf16|copy|rror" "$OUT/int_gemv_ab.log" | tee -a "$S"
fi
[ -d /tmp/llama8b-int4 ] || timeout 200 python3 -P -m kiln.cli build llama-3.1-8b --random-weights \
  --quant int4-wo -o /tmp/llama8b-int4 --max-model-len 4096 > /tmp/build-int4.log 2>&1
tail -1 /tmp/build-int4.log | tee -a "$S"
lat() {  # lat NAME ENV...
  local name=$1; shift
  env "$@" timeout 120 python3 -P -m kiln.cli bench latency /tmp/llama8b-int4 --batch-sizes 1 \
    --ttft-lens 128 --new-tokens 128 --output-dir /tmp/res-$name > /tmp/lat-$name.log 2>&1
  cp /tmp/res-$name/*.json "$OUT/lat-$name.json" 2>/dev/null
  echo "== $name $*: $(grep -E '^(bs1_decode_tok_s|bs1_gpu_ms_per_step|bs1_pct_of_copy|decode_tok_s_bs1)' /tmp/lat-$name.log | tr -s ' ' | tr '\n' ' ')" | tee -a "$S"
  grep -E "rror" /tmp/lat-$name.log | head -3 | tee -a "$S"
}
if [ "$MODE" = all ]; then
  lat packed-default KILN_INT_GEMV_PACKED=1
  lat packed-all-gemv KILN_SKINNY_INT4_BATCH1=0
  lat fp32-default KILN_INT_GEMV_PACKED=0
else
  lat rule-new KILN_INT_GEMV_PACKED=1
  lat rule-old KILN_INT_GEMV_PACKED=0
  lat rule-new2 KILN_INT_GEMV_PACKED=1
fi
