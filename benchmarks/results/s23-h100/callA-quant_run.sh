#!/usr/bin/env bash
# Quantisation A/B on one GPU machine (issue 11): GPU tests, kernel microbenchmark, random
# Llama-3.1-8B engines in bf16 / fp8 / int8-wo / int4-wo, batch-1 decode and 8k TTFT of
# each, offline 128/128 (fp8 vs bf16) and 2048/2048 (fp8 weights + fp8 KV).
# Results: $OUT/<step>-<engine>.json, logs, and a summary in $OUT/quant.txt.
# Usage on the GPU machine (carry .whl):
#   bash benchmarks/quant_run.sh [tests|micro|pick|build|gptq|latency|ab|eval8b|verify8b|t128|t2048|
#     attn|fp8dot|profile2048]...
# Knobs: ENGINES (default "bf16 fp8 int8-wo int4-wo"; "int8-wo-g128": --group-size 128), T128_PROMPTS (3000),
#   T128_ENGINES ("fp8 bf16"), T2048_PROMPTS (300), LATENCY_TTFT ("128 8192"),
#   LATENCY_BATCHES ("1"), LATENCY_NEW_TOKENS (200),
#   QUANT_BENCH_ROWS ("1 4 16 512 4096").
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# SKIP_INSTALL=1: another invocation installed them (two at once would race on /tmp/site).
[ "${SKIP_INSTALL:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl || exit 1
kiln() { python3 -P -m kiln.cli "$@"; }
ENGINES=${ENGINES:-"bf16 fp8 int8-wo int4-wo"}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a "$OUT/quant.txt"
engine_dir() { echo "/tmp/llama8b-$1"; }
bench() {  # bench STEP ENGINE ARGS...: its JSON becomes $OUT/STEP-ENGINE.json
  local step=$1 name=$2 dir="/tmp/results-$1-$2"
  shift 2
  rm -rf "$dir"
  timeout ${BENCH_TIMEOUT:-240} python3 -P -m kiln.cli bench "$@" --output-dir "$dir" > "$OUT/$step-$name.log" 2>&1
  cp "$dir"/*.json "$OUT/$step-$name.json" 2>/dev/null
  echo "== $step $name" | tee -a "$OUT/quant.txt"
  grep -E "^(output_tok_s|decode_tok_s_bs|gpu_ms_per_step_bs|bs1_decode_tok_s|bs1_pct_of_copy|ttft|startup_s|bs1_gpu_ms_per_step|bs1_cpu_ms_per_step|batched_gpu_ms_per_step|batched_cpu_ms_per_step|batched_cpu_below_gpu|num_kv_blocks)|Error|error" \
    "$OUT/$step-$name.log" | head -20 | tee -a "$OUT/quant.txt"
}
for step in "$@"; do
  case $step in
    tests)
      timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider \
        ${TESTS:-tests/gpu/test_quant_gpu.py tests/kernels/test_int_gemv.py} > "$OUT/gpu_tests.log" 2>&1
      tail -8 "$OUT/gpu_tests.log" | tee -a "$OUT/quant.txt" ;;
    micro)
      timeout ${MICRO_TIMEOUT:-90} python3 benchmarks/quant_bench.py --out "$OUT" > "$OUT/micro.log" 2>&1
      grep -E "M=    1|M=   16|M=  512|M= 4096" "$OUT/micro.log" | grep -v "_gemv_n" | tee -a "$OUT/quant.txt" ;;
    pick)  # after micro with QUANT_BENCH_INT_GRID: the fastest int_gemv tiling per format,
      # used by the ab variants ":tuned" (KILN_INT_GEMV_TILING) later in this invocation
      TUNED=$(python3 benchmarks/int_gemv_pick.py "$OUT/quant_bench.json" 2> "$OUT/pick.log")
      head -6 "$OUT/pick.log" | tee -a "$OUT/quant.txt"
      grep "^int8" "$OUT/pick.log" | head -5 | tee -a "$OUT/quant.txt"
      echo "tuned: $TUNED" | tee -a "$OUT/quant.txt" ;;
    build)
      # All at once (each needs ~10-16 GB of host memory: quantised builds quantise layer
      # by layer); the times printed are each build's own wall time under that sharing.
      for name in $ENGINES; do
        scheme=$name; [ "$name" = bf16 ] && scheme=none
        groups=""  # "int8-wo-g128": int8-wo with --group-size 128
        case $name in *-g[0-9]*) scheme=${name%-g*}; groups="--group-size ${name##*-g}" ;; esac
        ( /usr/bin/time -f "build $name %e s, %M KB" timeout 240 python3 -P -m kiln.cli build \
            llama-3.1-8b --random-weights --quant $scheme $groups -o "$(engine_dir $name)" \
            --max-model-len 16384 > "$OUT/build-$name.log" 2>&1
          tail -2 "$OUT/build-$name.log" | tee -a "$OUT/quant.txt" ) &
      done
      wait
      df -h /tmp | tail -1 ;;
    gptq)  # GPTQ rounding at build (--calibration on random ids, --gptq), one build at a time:
      # each holds every linear's E[x xᵀ] on the GPU (~32 GB at 8B); engines "<scheme>-gptq"
      for name in ${GPTQ_ENGINES:-int8-wo fp8}; do
        /usr/bin/time -f "build $name-gptq %e s, %M KB" timeout ${GPTQ_TIMEOUT:-300} \
          python3 -P -m kiln.cli build llama-3.1-8b --random-weights --quant $name \
          --calibration sharegpt --gptq -o "$(engine_dir $name-gptq)" --max-model-len 16384 \
          > "$OUT/build-$name-gptq.log" 2>&1
        tail -2 "$OUT/build-$name-gptq.log" | tee -a "$OUT/quant.txt"
      done ;;
    latency)
      for name in $ENGINES; do
        bench latency "$name" latency "$(engine_dir $name)" --batch-sizes ${LATENCY_BATCHES:-1} \
          --ttft-lens ${LATENCY_TTFT:-128 8192} --new-tokens ${LATENCY_NEW_TOKENS:-200}
      done ;;
    ab)  # batch-1 decode A/B in one call: fp8 with the previous tree's kernels (.ab-prev, a
      # git archive of the base commit's kiln/) then this tree's; int8-wo / int4-wo with the
      # conversion kernel (KILN_INT_GEMV=0) then int_gemv; ":tuned" = int_gemv with the
      # tiling the pick step chose; bf16 as the common baseline.
      for variant in ${AB_VARIANTS:-fp8:prev fp8:new int8-wo:cvt int8-wo:new int4-wo:cvt int4-wo:new bf16:new}; do
        name=${variant%%:*}; how=${variant#*:}
        root=$PWD; [ "$how" = prev ] && root=$PWD/.ab-prev
        ttft="128"; [ "$name" = fp8 ] && ttft="128 8192"
        flag=1; [ "$how" = cvt ] && flag=0
        tiling=""; [ "$how" = tuned ] && tiling=${TUNED:-}
        ( export KILN_INT_GEMV=$flag PYTHONPATH=$root:/tmp/site KILN_INT_GEMV_TILING=$tiling
          bench ab "$name-$how" latency "$(engine_dir $name)" --batch-sizes 1 --ttft-lens $ttft \
            --new-tokens 128 )
      done ;;
    eval8b)  # each quantised 8B engine against the bf16 one (same random weights): top-1
      # agreement and KL on 50,000 tokens of held-out ShareGPT text read with SmolLM2's
      # tokenizer (carry .bench-tok and .eval-text; the text, ~70,000 SmolLM2 tokens of the
      # evaluation split, made on the CPU machine by: mkdir .eval-text; python -c "import json,
      # itertools; from kiln.evaluate.corpus import sharegpt_replies as r; open('.eval-text/
      # sharegpt-eval-replies.jsonl', 'w').writelines(json.dumps({'text': t}) + '\n' for t in
      # itertools.islice(r('evaluation'), 282))"); the fast kernels at real shapes vs bf16
      for name in ${EVAL_ENGINES:-fp8 int8-wo int4-wo}; do
        timeout ${EVAL_TIMEOUT:-180} python3 -P -m kiln.cli eval "$(engine_dir $name)" \
          --compare "$(engine_dir bf16)" --tokenizer .bench-tok \
          --dataset-path .eval-text/sharegpt-eval-replies.jsonl --num-tokens 50000 --no-progress \
          --output-json "$OUT/eval8b-$name.json" > "$OUT/eval8b-$name.log" 2>&1
        echo "== eval8b $name" | tee -a "$OUT/quant.txt"
        grep -E "agreement|KL|perplexity|rror" "$OUT/eval8b-$name.log" | head -8 | tee -a "$OUT/quant.txt"
      done ;;
    verify8b)  # each quantised 8B engine's fast kernels against its torch references, layer
      # by layer, on one prompt read with SmolLM2's tokenizer (carry .bench-tok)
      for name in ${EVAL_ENGINES:-fp8 int8-wo int4-wo}; do
        timeout ${EVAL_TIMEOUT:-180} python3 -P -m kiln.cli verify "$(engine_dir $name)" \
          --reference-kernels --tokenizer .bench-tok > "$OUT/verify8b-$name.log" 2>&1
        echo "== verify8b $name" | tee -a "$OUT/quant.txt"
        grep -E "first layer|no layer|rror" "$OUT/verify8b-$name.log" | head -4 | tee -a "$OUT/quant.txt"
      done ;;
    t128)  # T128_RUNS=2: each engine twice, the second with Triton's kernels already on disk
      for name in ${T128_ENGINES:-fp8 bf16}; do
        for run in $(seq ${T128_RUNS:-1}); do
          suffix=""; [ "$run" = 1 ] || suffix="-run$run"
          bench t128 "$name$suffix" throughput "$(engine_dir $name)" --dataset random \
            --num-prompts ${T128_PROMPTS:-3000} --input-len 128 --output-len 128
        done
      done ;;
    attn)  # the decode attention kernel's tilings, bf16 and FP8 KV, incl. 448 rows of 2-4 k
      timeout ${ATTN_TIMEOUT:-240} python3 benchmarks/attention_sweep.py --decode-only \
        --kv-dtype bf16 fp8 --out "$OUT" > "$OUT/attn.log" 2>&1
      grep -E "^decode|rror" "$OUT/attn.log" | tee -a "$OUT/quant.txt" ;;
    fp8dot)  # how decode turns FP8 KV tiles into dot operands (KILN_FP8_KV_DOT): the kernel's
      # tiling sweep per mode (end to end: t2048 with T2048_DOT_MODES)
      timeout ${ATTN_TIMEOUT:-240} python3 benchmarks/attention_sweep.py --decode-only \
        --kv-dtype fp8 --fp8-dot-modes ${FP8_DOT_MODES:-model fp16} --out "$OUT" \
        > "$OUT/fp8dot.log" 2>&1
      grep -E "^(--|decode)|rror" "$OUT/fp8dot.log" | tee -a "$OUT/quant.txt" ;;
    profile2048)  # where a 2048/2048 step's GPU time goes (fp8 weights + fp8 KV): decode
      # steps at 448 rows of ~3 k context, and the mixed steps when prompts of 2,048 arrive
      timeout ${PROFILE_TIMEOUT:-300} python3 benchmarks/profile_step.py "$(engine_dir fp8)" \
        --prefill 2048 --batch 448 --batch-prompt-len 3000 --mixed 448 4 --mixed-prompt-len 2048 \
        --decode-tokens 10 --max-num-seqs 1024 --max-num-batched-tokens 16384 \
        --kv-cache-dtype fp8 --out "$OUT" > "$OUT/profile2048.log" 2>&1
      grep -A8 "^==" "$OUT/profile2048.log" | tee -a "$OUT/quant.txt"
      grep -E "rror" "$OUT/profile2048.log" | head -3 | tee -a "$OUT/quant.txt" ;;
    t2048)  # T2048_DOT_MODES="model fp16": an A/B of the FP8 KV decode dots (KILN_FP8_KV_DOT)
      for mode in ${T2048_DOT_MODES:-fp16}; do
        ( export KILN_FP8_KV_DOT=$mode
          bench t2048 "fp8-fp8kv-$mode" throughput "$(engine_dir fp8)" --dataset random \
            --num-prompts ${T2048_PROMPTS:-300} --input-len 2048 --output-len 2048 \
            --kv-cache-dtype fp8 )
      done ;;
  esac
done
# Everything but the summary in one archive (the device tool returns a few files only).
# Written outside $OUT first: tar reading the directory it writes into fails ("file changed
# as we read it") and then nothing was deleted, so the archive did not come back either.
( cd "$OUT" && tar czf /tmp/quant-results.tgz --exclude=quant.txt --exclude=results.tgz . ; \
  mv /tmp/quant-results.tgz results.tgz && \
  find . -mindepth 1 ! -name quant.txt ! -name results.tgz -delete )
