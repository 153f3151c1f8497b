"""Launches the paged decode kernel a few times on one batch, for Nsight Compute to read:
448 rows of 2-4 k context (2048/2048's FP8-KV decode batch) on an FP8 and a bf16 cache.
Usage (GPU machine):
    ncu --clock-control none --kernel-name regex:_paged_decode_kernel --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight ... python3 benchmarks/decode_attention_ncu.py fp8"""

from __future__ import annotations

import sys

import torch

from decode_attention_ab import CASES, HEAD_DIM, make_decode_batch
from kiln.kernels import attention

query, kv, table, seq_lens = make_decode_batch(CASES["448x2048-4096"], sys.argv[1])
ones = torch.ones((), dtype=torch.float32, device="cuda")
scales = {"k_scale": ones, "v_scale": ones} if sys.argv[1] == "fp8" else {}
for _ in range(4):
    attention.paged_decode_attention(query, kv, table, seq_lens, HEAD_DIM**-0.5, **scales)
torch.cuda.synchronize()
