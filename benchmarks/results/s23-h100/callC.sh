#!/usr/bin/env bash
# Call C: the GPU tests the change touches (skinny_fp8's kernel now takes int8 group scales:
# fp8 / int8 skinny kernels, int_gemm, test_quant_gpu whole), one-row int8 linears with groups
# of 128 (int_gemv against the Gluon twin), and random Llama-3.1-8B int8-wo --group-size 128
# end to end: base = main's kiln/ (.ab-base), new = this tree (one row of groups ≤ 64 on the
# twin), new-b1 = this tree with groups ≤ 128 there too.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/callC.txt"
timeout 200 python3 -P -m kiln.cli build llama-3.1-8b --random-weights --quant int8-wo \
  --group-size 128 -o /tmp/llama8b-g128 --max-model-len 16384 > "$OUT/build-g128.log" 2>&1 &
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_skinny_fp8.py \
  tests/kernels/test_skinny_int8.py tests/kernels/test_int_gemm.py tests/gpu/test_quant_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$OUT/callC.txt"
wait
tail -n 1 "$OUT/build-g128.log" | tee -a "$OUT/callC.txt"
timeout 100 python3 benchmarks/skinny_int8_bench.py "$OUT" --group-size 128 --rows 1 \
  > "$OUT/bench-g128.log" 2>&1
grep -E "M=" "$OUT/bench-g128.log" | tee -a "$OUT/callC.txt"
mkdir -p /tmp/ab-b1 && cp -r kiln /tmp/ab-b1/ && \
  sed -i 's/^BATCH1_MAX_GROUP = 64$/BATCH1_MAX_GROUP = 128/' /tmp/ab-b1/kiln/kernels/skinny_int8.py
grep -c "BATCH1_MAX_GROUP = 128" /tmp/ab-b1/kiln/kernels/skinny_int8.py | tee -a "$OUT/callC.txt"
run() {  # run NAME ROOT BATCHES
  ( export PYTHONPATH="$2:/tmp/site"
    timeout 120 python3 -P -m kiln.cli bench latency /tmp/llama8b-g128 --batch-sizes $3 \
      --ttft-lens 128 --new-tokens 128 --output-dir /tmp/res-$1 > "$OUT/lat-$1.log" 2>&1 )
  cp /tmp/res-$1/*.json "$OUT/lat-$1.json" 2>/dev/null
  echo "== $1" | tee -a "$OUT/callC.txt"
  grep -E "^(decode_tok_s_bs|gpu_ms_per_step_bs|ttft_ms_128)|rror" "$OUT/lat-$1.log" | tee -a "$OUT/callC.txt"
}
run g128-base "$PWD/.ab-base" "1 128"
run g128-new "$PWD" "1 128"
run g128-new-b1 /tmp/ab-b1 "1"
run g128-new-2 "$PWD" "1"
run g128-new-b1-2 /tmp/ab-b1 "1"
( cd "$OUT" && tar czf /tmp/callC.tgz --exclude=callC.txt . && find . -mindepth 1 ! -name callC.txt -delete \
  && mv /tmp/callC.tgz callC.tgz )
true
