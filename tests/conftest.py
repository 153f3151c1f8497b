"""Suite-wide set-up that must run before any test module imports kiln (and so triton)."""

import os

import torch

# Triton kernels run on a CPU-only machine through Triton's interpreter, which must be chosen
# before triton is first imported (it decorates its own standard library at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
