"""AWQ (activation-aware weight quantisation) for int4-wo and int8-wo at build: per group of
linears that read one input, scale the weight's input columns by s = mean|x|^α before
rounding and fold 1/s into whatever produces that input, so the full-precision model is
unchanged but the columns that meet large activations lose less to rounding. (Not for fp8:
a float format's rounding error is relative to each value, so a column scaled by s and its
input by 1/s leave the product's error where it was; the same holds for fp8 activations.)

    group (Llama-family layer)       input                         1/s folded into
    qkv_proj                          input_layernorm(h)            input_layernorm.weight
    gate_up_proj                      post_attention_layernorm(h)   post_attention_layernorm.weight
    down_proj                         silu(gate) · up               the up rows of gate_up_proj
    o_proj                            attention output              the v rows of qkv_proj

o_proj's input channel (head h, dim d) is a mix of v channel (kv head of h, d): with grouped
KV heads one s per KV channel is shared by the query heads that read it (the statistics of
those heads are averaged), so the fold into v stays exact.

α is searched on a grid in [0, 1) (α = 0 is plain round-to-nearest, so AWQ never does
worse on its own measure): for each α, quantise-dequantise W·diag(s) by the layer's own
scheme (its grid and rounding: group size, zero points), and measure
‖X Wᵀ − X (Q(W·s)/s)ᵀ‖² on the calibration inputs X of that linear
(kiln/quant/calibration.py samples AWQ_ROWS of them). s is normalised by
√(max·min) as in the AWQ paper's code. Everything runs batched on the device the
calibration ran on (the GPU when there is one).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import KilnError
from kiln.quant.quantize import FULL_PRECISION

GRID = 20  # α = 0, 0.05, ..., 0.95
# The schemes whose --calibration builds run AWQ (integer grids, where a column's rounding
# error is a fraction of its group's step rather than of each value).
AWQ_SCHEMES = ("int4-wo", "int8-wo")


def runs_awq(model: nn.Module, scheme: str, gptq: bool = False) -> bool:
    """Whether a calibrating build of `model` runs AWQ: int4-wo always without --gptq
    (apply_awq refuses a model it cannot fold into: at 4 bits round-to-nearest is the option
    AWQ must beat, and the user asked for AWQ); int8-wo where it folds (the Llama family),
    else its weights are rounded as without AWQ and the calibration still measures the rest
    (KV scales). Never for a checkpoint kept quantised (--quant keep: its weights are rounded
    already, calibration measures only KV scales). Neither with --gptq, whose layer-by-layer
    rounding does better alone (SmolLM2, 50,000 held-out tokens, mean KL without AWQ / with:
    int8-wo 0.00067 / 0.00083, int4-wo g64 0.0698 / 0.0851; BENCHMARKS.md)."""
    if gptq or getattr(model.quant_config, "prequantized", False):
        return False
    if scheme == "int4-wo":
        return True
    return scheme in AWQ_SCHEMES and _decoder_layers(model) is not None


def _decoder_layers(model: nn.Module):
    """The Llama-family decoder layers AWQ folds into, or None for another architecture."""
    return getattr(model.backbone, "layers", None)


# (out, in) float32 weight → the same rounded onto its own grid and dequantised
FakeQuantize = Callable[[torch.Tensor], torch.Tensor]


def search_scales(
    weight: torch.Tensor,  # (out, in) float32
    inputs: torch.Tensor,  # (n, in) float32 calibration rows
    mean_abs: torch.Tensor,  # (in,) mean |x| per input channel
    fake_quantize: FakeQuantize,
    shared: torch.Tensor | None = None,  # (in,) → channel group ids whose s must be equal
) -> tuple[torch.Tensor, float, float, float]:
    """(s (in,), best α, its output MSE, the MSE of plain RTN (α = 0))."""
    reference = inputs @ weight.T  # (n, out)
    stat = mean_abs.float().clamp(min=1e-8)
    if shared is not None:  # average over the channels that must share one s
        sums = torch.zeros(int(shared.max()) + 1, device=stat.device).index_add_(0, shared, stat)
        counts = torch.bincount(shared).float()
        stat = (sums / counts)[shared]
    best = (torch.ones_like(stat), 0.0, float("inf"))
    rtn_error = float("inf")
    for step in range(GRID):
        alpha = step / GRID
        s = stat.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        dequantized = fake_quantize(weight * s[None, :]) / s[None, :]
        error = float((inputs @ dequantized.T - reference).pow(2).mean())
        if step == 0:
            rtn_error = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], best[2], rtn_error


def _staged(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, FULL_PRECISION, None)


def _scale_columns(layer: nn.Module, s: torch.Tensor) -> None:
    """W·diag(s): its input becomes x / s (AWQ never runs with --gptq, so no second moment
    of the inputs needs to follow)."""
    staged = _staged(layer)
    staged.mul_(s.to(staged.dtype)[None, :])


def _scale_rows(layer: nn.Module, rows: slice, s: torch.Tensor) -> None:
    """Divide rows `rows` of the layer's output (weight and bias) by s."""
    staged = _staged(layer)
    staged[rows].div_(s.to(staged.dtype)[:, None])
    if layer.bias is not None:
        layer.bias.data[rows].div_(s.to(layer.bias.dtype))


