"""GPTQ decoder layer by decoder layer, against the full-precision model's outputs
(`kiln build --calibration ... --gptq`; the rounding itself is kiln/quant/gptq.py).

Rounding every linear from statistics of the full-precision model ignores that, once built,
layer l reads what the *quantised* layers before it produced. Here each linear is rounded
after every linear that runs before it, from its inputs in the quantised model (x_q, what
it will read) paired token by token with its inputs in the full-precision model (x, what
the layer was trained on), minimising

    E ‖W x − Q x_q‖²  =  (Q − W*) H_q (Q − W*)ᵀ + const,      H_q = E[x_q x_qᵀ],
    W* = W C H_q⁻¹ = W + W (C − H_q) H_q⁻¹,                  C   = E[x x_qᵀ],

so GPTQ rounds the target W* (not W) with H_q: the error the earlier layers left in x_q is
what W* compensates, instead of being compounded (the asymmetric calibration of GPTAQ,
Li et al. 2025; with x_q = x it is plain GPTQ). On SmolLM2-135M, int8 per channel, 4,092
held-out tokens in transformers: mean KL 0.00127 (GPTQ on the full-precision model's
statistics) → 0.00120 (x_q only) → 0.00050 (the target too; benchmarks/BENCHMARKS.md).

Runs after calibration's first pass (scales, AWQ folding), on its device: per decoder layer
one forward of the full-precision layer (each linear's inputs and the layer's output, for
the next layer), then per linear, in the order the layer runs them, one forward of the
quantised layer up to that linear (its H_q and C) and its rounding, then one more forward
for the quantised layer's output. The layers before are replayed from their outputs
(each layer's `forward` answers the stored result), so a forward costs one layer. A rounded
weight is staged back in place of the full-precision one with its grid (CALIBRATION_GRID),
so later forwards read it and process_weights_after_loading stores it unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from kiln.layers.linear import LinearBase
from kiln.quant.gptq import CALIBRATION_GRID, asymmetric_target
from kiln.quant.quantize import FULL_PRECISION
from kiln.quant.scheme_base import BuildQuantizedLinearMethod

# forward(batch index) runs the model over that batch of calibration samples (its cache
# zeroed); the replays and hooks below decide how much of it runs.
RunBatch = Callable[[int], None]


class _Stop(Exception):
    """Raised by a hook once a forward has given what it was run for."""


def layer_linears(model: nn.Module) -> set[str]:
    """Prefixes of the staged linears inside decoder layers, which this pass rounds (none for
    a model without `stage_layers`; the rest, e.g. a quantised LM head, keep the first
    pass's statistics)."""
    layers = getattr(model.backbone, "stage_layers", None) or []
    return {m.prefix for layer in layers for m in _staged(layer)}


def _staged(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules()
            if isinstance(m, LinearBase) and getattr(m, FULL_PRECISION, None) is not None
            and isinstance(m.quant_method, BuildQuantizedLinearMethod)]


@contextlib.contextmanager
def _replaying(layers: list[nn.Module], outputs: list):
    """Each of `layers` answers outputs[batch] (the last one's stored output; the others'
    answers are ignored by the replay after them) instead of computing."""
    current = {"batch": 0}
    for layer in layers:
        layer.forward = lambda *args, **kwargs: outputs[current["batch"]]
    try:
        yield current
    finally:
        for layer in layers:
            del layer.forward


@contextlib.contextmanager
def _hooks(*handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_until_stopped(run_batch: RunBatch, batch: int) -> None:
    try:
        run_batch(batch)
    except _Stop:
        return
    raise AssertionError("the decoder layer's stop hook did not fire")  # pragma: no cover


@torch.no_grad()
def gptq_layer_by_layer(model: nn.Module, num_batches: int, run_batch: RunBatch,
                        progress: bool = True) -> None:
    layers = model.backbone.stage_layers
    full_carry: list = [None] * num_batches  # previous layer's output, full precision
    quant_carry: list = [None] * num_batches  # the same in the quantised model
    bar = tqdm(total=len(layers), desc="GPTQ", unit="layer", disable=not progress,
               file=sys.stderr)
    for index, layer in enumerate(layers):
        linears = _staged(layer)
        full_inputs, full_carry = _full_precision_pass(layers, index, linears, full_carry,
                                                       num_batches, run_batch)
        # A staged linear the forward never reached keeps no moments: rounded to nearest.
        ran = [m for m in linears if full_inputs[m]["order"] is not None]
        for linear in sorted(ran, key=lambda m: full_inputs[m]["order"]):
            gram, cross = _moments(layers, index, linear, full_inputs[linear]["rows"],
                                   quant_carry, num_batches, run_batch)
            weight = getattr(linear, FULL_PRECISION).float()
            target = asymmetric_target(weight.to(gram.device), gram, cross, linear.prefix)
            rounded, grid = linear.quant_method.round_with_gptq(linear, target, gram)
            setattr(linear, FULL_PRECISION, rounded.to(weight.device))
            setattr(linear, CALIBRATION_GRID, grid)
            del full_inputs[linear]
        quant_carry = _layer_outputs(layers, index, quant_carry, num_batches, run_batch)
        bar.update(1)
    bar.close()


def _full_precision_pass(layers, index, linears, carry, num_batches, run_batch):
    """Each staged linear's inputs of every batch (and the order they run in) and the layer's
    outputs, in the full-precision model."""
    inputs = {m: {"order": None, "rows": []} for m in linears}
    seen = []

    def record(module, args):
        entry = inputs[module]
        if entry["order"] is None:
            entry["order"] = len(seen)
            seen.append(module)
        entry["rows"].append(args[0].detach())

    handles = [m.register_forward_pre_hook(record) for m in linears]
    with _hooks(*handles):
        outputs = _layer_outputs(layers, index, carry, num_batches, run_batch)
    return inputs, outputs


def _layer_outputs(layers, index, carry, num_batches, run_batch) -> list:
    """Layer `index`'s output for every batch, the layers before it replayed from `carry`."""
    outputs: list = []

    def stop(module, args, output):
        outputs.append(output)
        raise _Stop

    with _replaying(layers[:index], carry) as current, \
            _hooks(layers[index].register_forward_hook(stop)):
        for batch in range(num_batches):
            current["batch"] = batch
            _run_until_stopped(run_batch, batch)
    return outputs


def _moments(layers, index, linear, full_rows, carry, num_batches, run_batch):
    """(H_q, C) of `linear` over every batch: its inputs in the quantised model (everything
    before it already rounded) against its full-precision inputs, float32."""
    sums = {"gram": None, "cross": None, "tokens": 0}

    def accumulate(module, args):
        quantised = args[0].detach().float()
        full = full_rows[current["batch"]].float()
        gram, cross = quantised.T @ quantised, full.T @ quantised
        sums["gram"] = gram if sums["gram"] is None else sums["gram"].add_(gram)
        sums["cross"] = cross if sums["cross"] is None else sums["cross"].add_(cross)
        sums["tokens"] += quantised.shape[0]
        raise _Stop

    with _replaying(layers[:index], carry) as current, \
            _hooks(linear.register_forward_pre_hook(accumulate)):
        for batch in range(num_batches):
            current["batch"] = batch
            _run_until_stopped(run_batch, batch)
    tokens = max(1, sums["tokens"])
    return sums["gram"].div_(tokens), sums["cross"].div_(tokens)
