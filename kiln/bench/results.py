"""One JSON shape for every benchmark result, written to `results_dir()`:

    {"benchmark": "latency"|"throughput"|"serve", "gpu": <device name>, "model": ...,
     "dtype": ..., "kiln_version": ..., "torch_version": ..., "config": {...},
     "metrics": {<name>: <number>, ...}}
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from kiln.version import __version__

BENCH_DIR_ENV = "KILN_BENCH_DIR"
# Told in `kiln bench … --help` and the README: where results go without --output-dir.
DEFAULT_DIR_HELP = (f"directory for the result JSON (default: ${BENCH_DIR_ENV}, else "
                    f"benchmarks/results/ of the kiln checkout running, else ~/.cache/kiln/bench/)")


def results_dir() -> Path:
    """Where results go without --output-dir: $KILN_BENCH_DIR; else, when kiln runs from its
    source checkout, that checkout's benchmarks/results/ (where the committed results live);
    else ~/.cache/kiln/bench/. Never relative to the shell's working directory."""
    if os.environ.get(BENCH_DIR_ENV):
        return Path(os.environ[BENCH_DIR_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "benchmarks").is_dir():
        return checkout / "benchmarks" / "results"
    return Path.home() / ".cache" / "kiln" / "bench"


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(
    benchmark: str, *, device, model: str, dtype: str, config: dict, metrics: dict,
    output_dir: str | Path | None = None, extra: dict | None = None,
) -> Path:
    import torch

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
    output_dir = Path(output_dir) if output_dir is not None else results_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = output_dir / f"{benchmark}-{stamp}-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
