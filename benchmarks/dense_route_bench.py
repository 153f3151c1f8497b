"""Issue 14's prefill-attention target, timed as the engine runs it: the dense route
(`kiln/kernels/dense_prefill.py`: gather from the paged cache, cuDNN with log-sum-exp, merge)
as one function, with the KV heads repeated and with cuDNN's native grouped-query attention,
against torch SDPA's cuDNN backend on keys and values already laid out (the issue's bar:
≥ 80 % of its TFLOP/s at 8k-32k tokens), and kiln's paged Triton kernel. Llama-3.1-8B's
shape (32 query heads, 8 KV heads, head_dim 128, bf16, block size 16); TFLOP/s of the causal
half as in prefill_attention_vs_sdpa.py.

Usage (GPU machine): python3 benchmarks/dense_route_bench.py [--out DIR]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from prefill_attention_vs_sdpa import HEAD_DIM, gather_dense, paged_case, time_ms  # noqa: E402

from kiln.kernels import attention, dense_prefill  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    scale = HEAD_DIM**-0.5
    native = dense_prefill.cudnn_native_gqa(0, torch.bfloat16, HEAD_DIM)
    report = {"gpu": torch.cuda.get_device_name(), "torch_version": torch.__version__,
              "cudnn_native_gqa": native, "cases": {}}
    print(f"cuDNN native GQA: {native}")
    for name, (q_len, context) in {"8k": (8192, 0), "16k": (16384, 0), "32k": (32768, 0),
                                   "32k_last_chunk": (8192, 24576)}.items():
        query, kv, table, qsl, seq, flop = paged_case(q_len, context)
        seq_lens, starts = [q_len + context], [0, q_len]
        row = {"flop": flop}
        paged = attention.paged_prefill_attention(query, kv, table, qsl, seq, scale)
        row["triton_tflops"] = flop / time_ms(
            lambda: attention.paged_prefill_attention(query, kv, table, qsl, seq, scale)) / 1e9
        if context == 0:  # the bar: SDPA's cuDNN backend, keys and values laid out already
            k, v = gather_dense(kv, table, q_len)
            q = query.transpose(0, 1)[None]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["cudnn_sdpa_tflops"] = flop / time_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)) / 1e9
            del k, v
        for variant, grouped in (("route_repeated", False), ("route_native_gqa", True)):
            if grouped and not native:
                continue
            route = lambda: dense_prefill.dense_prefill_attention(  # noqa: E731
                query, kv, table[:1], starts, seq_lens, scale, native_gqa=grouped)
            row[f"{variant}_tflops"] = flop / time_ms(route) / 1e9
            row[f"{variant}_max_err"] = float((route().float() - paged.float()).abs().max())
        bar = row.get("cudnn_sdpa_tflops")  # fresh prompts only: a chunk has no one-call twin
        for key in ("triton_tflops", "route_repeated_tflops", "route_native_gqa_tflops"):
            if key in row and bar:
                row[key.replace("_tflops", "_pct_of_sdpa")] = 100 * row[key] / bar
        report["cases"][name] = row
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                     if k != "flop"}, flush=True)
        del query, kv, paged
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dense-route-bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
