"""How the E4M3 decode dots' roundings move quality, emulated on the CPU: the torch reference of
paged attention patched to round the query (per token and head, scaled so its largest element
is 448) and p (times 256) to E4M3 as `_paged_decode_e4m3_kernel` does, for the engine with an
FP8 cache only, then `kiln eval --compare`'s figures against the reference engine. A variant is
QUERY,P with each of none / e4m3 (rounded once) / hilo (rounded, plus the rounding of the rest).
The prefill path suffices: the rounding is per query token, whichever kernel reads the cache.

    python benchmarks/fp8_kv_dot_emulation.py --reference /tmp/smol/bf16 --engine /tmp/smol/kv8 \
        --num-tokens 4000 none,none e4m3,e4m3 e4m3,none none,e4m3 hilo,e4m3
"""
import argparse
import dataclasses
import json
import time

import torch

import kiln.kernels.ops as ops
from kiln.checkpoint.tokenizer import load_tokenizer
from kiln.evaluate.corpus import SHAREGPT, documents, token_stream
from kiln.evaluate.forward import TeacherForcedModel
from kiln.evaluate.perplexity import evaluate_many
from kiln.kernels import attention

# The roundings in force: "q" and "p", each "none", "e4m3" or "hilo".
VARIANT = {"q": "none", "p": "none"}
ROUNDINGS = ("none", "e4m3", "hilo")


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-attention.FP8_MAX, attention.FP8_MAX).to(attention.FP8_KV_DTYPE).float()


def rounded(x: torch.Tensor, how: str) -> torch.Tensor:
    """x (already in E4M3's range) as the kernel's dot would see it."""
    if how not in ROUNDINGS:
        raise SystemExit(f"rounding {how!r}: expected one of {', '.join(ROUNDINGS)}")
    if how == "none":
        return x
    first = to_e4m3(x)
    return first if how == "e4m3" else first + to_e4m3(x - first)


def emulated_attention(query, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                       sliding_window=None, k_scale=None, v_scale=None):
    """paged_attention_reference with the E4M3 kernel's roundings, on an FP8 cache only."""
    if kv_cache.element_size() != 1 or VARIANT == {"q": "none", "p": "none"}:
        return REFERENCE(query, kv_cache, block_tables, query_start_loc, seq_lens, scale,
                         sliding_window, k_scale, v_scale)
    if sliding_window is not None:
        raise SystemExit("the emulation does not do sliding windows")
    out = torch.empty_like(query)
    for seq, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[seq], query_start_loc[seq + 1]
        if end == start:
            continue
        k, v = attention.context_kv(kv_cache, block_tables, seq, seq_len, query.shape[1],
                                    k_scale, v_scale)
        q = query[start:end].float()
        q_scale = q.abs().amax(-1, keepdim=True).clamp_min(1e-30) / attention.FP8_MAX
        q = rounded(q / q_scale, VARIANT["q"]) * q_scale
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(seq_len).unsqueeze(0) > q_pos, float("-inf"))
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        total = p.sum(-1, keepdim=True)  # from p before rounding, as the kernel's l
        p_rounded = rounded(p * attention.E4M3_P_SCALE, VARIANT["p"]) / attention.E4M3_P_SCALE
        out[start:end] = (torch.einsum("hqk,khd->qhd", p_rounded, v)
                          / total.permute(1, 0, 2)).to(query.dtype)
    return out


REFERENCE = ops.paged_attention_reference
ops.paged_attention_reference = emulated_attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--engine", required=True, help="the build with an FP8 KV cache")
    parser.add_argument("--num-tokens", type=int, default=4000)
    parser.add_argument("--dataset-path", default=SHAREGPT)
    parser.add_argument("variants", nargs="+", metavar="QUERY,P")
    args = parser.parse_args()
    reference = TeacherForcedModel(args.reference, max_window=1024)
    engine = TeacherForcedModel(args.engine, max_window=1024)
    tokenizer = load_tokenizer(reference.engine.tokenizer_dir)
    token_ids = token_stream(tokenizer, documents(args.dataset_path, "evaluation"),
                             args.num_tokens + 1)
    for variant in args.variants:
        VARIANT["q"], VARIANT["p"] = variant.split(",")
        started = time.time()
        results = evaluate_many(reference, {"fp8_kv": engine}, token_ids, window=1024,
                                num_tokens=args.num_tokens, progress=False)
        print(variant, json.dumps(dataclasses.asdict(results["fp8_kv"].compare)),
              f"{time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
