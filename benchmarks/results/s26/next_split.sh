#!/usr/bin/env bash
# For the next device session: int_gemv with K split (IntGemvConfig.split_k, opt-in, not yet
# run on a GPU) for the narrow matrices that stream at 1.2-1.6 TB/s in too few programs at
# one row (q|k|v, o, down), and fp8_gemv (W8A8 at one row on the CUDA cores, KILN_FP8_GEMV=1,
# opt-in, not yet run on a GPU) against skinny_fp8. GPU tests first, then the per-linear grid
# (int4 packed, int8, fp8), then batch-1 decode of each with the new paths forced.
# Carry .whl; two calls: `next_split.sh grid`, then `next_split.sh decode` while warm. Pick the
# rule from the grid, set it in default_int_gemv_config, measure again.
source benchmarks/device_preamble.sh
if [ "${1:-grid}" = grid ]; then
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_int_gemv.py \
  tests/gpu/test_quant_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -2 "$OUT/gpu_tests.log" | tee -a "$S"
(cd benchmarks && timeout 240 python3 int_gemv_ab.py "$OUT" --label split --formats int4-g128 \
  int8 fp8 --tilings 16x32x1 16x64x1 16x32x1x2 16x32x1x4 16x32x1x8 16x32x1x7 8x32x1x4 \
  16x64x1x4 16x64x4x4 8x128x2x4 8x128x2x7) > "$OUT/int_gemv_ab.log" 2>&1
grep -E "int|fp8|bf16|copy|rror" "$OUT/int_gemv_ab.log" | tee -a "$S"
exit 0
fi
for scheme in int4-wo int8-wo fp8; do
  [ -d /tmp/e-$scheme ] || timeout 200 python3 -P -m kiln.cli build llama-3.1-8b \
    --random-weights --quant $scheme -o /tmp/e-$scheme --max-model-len 4096 > /tmp/b.log 2>&1
done
lat() {  # lat NAME ENGINE ENV...
  local name=$1 engine=$2; shift 2
  env "$@" timeout 120 python3 -P -m kiln.cli bench latency $engine --batch-sizes 1 \
    --ttft-lens 128 --new-tokens 128 --output-dir /tmp/res-$name > /tmp/lat-$name.log 2>&1
  cp /tmp/res-$name/*.json "$OUT/lat-$name.json" 2>/dev/null
  echo "== $name $*: $(grep -E '^(bs1_decode_tok_s|bs1_gpu_ms_per_step)' /tmp/lat-$name.log | tr -s ' ' | tr '\n' ' ')" | tee -a "$S"
  grep -E "rror" /tmp/lat-$name.log | head -3 | tee -a "$S"
}
lat int4-default /tmp/e-int4-wo
lat int4-split4 /tmp/e-int4-wo KILN_SKINNY_INT4_BATCH1=0 KILN_INT_GEMV_TILING=int4=16x32x1x4
lat int8-default /tmp/e-int8-wo
lat int8-split4 /tmp/e-int8-wo KILN_SKINNY_INT8_BATCH1=0 KILN_INT_GEMV_TILING=int8=8x128x2x4
lat fp8-default /tmp/e-fp8
lat fp8-gemv /tmp/e-fp8 KILN_FP8_GEMV=1
lat fp8-gemv-split4 /tmp/e-fp8 KILN_FP8_GEMV=1 KILN_INT_GEMV_TILING=fp8=16x128x4x4
