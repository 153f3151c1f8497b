"""The fastest int_gemv tiling per format from quant_bench.json (QUANT_BENCH_INT_GRID runs):
the one with the least time over one decoder layer's four linears (q|k|v, o, gate|up, down),
printed as a KILN_INT_GEMV_TILING value ("int4=64x32x2,int8=8x128x1"), with each candidate's
layer sum on stderr.

Usage: python benchmarks/int_gemv_pick.py DIR/quant_bench.json
"""

from __future__ import annotations

import collections
import json
import sys


def main() -> None:
    rows = json.load(open(sys.argv[1]))["results"]
    layer_us = collections.defaultdict(lambda: collections.defaultdict(float))
    shapes = collections.defaultdict(set)
    for row in rows:
        parts = row["path"].split("_")  # int4_gemv_n64_t32_w2
        if len(parts) != 5 or parts[1] != "gemv" or "us" not in row:
            continue
        tag = "x".join(part[1:] for part in parts[2:])
        layer_us[parts[0]][tag] += row["us"]
        shapes[parts[0], tag].add(row["shape"])
    picks = []
    for fmt, sums in sorted(layer_us.items()):
        complete = {tag: us for tag, us in sums.items() if len(shapes[fmt, tag]) == 4}
        for tag, us in sorted(complete.items(), key=lambda item: item[1]):
            print(f"{fmt} {tag:10} {us:8.1f} us per layer", file=sys.stderr)
        if complete:
            picks.append(f"{fmt}={min(complete, key=complete.get)}")
    print(",".join(picks))


if __name__ == "__main__":
    main()
