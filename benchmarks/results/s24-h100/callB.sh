#!/usr/bin/env bash
# Call B (tree: next/int8-groups-triton), cut to what its merge needs (device time was short):
# the real-shape GPU test of grouped int8 linears where the Gluon twin does not run, and
# SmolLM2-shape grouped int8 at 1-16 rows (skinny_int8's Triton kernel against quant_linear).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
S="$OUT/callB.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$S"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_gpu.py -k grouped_int8 \
  > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$S"
grep -E "^FAILED" "$OUT/gpu_tests.log" | head -10 | tee -a "$S"
timeout 100 python3 benchmarks/skinny_int8_bench.py "$OUT" --smollm2 --group-size 64 \
  --rows 1 2 8 16 > "$OUT/bench-smollm2-g64.log" 2>&1
grep -vE "^\s*$" "$OUT/bench-smollm2-g64.log" | tail -40 | tee -a "$S"
true
