# Sourced by a device-call script (bash): the carried wheels (.whl, from
# fetch_device_wheels.sh) installed into /tmp/site and put on the path with this checkout,
# $OUT made, and $S, the call's summary file, started with the card's name.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
S="$OUT/summary.txt"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$S"
