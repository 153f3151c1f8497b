"""One JSON shape for every benchmark result (benchmarks/results/*.json):

    {"benchmark": "latency"|"throughput"|"serve", "gpu": <device name>, "model": ...,
     "dtype": ..., "kiln_version": ..., "torch_version": ..., "config": {...},
     "metrics": {<name>: <number>, ...}}
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from kiln.version import __version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(
    benchmark: str, *, device: torch.device, model: str, dtype: str, config: dict, metrics: dict,
    output_dir: str | Path = "benchmarks/results", extra: dict | None = None,
) -> Path:
    result = {
        "benchmark": benchmark,
        "gpu": device_name(device),
        "model": model,
        "dtype": dtype,
        "kiln_version": __version__,
        "torch_version": torch.__version__,
        "config": config,
        "metrics": metrics,
        **(extra or {}),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"{benchmark}-{stamp}-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
