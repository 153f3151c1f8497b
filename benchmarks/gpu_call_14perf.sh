#!/usr/bin/env bash
# The 14perf device calls (issue 14, TTFT + long context). Usage on the GPU machine, from the
# worktree root: bash benchmarks/gpu_call_14perf.sh STEP... (tests build profile sweep long
# latency serve structured itl hostprofile invariant route smol0 smol ngram fp8build fp8lat
# skinny; the A/B steps need
# .ab-base: git archive of the base commit; structured, itl and hostprofile need .bench-tok,
# SmolLM2's tokenizer saved by save_pretrained; smol needs the GGUF's two halves
# (split -b 49181216), the first left in /tmp/smol.00 by an earlier call's smol0 step on the
# same machine, the second in .smol/ or .smol1/)
# Results under $OUT; a short table at the end of the log.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
engine=/tmp/llama8b
export PYTHONPATH=$PWD:/tmp/site
kiln() { python3 -P -m kiln.cli "$@"; }
for step in "$@"; do
  started=$(date +%s)
  case $step in
    tests)
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -x \
        ${TESTS_FILES:-tests/gpu/test_prefill_graphs_gpu.py tests/gpu/test_dense_prefill_gpu.py \
        tests/gpu/test_startup_gpu.py tests/gpu/test_model_gpu.py} -k "${TESTS_K:-not nothing}" > "$OUT/gpu_tests.log" 2>&1
      tail -15 "$OUT/gpu_tests.log" ;;
    build)  # the base tree's builder when there is one (ab_run.sh's rule), no length cap
      root=$PWD; [ -d .ab-base ] && root=$PWD/.ab-base
      [ -f $engine/engine.json ] || PYTHONPATH=$root:/tmp/site python3 -P -m kiln.cli build \
        llama-3.1-8b --random-weights -o $engine > /tmp/build.log 2>&1 || tail -5 /tmp/build.log ;;
    profile)
      python3 benchmarks/ttft_profile.py $engine --out "$OUT" 2>&1 | grep -v Warning | tail -14 ;;
    sweep)
      timeout 240 python3 benchmarks/prefill_attention_vs_sdpa.py --out "$OUT" 2>&1 | tail -6 ;;
    long)
      timeout ${LONG_TIMEOUT:-240} python3 -P -m kiln.cli bench latency $engine --max-model-len 131072 \
        --batch-sizes 1 --ttft-lens 128 32768 131072 --long-context-decode 131072 \
        --output-dir /tmp/long > /tmp/long.log 2>&1
      cp /tmp/long/*.json "$OUT/latency-long.json" 2>/dev/null
      grep -E "ttft|long_context|prefill_tflop|Error|error|startup_s|graph_" /tmp/long.log | tail -24 ;;
    latency)  # A/B: base (.ab-base, main's code) then new, same engine and card
      for variant in base new; do
        root=$PWD; [ $variant = base ] && root=$PWD/.ab-base
        PYTHONPATH=$root:/tmp/site timeout 150 python3 -P -m kiln.cli bench latency $engine \
          --max-model-len 16384 --batch-sizes 1 --ttft-lens 128 512 --new-tokens 64 \
          --output-dir /tmp/lat-$variant > /tmp/lat-$variant.log 2>&1
        cp /tmp/lat-$variant/*.json "$OUT/latency-$variant.json" 2>/dev/null
        echo "-- latency $variant"; grep -E "^(ttft_ms|bs1_decode_tok_s|startup_s|graph_)|rror" /tmp/lat-$variant.log
      done ;;
    serve)  # A/B: a server of each tree, the new tree's bench client against both
      for variant in ${SERVE_VARIANTS:-base new}; do
        root=$PWD; [ $variant = base ] && root=$PWD/.ab-base
        PYTHONPATH=$root:/tmp/site python3 -P -m kiln.cli serve $engine --port 8000 \
          --max-model-len 16384 --max-queued-requests 4096 > /tmp/server-$variant.log 2>&1 &
        server=$!
        for _ in $(seq 120); do
          python3 -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:8000/ready', timeout=2).status_code != 200)" 2> /dev/null && break
          kill -0 $server 2> /dev/null || break
          sleep 1
        done
        grep -i -E "start-up|captured" /tmp/server-$variant.log | tail -2
        timeout ${SERVE_TIMEOUT:-150} python3 -P -m kiln.cli bench serve --dataset file \
          --dataset-path benchmarks/data/sharegpt-smollm2-200.jsonl --num-prompts ${SERVE_PROMPTS:-80} \
          --request-rate ${SERVE_RATES:-4 8 16} --output-dir /tmp/serve-$variant > /tmp/serve-$variant.log 2>&1
        cp /tmp/serve-$variant/*.json "$OUT/serve-$variant.json" 2>/dev/null
        echo "-- serve $variant"; grep -E "^rate_|rror" /tmp/serve-$variant.log
        kill -TERM $server; wait $server
      done ;;
    structured)  # batch 64, 128 in / 256 out: unconstrained and JSON-constrained, one engine
      for variant in ${STRUCTURED_VARIANTS:-new}; do  # base: .ab-base's code
        root=$PWD; [ $variant = base ] && root=$PWD/.ab-base
        PYTHONPATH=$root:/tmp/site timeout ${STRUCTURED_TIMEOUT:-240} python3 -P -m kiln.cli bench throughput \
          $engine --dataset random --num-prompts 64 --input-len 128 --output-len 256 --tokenizer .bench-tok \
          --structured json --max-model-len 16384 --output-dir /tmp/structured-$variant > /tmp/structured-$variant.log 2>&1
        for f in /tmp/structured-$variant/*.json; do cp "$f" "$OUT/structured-$variant-$(basename $f)"; done
        echo "-- structured $variant"
        grep -E "output_tok_s|ms_per_step|grammar_|over_unconstrained|rror" /tmp/structured-$variant.log | tail -14
      done ;;
    itl)  # ITL of running streams with and without fresh schemas arriving mid-run
      timeout ${ITL_TIMEOUT:-200} python3 -P benchmarks/structured_itl.py $engine --tokenizer .bench-tok \
        --out "$OUT" > /tmp/itl.log 2>&1; grep -v -i warn /tmp/itl.log | tail -12 ;;
    hostprofile)  # where a structured step's host time goes (cProfile), batch 64
      timeout ${PROFILE_TIMEOUT:-150} python3 -P benchmarks/structured_host_profile.py $engine \
        --tokenizer .bench-tok --out "$OUT" > /tmp/hostprofile.log 2>&1
      grep -E "====|grammar:|rror" /tmp/hostprofile.log ;;
    invariant)  # batch-1 decode, default kernels vs KILN_BATCH_INVARIANT=1, same engine
      for variant in default invariant; do
        flag=0; [ $variant = invariant ] && flag=1
        KILN_BATCH_INVARIANT=$flag timeout 150 python3 -P -m kiln.cli bench latency $engine \
          --max-model-len 16384 --batch-sizes 1 4 --ttft-lens 128 --new-tokens 64 \
          --output-dir /tmp/inv-$variant > /tmp/inv-$variant.log 2>&1
        cp /tmp/inv-$variant/*.json "$OUT/latency-$variant.json" 2>/dev/null
        echo "-- latency $variant"; grep -E "^(bs[0-9]+_decode_tok_s|ttft_ms)|rror" /tmp/inv-$variant.log
      done ;;
    smol0)  # keep the GGUF's first half on this machine for the next call's smol step
      cp .smol/smol.00 /tmp/smol.00 && ls -la /tmp/smol.00 ;;
    smol)  # SmolLM2's GGUF from its halves, checked, and its engine
      [ -f /tmp/smol.00 ] || cp .smol/smol.00 /tmp/smol.00
      second=.smol/smol.01; [ -f $second ] || second=.smol1/smol.01
      cat /tmp/smol.00 $second > /tmp/smollm2.gguf
      echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smollm2.gguf" | sha256sum -c \
        && kiln build /tmp/smollm2.gguf -o /tmp/smol-engine --dtype bfloat16 > /tmp/smol-build.log 2>&1
      tail -2 /tmp/smol-build.log ;;
    ngram)  # n-gram at batch 1 on SmolLM2: default kernels, then batch-invariant ones
      for flag in "" --batch-invariant; do
        timeout ${NGRAM_TIMEOUT:-200} python3 -P benchmarks/ngram_bench.py /tmp/smol-engine $flag \
          --out "$OUT" > /tmp/ngram$flag.log 2>&1
        echo "-- ngram $flag"; grep -E "prompts|rror" /tmp/ngram$flag.log | tail -4
      done ;;
    route)  # the dense prefill route timed whole, repeated vs native-GQA heads, vs cuDNN SDPA
      timeout ${ROUTE_TIMEOUT:-150} python3 benchmarks/dense_route_bench.py --out "$OUT" 2>&1 | grep -v Warn | tail -8 ;;
    fp8build)  # a random Llama-3.1-8B FP8 engine (the current tree's builder)
      [ -f /tmp/llama8b-fp8/engine.json ] || kiln build llama-3.1-8b --random-weights --quant fp8 \
        -o /tmp/llama8b-fp8 --max-model-len 16384 > /tmp/fp8build.log 2>&1 || tail -5 /tmp/fp8build.log ;;
    fp8lat)  # batch-1/8 decode and TTFT of the FP8 engine: the opt-in kernels off, fused, skinny, both
      for variant in ${FP8_VARIANTS:-off fuse skinny both}; do
        fuse=0; skinny=0
        case $variant in fuse) fuse=1 ;; skinny) skinny=1 ;; both) fuse=1; skinny=1 ;; esac
        KILN_FP8_FUSE_ACTIVATIONS=$fuse KILN_FP8_SKINNY=$skinny timeout 150 python3 -P -m kiln.cli bench latency \
          /tmp/llama8b-fp8 --max-model-len 16384 --batch-sizes 1 8 --ttft-lens 128 8192 --new-tokens 64 \
          --output-dir /tmp/fp8lat-$variant > /tmp/fp8lat-$variant.log 2>&1
        cp /tmp/fp8lat-$variant/*.json "$OUT/latency-fp8-$variant.json" 2>/dev/null
        echo "-- fp8 latency $variant"; grep -E "^(bs[0-9]+_decode_tok_s|ttft_ms)|rror" /tmp/fp8lat-$variant.log | head -8
      done ;;
    skinny)  # FP8 skinny GEMM sweep (benchmarks/skinny_sweep.py)
      timeout ${SKINNY_TIMEOUT:-200} python3 -P benchmarks/skinny_sweep.py --out "$OUT" > /tmp/skinny.log 2>&1
      tail -${SKINNY_LINES:-40} /tmp/skinny.log ;;
  esac
  echo "== $step took $(( $(date +%s) - started )) s"
done