def apply_awq(model: nn.Module, linears: dict, *, progress: bool = True) -> dict[str, float]:
    """Search and fold AWQ scales in every decoder layer of a Llama-family model whose
    linears are staged for an AWQ_SCHEMES scheme. Returns, per layer prefix, the chosen α
    (for logs and tests)."""
    layers = _decoder_layers(model)
    if layers is None:
        raise KilnError(f"AWQ needs a Llama-family model; {model.config.architecture} is not one "
                        f"(build {model.quant_config.scheme} without --calibration, or with "
                        f"--gptq, which rounds without AWQ)")
    chosen: dict[str, float] = {}
    bar = tqdm(layers, desc="AWQ search", unit="layer", disable=not progress, file=sys.stderr)

    def search(layer: nn.Module, shared: torch.Tensor | None = None):
        stats = linears.get(layer.prefix)
        weight = _staged(layer)
        if stats is None or weight is None:
            return None  # an unquantised layer
        s, alpha, _, _ = search_scales(weight.float(), stats.sample(), stats.mean_abs,
                                       layer.quant_method.fake_quantize_for(layer), shared)
        chosen[layer.prefix] = alpha
        return s

    for decoder in bar:
        attention, mlp = decoder.self_attn, decoder.mlp
        qkv, o = attention.qkv_proj, attention.o_proj
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        # qkv and gate_up read a norm's output: scale columns, divide the norm's weight.
        for linear, norm in ((qkv, decoder.input_layernorm),
                             (gate_up, decoder.post_attention_layernorm)):
            s = search(linear)
            if s is not None:
                _scale_columns(linear, s)
                norm.weight.data.div_(s.to(norm.weight.dtype))
        # down reads silu(gate) · up: dividing up's rows divides its input.
        s = search(down)
        if s is not None and _staged(gate_up) is not None:
            _scale_columns(down, s)
            intermediate = down.input_size
            _scale_rows(gate_up, slice(intermediate, 2 * intermediate), s)
        # o reads the attention output, linear in v: one s per v channel, shared by the
        # query heads of a KV group.
        heads, kv_heads, head_dim = qkv.num_heads, qkv.num_kv_heads, qkv.head_dim
        channel = torch.arange(heads * head_dim, device=_device_of(o))
        kv_channel = (channel // head_dim) // (heads // kv_heads) * head_dim + channel % head_dim
        s = search(o, shared=kv_channel)
        if s is not None and _staged(qkv) is not None:
            _scale_columns(o, s)
            s_kv = torch.ones(kv_heads * head_dim, device=s.device, dtype=s.dtype)
            s_kv[kv_channel] = s
            v_start = (heads + kv_heads) * head_dim
            _scale_rows(qkv, slice(v_start, v_start + kv_heads * head_dim), s_kv)
    bar.close()
    return chosen


def _device_of(layer: nn.Module) -> torch.device:
    staged = _staged(layer)
    return staged.device if staged is not None else torch.device("cpu")
