#!/usr/bin/env bash
# Tensor/pipeline-parallel runs on one multi-GPU machine (issue 17): random-weight
# Llama-3.1-8B engines built for each layout, greedy tokens of 16 prompts checked against
# tp 1, then batch-1 decode (and optionally offline throughput) per layout.
# Results: $OUT/parallel.txt (the table), $OUT/<step>-tp<N>-pp<M>.json (bench JSON),
# $OUT/tokens-tp<N>-pp<M>.json (the greedy tokens).
#
# Usage on the machine (carry .wt/issue-13 or main, and .whl):
#   bash benchmarks/parallel_run.sh [correctness] [latency] [t128] [tests]
# LAYOUTS (default "1x1 2x1 4x1 8x1 1x2", tp x pp) is cut to what the machine's GPU count
# allows; PRESET (default llama-3.1-8b) picks the model (kiln/compiler/presets.py).
# NVLink multicast stays off (the lent machines forbid it); kiln sets these for every
# child too, they are exported here for anything else the script starts.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
PRESET=${PRESET:-llama-3.1-8b}
LAYOUTS=${LAYOUTS:-"1x1 2x1 4x1 8x1 1x2"}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../../.whl/*.whl 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | sed "s/^/$gpus x /" | tee -a "$OUT/parallel.txt"
kiln() { python3 -P -m kiln.cli "$@"; }

layouts=()
for layout in $LAYOUTS; do
  tp=${layout%x*}; pp=${layout#*x}
  if [ $((tp * pp)) -le "$gpus" ]; then layouts+=("$layout"); else echo "skip tp $tp pp $pp: $gpus GPUs" | tee -a "$OUT/parallel.txt"; fi
done

engine_for() {  # engine_for TP PP: the engine dir, built once
  local dir=/tmp/engines/$PRESET-tp$1-pp$2
  if [ ! -f "$dir/engine.json" ]; then
    /usr/bin/time -f "build tp $1 pp $2: %e s, %M KB" kiln build "$PRESET" --random-weights -o "$dir" \
      --max-model-len 4096 --tp "$1" --pp "$2" 2>&1 | tail -1 | tee -a "$OUT/parallel.txt" >&2
  fi
  echo "$dir"
}

for step in "$@"; do
  case $step in
    tests)
      timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider -m "" tests/parallel > "$OUT/parallel_tests.log" 2>&1
      tail -5 "$OUT/parallel_tests.log" | tee -a "$OUT/parallel.txt" ;;
    correctness)
      for layout in "${layouts[@]}"; do
        tp=${layout%x*}; pp=${layout#*x}
        engine=$(engine_for "$tp" "$pp")
        timeout 900 python3 -P - "$engine" "$tp" "$pp" "$OUT/tokens-tp$tp-pp$pp.json" <<'EOF' 2>&1 | tail -3 | tee -a "$OUT/parallel.txt"
import json, sys
from kiln import LLM, SamplingParams
engine, tp, pp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 32000 + 1 for j in range(16 + 8 * i)]} for i in range(16)]
with LLM(engine, tensor_parallel_size=tp, pipeline_parallel_size=pp) as llm:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
json.dump([o.outputs[0].token_ids for o in outs], open(out, "w"))
print(f"tp {tp} pp {pp}: 16 prompts x 64 greedy tokens written")
EOF
        if [ "$layout" != 1x1 ] && [ -f "$OUT/tokens-tp1-pp1.json" ]; then
          python3 - "$OUT/tokens-tp1-pp1.json" "$OUT/tokens-tp$tp-pp$pp.json" "$tp" "$pp" <<'EOF' | tee -a "$OUT/parallel.txt"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
first = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(a, b)]
print(f"tp {sys.argv[3]} pp {sys.argv[4]} vs tp 1: {same}/16 prompts identical; first difference at tokens {first}")
EOF
        fi
      done ;;
    latency)
      for layout in "${layouts[@]}"; do
        tp=${layout%x*}; pp=${layout#*x}
        engine=$(engine_for "$tp" "$pp")
        dir=/tmp/results-latency-$layout; rm -rf "$dir"
        timeout 900 python3 -P -m kiln.cli bench latency "$engine" --tp "$tp" --pp "$pp" --batch-sizes 1 \
          --ttft-lens 128 --new-tokens 200 --output-dir "$dir" > "/tmp/latency-$layout.log" 2>&1
        cp "$dir"/*.json "$OUT/latency-tp$tp-pp$pp.json" 2>/dev/null
        echo "== latency tp $tp pp $pp" | tee -a "$OUT/parallel.txt"
        grep -E "^(bs1_decode_tok_s|bs1_gpu_ms_per_step|bs1_cpu_ms_per_step|startup_s)|Error|error" "/tmp/latency-$layout.log" | tee -a "$OUT/parallel.txt"
      done ;;
    t128)
      for layout in "${layouts[@]}"; do
        tp=${layout%x*}; pp=${layout#*x}
        engine=$(engine_for "$tp" "$pp")
        dir=/tmp/results-t128-$layout; rm -rf "$dir"
        timeout 900 python3 -P -m kiln.cli bench throughput "$engine" --tp "$tp" --pp "$pp" --dataset random \
          --num-prompts ${NUM_PROMPTS:-3000} --input-len 128 --output-len 128 --output-dir "$dir" > "/tmp/t128-$layout.log" 2>&1
        cp "$dir"/*.json "$OUT/t128-tp$tp-pp$pp.json" 2>/dev/null
        echo "== t128 tp $tp pp $pp" | tee -a "$OUT/parallel.txt"
        grep -E "^(output_tok_s|startup_s)|Error|error" "/tmp/t128-$layout.log" | tee -a "$OUT/parallel.txt"
      done ;;
  esac
done
