#!/usr/bin/env bash
# Issue 11's speed targets on the current tree, for a session that gets an H200 (one part a
# call, each < 600 s; carry .whl). a: batch-1 decode of bf16 / fp8 / int8-wo / int4-wo and the
# fp8 8,192-token TTFT; b: offline 128/128 fp8 with 30,000 requests, default and 2,048
# sequences + FP8 KV; c: offline 2048/2048 fp8 + FP8 KV with 1,500 requests.
source benchmarks/device_preamble.sh
build() {  # build SCHEME LIMIT
  local dir=/tmp/e-$1-$2
  [ -d $dir ] || timeout 200 python3 -P -m kiln.cli build llama-3.1-8b --random-weights \
    $([ $1 = bf16 ] || echo --quant $1) -o $dir --max-model-len $2 > /tmp/build-$1.log 2>&1
  tail -1 /tmp/build-$1.log | tee -a "$S"
}
bench() {  # bench NAME SUBCOMMAND ARGS...
  local name=$1; shift
  timeout ${T:-280} python3 -P -m kiln.cli bench "$@" --output-dir /tmp/res-$name \
    > /tmp/$name.log 2>&1
  cp /tmp/res-$name/*.json "$OUT/$name.json" 2>/dev/null
  echo "== $name" | tee -a "$S"
  grep -E "^(output_tok_s|bs1_decode_tok_s|bs1_gpu_ms_per_step|bs1_pct_of_copy|ttft_ms_|batched_(seconds|cpu_ms_per_step|gpu_ms_per_step|graph_cpu|graph_gpu|cpu_below))|rror" \
    /tmp/$name.log | tee -a "$S"
}
case ${1:-a} in
  a) for scheme in bf16 fp8 int8-wo int4-wo; do
       build $scheme 16384
       T=100 bench lat-$scheme latency /tmp/e-$scheme-16384 --batch-sizes 1 --ttft-lens 128 \
         $([ $scheme = fp8 ] && echo 8192) --new-tokens 128
     done ;;
  b) build fp8 4096
     T128="throughput /tmp/e-fp8-4096 --dataset random --num-prompts 30000 --input-len 128 --output-len 128"
     bench t128-30k $T128
     bench t128-30k-s2048-kvfp8 $T128 --max-num-seqs 2048 --kv-cache-dtype fp8 ;;
  c) build fp8 4096
     T=500 bench t2048-1500-kvfp8 throughput /tmp/e-fp8-4096 --dataset random \
       --num-prompts 1500 --input-len 2048 --output-len 2048 --kv-cache-dtype fp8 ;;
esac
