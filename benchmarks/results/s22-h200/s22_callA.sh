#!/usr/bin/env bash
# branch next/int-prefill (.dev/ip) against main (repo root): tests, kernel bench, int8/int4 TTFT
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
S=$OUT/summary.txt; O=$OUT; R=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $S
(cd .dev/ip && PYTHONPATH=$PWD:/tmp/site timeout 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_int_gemm.py tests/gpu/test_quant_gpu.py tests/kernels/test_skinny_int8.py tests/kernels/test_skinny_int4.py tests/kernels/test_skinny_fp8.py tests/gpu/test_batch_invariant_gpu.py > $O/ip_tests.log 2>&1)
echo "ip tests: $(tail -1 $O/ip_tests.log)" | tee -a $S; grep -E "^(FAILED|ERROR)" $O/ip_tests.log | head -12 | tee -a $S
(cd .dev/ip && PYTHONPATH=$PWD:/tmp/site timeout 100 python3 benchmarks/skinny_int8_bench.py /tmp/bi4 --rows 96 128 --int4 > $O/bench-i4.log 2>&1)
echo "bench int4:" | tee -a $S; grep -E "M=|rror" $O/bench-i4.log | tee -a $S
for q in int8-wo int4-wo; do
  PYTHONPATH=$R:/tmp/site timeout 70 python3 -P -m kiln.cli build llama-3.1-8b --random-weights --quant $q -o /tmp/e-$q --max-model-len 4096 > $O/build-$q.log 2>&1 || tail -3 $O/build-$q.log | tee -a $S
  for side in main ip; do
    if [ $side = main ]; then P="$R:/tmp/site"; else P="$R/.dev/ip:/tmp/site"; fi
    PYTHONPATH=$P timeout 80 python3 -P -m kiln.cli bench latency /tmp/e-$q --batch-sizes 64 128 --ttft-lens 64 128 --new-tokens 32 --output-dir $O/lat-$q-$side > $O/lat-$q-$side.log 2>&1
    echo "$q $side: $(grep -E "^(ttft_ms|decode_tok_s_bs|gpu_ms_per_step_bs)|rror" $O/lat-$q-$side.log | tr -s ' ' | paste -sd' ')" | tee -a $S
  done
done
true
