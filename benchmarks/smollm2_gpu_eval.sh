#!/usr/bin/env bash
# SmolLM2 quality on the GPU machine: the real default model's bf16 and FP8-KV engines built
# there, then `kiln eval --compare` on the held-out text through either path. The GGUF (98 MB)
# is past one call's 64 MiB carry, so it travels in two halves over two calls while the
# machine stays warm (call 2 must follow call 1 within the device's idle release, ~30 s).
#
# Here, once (ignored dirs: .smol, .smol1, .eval-text):
#   bash benchmarks/smollm2_gpu_eval.sh prepare
# Device call 1 (carry .smol and .whl), anything else GPU-side may follow in the same call:
#   bash benchmarks/smollm2_gpu_eval.sh part1
# Device call 2 (carry .smol1, .whl, .eval-text; add any A/B tree, e.g. .ab-base):
#   EVALS="decode-fp16:.:fp16:decode decode-e4m3:.:e4m3:decode" bash benchmarks/smollm2_gpu_eval.sh part2
# Each EVALS item is LABEL:TREE:KILN_FP8_KV_DOT:PATH (TREE first on PYTHONPATH); each writes
# $OUT/eval-LABEL.json and prints perplexity, delta %, agreement and KL (NUM_TOKENS: 50,000).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
engines=${ENGINES_DIR:-/tmp/smollm2-engines}  # rebuilt (--force) on every part2
case ${1:-} in
  prepare)
    gguf=$(python3 -c "from kiln.checkpoint.gguf import default_model_path; print(default_model_path())")
    mkdir -p .smol .smol1 .eval-text
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    split -b "$half" -d -a 2 "$gguf" /tmp/smol.
    mv /tmp/smol.00 .smol/ && mv /tmp/smol.01 .smol1/
    python3 - <<'PY'
import itertools, json
from kiln.evaluate.corpus import sharegpt_replies
for split, count, name in [("evaluation", 282, "eval"), ("calibration", 600, "calib")]:
    with open(f".eval-text/sharegpt-{name}-replies.jsonl", "w") as file:
        for text in itertools.islice(sharegpt_replies(split), count):
            file.write(json.dumps({"text": text}) + "\n")
PY
    ls -l .smol .smol1 .eval-text ;;
  part1)
    cp .smol/smol.00 /tmp/smol.00 && ls -l /tmp/smol.00 ;;
  part2)
    cat /tmp/smol.00 .smol1/smol.01 > /tmp/smol.gguf || exit 1
    mkdir -p "$OUT"
    # SKIP_INSTALL=1: the carried wheels are installed already (or, here, not needed).
    [ "${SKIP_INSTALL:-0}" = 1 ] || [ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    kiln() { PYTHONPATH=".:/tmp/site" python3 -P -m kiln.cli "$@"; }
    ( kiln build /tmp/smol.gguf -o "$engines/bf16" --force > "$OUT/build-bf16.log" 2>&1 ) &
    ( kiln build /tmp/smol.gguf -o "$engines/kv8" --force --kv-cache-dtype fp8 \
        --calibration .eval-text/sharegpt-calib-replies.jsonl > "$OUT/build-kv8.log" 2>&1 ) &
    wait
    tail -qn1 "$OUT"/build-*.log
    for item in ${EVALS:-decode-fp16:.:fp16:decode}; do
      IFS=: read -r label tree mode path <<<"$item"
      KILN_FP8_KV_DOT=$mode PYTHONPATH="$tree:/tmp/site" timeout ${EVAL_TIMEOUT:-150} \
        python3 -P -m kiln.cli eval "$engines/kv8" --compare "$engines/bf16" --path "$path" \
        --num-tokens ${NUM_TOKENS:-50000} \
        --dataset-path .eval-text/sharegpt-eval-replies.jsonl --no-progress \
        --output-json "$OUT/eval-$label.json" > "$OUT/eval-$label.log" 2>&1
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); c=d['compare']; print(sys.argv[2], d['perplexity'], round(c['ppl_delta_pct'], 3), round(c['top1_agreement'], 4), round(c['mean_kl'], 5))" \
        "$OUT/eval-$label.json" "$label" || tail -3 "$OUT/eval-$label.log"
    done ;;
  *) echo "usage: $0 prepare|part1|part2" >&2; exit 2 ;;
esac
