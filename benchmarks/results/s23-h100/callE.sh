#!/usr/bin/env bash
# Call E: skinny_fp8's kernel changed (int8 group scales; the fp8 path's scale load moved into
# its own branch): fp8 batch-1 decode and batch 8 on random Llama-3.1-8B, base (main's kiln/
# before, .ab-base) against this tree, alternated.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/callE.txt"
PYTHONPATH="$PWD:/tmp/site" timeout 150 python3 -P -m kiln.cli build llama-3.1-8b --random-weights \
  --quant fp8 -o /tmp/llama8b-fp8 --max-model-len 4096 > "$OUT/build-fp8.log" 2>&1
tail -n 1 "$OUT/build-fp8.log" | tee -a "$OUT/callE.txt"
for run in base new base-2 new-2; do
  root=$PWD; case $run in base*) root=$PWD/.ab-base ;; esac
  PYTHONPATH="$root:/tmp/site" timeout 90 python3 -P -m kiln.cli bench latency /tmp/llama8b-fp8 \
    --batch-sizes 1 8 --ttft-lens 128 --new-tokens 128 --output-dir /tmp/res-$run > "$OUT/lat-$run.log" 2>&1
  echo "== fp8 $run" | tee -a "$OUT/callE.txt"
  grep -E "^(decode_tok_s_bs|gpu_ms_per_step_bs|ttft_ms_128)|rror" "$OUT/lat-$run.log" | tee -a "$OUT/callE.txt"
done
true
