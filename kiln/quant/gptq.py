"""GPTQ at build (`kiln build --quant ... --calibration ... --gptq`): round a weight onto its
scheme's grid one input column at a time, and after each column spread its rounding error
over the columns not yet rounded so the layer's output on the calibration inputs moves as
little as possible (Frantar et al., "GPTQ", 2022; the OBQ update with a Cholesky factor).

    H = E[x xᵀ] + λ·mean(diag H)·I          the calibration inputs' second moment (in, in),
                                             λ = DAMPING, kiln/quant/calibration.py sums it
    for column j (largest diag H first):    q_j = round(w_j)  on the scheme's grid
                                             w_k -= (w_j − q_j) · U_jk / U_jj   for k after j
    (U: upper Cholesky factor of H⁻¹, processed in blocks of BLOCK columns)

The grid (scales, zero points) is computed from the weight before any update, by the same
function round-to-nearest uses ("static groups"): then every column, whatever order it is
rounded in, knows its grid, and the result is exactly representable, so the scheme stores
it with its usual code (kiln/quant/scheme_base.py). What GPTQ minimises is the linear's
error on the calibration inputs, ‖X Wᵀ − X Qᵀ‖², the same measure AWQ's search uses; for
int4-wo with AWQ it runs after the AWQ scales are folded (calibration.py rescales H).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kiln.errors import KilnError

# The attribute a linear keeps its calibration second moment E[x xᵀ] in (float32, (in, in))
# between calibration and process_weights_after_loading.
CALIBRATION_GRAM = "calibration_gram"
# The grid (scales, zero points) a weight rounded at calibration (kiln/quant/gptq_sequential.py)
# was rounded onto; process_weights_after_loading stores that weight with it.
CALIBRATION_GRID = "calibration_grid"
DAMPING = 0.01
BLOCK = 128
# Damping is raised by ×10 this many times when H is not positive definite in float32.
_DAMPING_RETRIES = 4

# columns (out, k) float32 and their input indices (k,) → the columns rounded onto the grid
RoundColumns = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def take_calibration_gram(layer: nn.Module) -> torch.Tensor | None:
    """The layer's calibration second moment (removed from the layer), or None."""
    gram = getattr(layer, CALIBRATION_GRAM, None)
    if gram is not None:
        delattr(layer, CALIBRATION_GRAM)
    return gram


def take_calibration_grid(layer: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The grid calibration rounded the layer's staged weight onto (removed), or None."""
    grid = getattr(layer, CALIBRATION_GRID, None)
    if grid is not None:
        delattr(layer, CALIBRATION_GRID)
    return grid


def asymmetric_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                      name: str = "a layer") -> torch.Tensor:
    """W* = W + W (C − H)(H + λ·mean(diag H)·I)⁻¹: the (out, in) weight that, applied to the
    quantised model's inputs x_q (H = E[x_q x_qᵀ]), best reproduces W applied to the
    full-precision model's x (C = E[x x_qᵀ]); float32. Only the correction is damped: damping
    all of W C H⁻¹ would shrink W along H's small directions (measured: KL ×50 on SmolLM2)."""
    in_features = weight.shape[1]
    if gram.shape != (in_features, in_features) or cross.shape != gram.shape:
        raise KilnError(f"GPTQ: {name} has {in_features} inputs but calibration moments of "
                        f"shapes {tuple(gram.shape)} and {tuple(cross.shape)}")
    gram, cross = gram.double(), cross.double()
    if not bool(torch.isfinite(gram).all() and torch.isfinite(cross).all()):
        raise KilnError(f"GPTQ: {name}'s calibration moments are not finite (inf or NaN "
                        f"activations in calibration); build without --gptq")
    correction = torch.linalg.solve(gram + _damping_term(gram, DAMPING), (cross - gram).T).T
    weight = weight.double()
    return (weight + weight @ correction).float()


def _damping_term(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """damping · mean(diag H) · I, in H's dtype and device (1 · I for an all-zero H)."""
    diagonal_mean = float(torch.diagonal(gram).mean()) or 1.0
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return damping * diagonal_mean * eye


def _inverse_cholesky(gram: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)⁻¹, float32; the damping grows until it works."""
    damping = DAMPING
    for _ in range(_DAMPING_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(gram + _damping_term(gram, damping))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damping *= 10
    raise KilnError(f"GPTQ: {name}'s calibration inputs give no usable second moment (not "
                    f"positive definite with damping {damping / 10:g}); build without --gptq "
                    f"or calibrate on more varied text")


def gptq_round(weight: torch.Tensor, gram: torch.Tensor, round_columns: RoundColumns,
               name: str = "a layer") -> torch.Tensor:
    """(out, in) float32 weight and its inputs' (in, in) second moment → the weight rounded
    column by column with GPTQ's error feedback, (out, in) float32, every value on the grid
    `round_columns` rounds onto. Runs on the weight's device."""
    weight = weight.float().clone()
    gram = gram.to(device=weight.device, dtype=torch.float32).clone()
    in_features = weight.shape[1]
    if gram.shape != (in_features, in_features):
        raise KilnError(f"GPTQ: {name} has {in_features} inputs but a calibration second moment "
                        f"of shape {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise KilnError(f"GPTQ: {name}'s calibration second moment is not finite (inf or NaN "
                        f"activations in calibration); build without --gptq")
    # An input calibration never saw (always 0) gets H_jj = 1: rounded to nearest, its error
    # spread nowhere (its weight still matters for inputs calibration did not cover).
    dead = torch.diagonal(gram) <= 0
    gram[dead, :] = 0
    gram[:, dead] = 0
    gram[dead, dead] = 1
    order = torch.argsort(torch.diagonal(gram), descending=True)  # GPTQ's "act order"
    weight = weight[:, order]
    upper = _inverse_cholesky(gram[order][:, order], name)
    rounded = torch.empty_like(weight)
    for start in range(0, in_features, BLOCK):
        end = min(start + BLOCK, in_features)
        block = weight[:, start:end].clone()
        errors = torch.empty_like(block)
        block_upper = upper[start:end, start:end]
        for j in range(end - start):
            column = block[:, j : j + 1]
            q = round_columns(column, order[start + j : start + j + 1])
            rounded[:, start + j : start + j + 1] = q
            error = (column - q) / block_upper[j, j]
            block[:, j:] -= error * block_upper[j : j + 1, j:]
            errors[:, j : j + 1] = error
        weight[:, end:] -= errors @ upper[start:end, end:]
    result = torch.empty_like(rounded)
    result[:, order] = rounded
    return result
