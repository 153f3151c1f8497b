#!/usr/bin/env bash
# One device call for the speculative-decoding figures (BENCHMARKS.md, "Speculative
# decoding"): build a random Llama-3.1-8B engine, derive the aligned draft (first 2 layers)
# and zero the target's upper o_proj/down_proj, then benchmarks/spec_bench.py.
# Usage on the GPU machine (from the repository root, wheels carried in .whl):
#   bash benchmarks/spec_run.sh            results in $OUT (default /tmp/out)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../../.whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
target=/tmp/spec-target8b
draft=/tmp/spec-draft8b
[ -f $target/engine.json ] || python3 -P -m kiln.cli build llama-3.1-8b --random-weights -o $target --max-model-len 4096 2>&1 | tail -1
python3 -P benchmarks/spec_aligned_engines.py $target $draft --draft-layers 2 || exit 1
[ -n "${SPEC_GPU_TESTS:-}" ] && timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_spec_gpu.py 2>&1 | tail -5
timeout ${SPEC_TIMEOUT:-400} python3 -P benchmarks/spec_bench.py $target $draft --out "$OUT" ${SPEC_ARGS:-} 2>&1 | grep -v Warn | tail -30
