#!/usr/bin/env bash
# One device call: install carried wheels, GPU tests, build a random Llama-3.1-8B engine,
# latency (with the transformers peer) and throughput benchmarks. Results land in $OUT.
# Usage on the GPU machine: bash benchmarks/gpu_run.sh [tests|chain|profile|gemm|sweep|build|latency|throughput|sharegpt|serve]...
# (sharegpt/serve replay .bench-data/sharegpt-smollm2-1000.jsonl: carry it; make it here with
#  kiln bench throughput smollm2 --num-prompts 1000 --save-dataset ... or the serve bench's twin.)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
kiln() { python3 -m kiln.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
engine=/tmp/llama8b
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests build latency throughput)
for step in "${steps[@]}"; do
  case $step in
    tests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider ${GPU_TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    chain)
      timeout ${CHAIN_TIMEOUT:-200} python3 benchmarks/decode_chain_bench.py --out "$OUT" 2>&1 | tail -40 ;;
    profile)
      timeout ${PROFILE_TIMEOUT:-120} python3 benchmarks/profile_step.py $engine ${PROFILE_ARGS:-} --out "$OUT" 2>&1 | tail -60 ;;
    gemm)
      timeout ${GEMM_TIMEOUT:-120} python3 benchmarks/gemm_shapes.py --out "$OUT" 2>&1 | tail -12 ;;
    sweep)
      timeout ${SWEEP_TIMEOUT:-200} python3 benchmarks/attention_sweep.py --out "$OUT" 2>&1 | grep -v Warn | tail -8 ;;
    build)
      [ -f $engine/engine.json ] || /usr/bin/time -f "build %e s, %M KB" python3 -m kiln.cli build llama-3.1-8b --random-weights -o $engine --max-model-len 16384 2>&1 | tail -2 ;;
    latency)
      timeout ${LATENCY_TIMEOUT:-420} python3 -m kiln.cli bench latency $engine ${HF_PEER---hf-peer} --plot --batch-sizes 1 8 32 64 128 256 \
        --ttft-lens 128 512 2048 8192 --output-dir "$OUT" 2>&1 | tee "$OUT/latency.log" | tail -40 ;;
    throughput)
      timeout ${THROUGHPUT_TIMEOUT:-300} python3 -m kiln.cli bench throughput $engine --dataset random --num-prompts ${THROUGHPUT_PROMPTS:-1000} \
        --input-len ${INPUT_LEN:-128} --output-len ${OUTPUT_LEN:-128} ${ENGINE_ARGS:-} --output-dir "$OUT" 2>&1 | tee -a "$OUT/throughput.log" | tail -17 ;;
    sharegpt)
      timeout ${THROUGHPUT_TIMEOUT:-300} python3 -m kiln.cli bench throughput $engine --dataset file \
        --dataset-path .bench-data/sharegpt-smollm2-1000.jsonl --num-prompts ${SHAREGPT_PROMPTS:-1000} \
        ${ENGINE_ARGS:-} --output-dir "$OUT" 2>&1 | tee -a "$OUT/sharegpt.log" | tail -17 ;;
    serve)
      python3 -m kiln.cli serve $engine --port 8000 --max-queued-requests 4096 > "$OUT/server.log" 2>&1 &
      server=$!
      SERVER_PID=$server python3 - <<'PY' || { tail -20 "$OUT/server.log"; kill $server; continue; }
import os, time, httpx
for _ in range(300):
    os.kill(int(os.environ["SERVER_PID"]), 0)  # raises once the server has died
    try:
        if httpx.get("http://127.0.0.1:8000/ready", timeout=2).status_code == 200:
            raise SystemExit(0)
    except httpx.HTTPError:
        pass
    time.sleep(1)
raise SystemExit("server not ready after 300 s")
PY
      grep -i -E "start-up|captured|loaded" "$OUT/server.log" | tail -5
      timeout ${SERVE_TIMEOUT:-300} python3 -m kiln.cli bench serve --dataset file \
        --dataset-path .bench-data/sharegpt-smollm2-1000.jsonl --num-prompts ${SERVE_PROMPTS:-200} \
        --request-rate ${SERVE_RATES:-4 8} --plot --output-dir "$OUT" 2>&1 | tee "$OUT/serve.log" | tail -8
      kill -TERM $server; wait $server ;;
  esac
done
