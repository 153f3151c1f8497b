"""Python's cyclic garbage collector in a process that runs an engine loop.

Reference counting frees everything kiln allocates per step; the collector only exists for
reference cycles, and in the engine loop it finds none (benchmarks/host_profile.py counts its
passes: 0 objects freed in ~30,000 passes over 30,000 requests). Each pass still walks every
tracked object of its generations, and Python's default thresholds (700, 10, 10) run a
young pass every 700 net allocations and a full one, over every live request, as often as
every 100 young ones. SGLang (`--gc-threshold`), lmdeploy and ROCm's ATOM raise them for the
same reason; freezing the heap alone makes full passes more frequent (Python runs one once
the objects promoted since the last reach a quarter of the oldest generation, which a
freeze empties).

Measured on this project's CPU (host_profile, 30,000 requests of 128 + 128 tokens at 1,024
rows, the model stubbed): 13.0 ms a step with Python's thresholds (gen0 27,462 passes 0.9 s,
gen1 2,496 0.4 s, gen2 227 0.4 s, start-up and batch frozen) against 12.4 with (20000, 50,
50) and nothing frozen (0 passes of any kind).
"""

from __future__ import annotations

import gc
import os

# (gen0, gen1, gen2): a young pass every 20,000 net allocations, an older one every 50 young
# ones, a full one every 50 of those.
ENGINE_THRESHOLDS = (20000, 50, 50)
THRESHOLD_ENV = "KILN_GC_THRESHOLD"


def engine_thresholds() -> tuple[int, int, int] | None:
    """The thresholds an engine process runs with: ENGINE_THRESHOLDS, or KILN_GC_THRESHOLD
    ("20000,50,50"; "python" keeps Python's own: None). A malformed value is an error naming
    the variable."""
    value = os.environ.get(THRESHOLD_ENV, "").strip()
    if not value:
        return ENGINE_THRESHOLDS
    if value == "python":
        return None
    parts = [part.strip() for part in value.split(",")]
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(
            f"{THRESHOLD_ENV} must be three whole numbers, the collector's generation 0, 1 and "
            f"2 thresholds such as 20000,50,50 (0 first turns the collector off), or 'python' "
            f"for Python's own; got {value!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def tune_for_engine() -> tuple[int, int, int]:
    """Move the start-up heap (model, tokenizer, caches) out of the collector's sight and set
    the engine's thresholds; returns the thresholds before, for restore()."""
    thresholds = engine_thresholds()
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    return previous


def restore(previous: tuple[int, int, int] | None) -> None:
    """Undo tune_for_engine: the frozen heap back in the collector's sight (the model's
    reference cycles, parameters holding bound weight loaders, need it), one full pass, the
    thresholds as they were (None: never tuned, so only the pass)."""
    gc.unfreeze()
    gc.collect()
    if previous is not None:
        gc.set_threshold(*previous)
