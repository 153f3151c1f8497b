#!/usr/bin/env bash
# Where a batch-1 decode step's GPU time goes outside the linears (int4-wo, fp8; KILN_PDL=0 so
# the kernel rows add up to the step): benchmarks/profile_step.py, no prefill profiles.
source benchmarks/device_preamble.sh
for scheme in int4-wo fp8; do
  [ -d /tmp/e-$scheme ] || timeout 200 python3 -P -m kiln.cli build llama-3.1-8b \
    --random-weights --quant $scheme -o /tmp/e-$scheme --max-model-len 4096 > /tmp/b.log 2>&1
  KILN_PDL=0 timeout 150 python3 benchmarks/profile_step.py /tmp/e-$scheme --prefill \
    --decode-tokens 20 --batch 8 --batch-prompt-len 128 --max-model-len 4096 \
    --out /tmp/p-$scheme > /tmp/p-$scheme.log 2>&1
  cp /tmp/p-$scheme/profile_step.json "$OUT/profile-$scheme.json"
  echo "== $scheme" | tee -a "$S"; grep -v Warn /tmp/p-$scheme.log | tail -30 | tee -a "$S"
done
