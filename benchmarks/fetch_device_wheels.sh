#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels the GPU machine lacks for kiln, at the
# versions installed here, for its Python 3.12: the device scripts (gpu_run.sh, ab_run.sh,
# quant_run.sh, ...) install .whl/*.whl into /tmp/site first. Carry .whl with the call.
# fastapi >= 0.16x imports opentelemetry-api; the image has the rest (its package list:
# the device library's KINDS.md).
# Usage (here, in the repository root, with kiln's environment active):
#   bash benchmarks/fetch_device_wheels.sh
set -euo pipefail
packages=(annotated-types fastapi gguf opentelemetry-api pydantic pydantic-core starlette
          typing-inspection uvicorn)
pins=()
for name in "${packages[@]}"; do
  version=$(python3 -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$version" ] || { echo "$name is not installed here: install kiln first" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls .whl
