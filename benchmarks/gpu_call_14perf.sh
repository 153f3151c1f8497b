#!/usr/bin/env bash
# The 14perf device calls (issue 14, TTFT + long context). Usage on the GPU machine, from the
# worktree root: bash benchmarks/gpu_call_14perf.sh STEP... (tests build profile sweep long
# latency serve structured itl; the A/B steps need .ab-base: git archive of the base commit;
# structured and itl need .bench-tok, SmolLM2's tokenizer saved by save_pretrained)
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
        tests/gpu/test_prefill_graphs_gpu.py tests/gpu/test_dense_prefill_gpu.py \
        tests/gpu/test_startup_gpu.py tests/gpu/test_model_gpu.py -k "${TESTS_K:-not nothing}" > "$OUT/gpu_tests.log" 2>&1
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
      timeout ${STRUCTURED_TIMEOUT:-240} python3 -P -m kiln.cli bench throughput $engine --dataset random \
        --num-prompts 64 --input-len 128 --output-len 256 --tokenizer .bench-tok --structured json \
        --max-model-len 16384 --output-dir /tmp/structured > /tmp/structured.log 2>&1
      cp /tmp/structured/*.json "$OUT/" 2>/dev/null
      grep -E "tok_s|grammar_|ms_per_step|ratio|rror" /tmp/structured.log | tail -16 ;;
    itl)  # ITL of running streams with and without fresh schemas arriving mid-run
      timeout ${ITL_TIMEOUT:-200} python3 -P benchmarks/structured_itl.py $engine --tokenizer .bench-tok \
        --out "$OUT" > /tmp/itl.log 2>&1; grep -v -i warn /tmp/itl.log | tail -12 ;;
  esac
  echo "== $step took $(( $(date +%s) - started )) s"
done
