"""Suite-wide set-up that must run before any test module imports kiln (and so triton)."""

import os

import torch
from hypothesis import settings

# Triton kernels run on a CPU-only machine through Triton's interpreter, which must be chosen
# before triton is first imported (it decorates its own standard library at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run unless asked to explore: a test that
# fails one run in fifty would fail a new user's first try, and CI must be deterministic.
# KILN_HYPOTHESIS_PROFILE=explore draws new examples each run (local bug hunting).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("KILN_HYPOTHESIS_PROFILE", "ci"))
