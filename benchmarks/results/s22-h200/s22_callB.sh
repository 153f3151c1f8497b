#!/usr/bin/env bash
# next/int-prefill's tiling rule (.dev/ip) against main: GPU tests, int8/int4 A/B; 8B --gptq build time
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
S=$OUT/summary.txt; O=$OUT; R=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $S
(cd .dev/ip && PYTHONPATH=$PWD:/tmp/site timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_int_gemm.py tests/gpu/test_quant_gpu.py > $O/ip_tests.log 2>&1)
echo "ip tests: $(tail -1 $O/ip_tests.log)" | tee -a $S; grep -E "^(FAILED|ERROR)" $O/ip_tests.log | head -12 | tee -a $S
for q in int8-wo int4-wo; do
  PYTHONPATH=$R:/tmp/site timeout 70 python3 -P -m kiln.cli build llama-3.1-8b --random-weights --quant $q -o /tmp/e-$q --max-model-len 4096 > $O/build-$q.log 2>&1 || tail -3 $O/build-$q.log | tee -a $S
  for side in main ip; do
    if [ $side = main ]; then P="$R:/tmp/site"; else P="$R/.dev/ip:/tmp/site"; fi
    PYTHONPATH=$P timeout 80 python3 -P -m kiln.cli bench latency /tmp/e-$q --batch-sizes 64 96 128 --ttft-lens 64 128 --new-tokens 32 --output-dir $O/lat-$q-$side > $O/lat-$q-$side.log 2>&1
    echo "$q $side: $(grep -E "^(ttft_ms|decode_tok_s_bs|gpu_ms_per_step_bs)|rror" $O/lat-$q-$side.log | tr -s ' ' | paste -sd' ')" | tee -a $S
  done
  rm -rf /tmp/e-$q
done
PYTHONPATH=$R:/tmp/site /usr/bin/time -f "build int8-wo --gptq %e s, %M KB" timeout 330 python3 -P -m kiln.cli build llama-3.1-8b --random-weights --quant int8-wo --calibration sharegpt --gptq -o /tmp/e-gptq --max-model-len 4096 > $O/build-gptq.log 2>&1
tail -4 $O/build-gptq.log | tee -a $S
true
