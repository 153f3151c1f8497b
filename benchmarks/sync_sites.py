"""Where the engine loop makes the host wait on the GPU outside collect(): runs `kiln bench
throughput ARGS...` with torch's CUDA sync debug mode on for the timed run only, and prints
each synchronising call site (the innermost kiln frames) with the steps it fired in.

    python benchmarks/sync_sites.py ENGINE --dataset random --num-prompts 3000 \
        --input-len 128 --output-len 128

(The 128/128 ramp-up steps of ~257-512 rows read host ≈ GPU time: a wait that collect()
does not count. Expected sites: collect()'s own wait; anything else is the suspect.)
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings

import torch

import kiln.bench.throughput as throughput
from kiln.cli import main

sites: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
step_index = [0]


def record(message, category, filename, lineno, file=None, line=None):
    frames = [f"{frame.filename.split('/kiln/')[-1]}:{frame.lineno} {frame.name}"
              for frame in traceback.extract_stack()[:-1] if "/kiln/" in frame.filename]
    sites[tuple(frames[-3:])].append(step_index[0])


original_run_batched = throughput.run_batched


def run_batched(engine, requests, progress=None, structured=None):
    original_step = engine.step

    def step():
        step_index[0] += 1
        return original_step()

    engine.step = step
    warnings.showwarning = record
    warnings.simplefilter("always")
    cuda = engine.device.type == "cuda"  # (on the CPU: nothing to find; the script runs)
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        return original_run_batched(engine, requests, progress, structured)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        engine.step = original_step


throughput.run_batched = run_batched
code = main(["bench", "throughput", *sys.argv[1:]])
print(f"== synchronising sites over {step_index[0]} steps (step numbers from 1)")
for frames, steps in sorted(sites.items(), key=lambda item: -len(set(item[1]))):
    distinct = sorted(set(steps))
    shown = distinct[:12]
    print(f"{len(steps):6d} calls in {len(distinct):4d} steps (first {shown}): "
          + " <- ".join(reversed(frames)))
sys.exit(code)
