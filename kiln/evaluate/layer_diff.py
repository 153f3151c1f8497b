"""`kiln verify`: where two runs of one prompt part ways, decoder layer by decoder layer.

(Not to be confused with kiln/compiler/verify.py, which checks an engine's *files* against
their sha256 — `kiln inspect` runs that.)

Two runs of the same prompt, with forward hooks on every decoder layer recording

    attn      the attention block's output (after o_proj)
    mlp       the MLP block's output (after down_proj)
    residual  the residual stream after the layer (what the next layer reads)

and a table of the relative error ‖a − b‖ / ‖b‖ of each against the reference run, with the
first layer whose error crosses the threshold. The runs are either two engines (a quantised
build --against its full-precision source) or one engine with its fast kernels against its
torch references (`--reference-kernels`: KILN_REFERENCE_KERNELS=1 for the second run, see
kiln/kernels/ops.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.evaluate.forward import TeacherForcedModel

POINTS = ("attn", "mlp", "residual")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a kiln CausalLM: the backbone's ModuleList (Llama's `layers`,
    GPT-2's `h`)."""
    for child in model.backbone.children():
        if isinstance(child, nn.ModuleList):
            return list(child)
    raise KilnError(f"{type(model).__name__}: no list of decoder layers found to hook")


def _attention_and_mlp(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    attention = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
    mlp = getattr(layer, "mlp", None)
    if attention is None or mlp is None:
        raise KilnError(f"{type(layer).__name__}: no attention or MLP block found to hook")
    return attention, mlp


def _residual_stream(output) -> torch.Tensor:
    """A decoder layer's output as the residual stream: Llama layers return (block output,
    residual before it) so the next norm can fuse the add; GPT-2 blocks return the sum."""
    if isinstance(output, tuple):
        hidden, residual = output
        return hidden if residual is None else hidden + residual
    return output


@contextmanager
def capture(model: nn.Module):
    """Records POINTS for every decoder layer while the context is open:
    records[(layer_index, point)] = float32 CPU copy."""
    records: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook(key, transform=lambda output: output):
        def record(module, inputs, output):
            records[key] = transform(output).detach().float().cpu()
        return record

    for index, layer in enumerate(decoder_layers(model)):
        attention, mlp = _attention_and_mlp(layer)
        handles.append(attention.register_forward_hook(hook((index, "attn"))))
        handles.append(mlp.register_forward_hook(hook((index, "mlp"))))
        handles.append(layer.register_forward_hook(hook((index, "residual"), _residual_stream)))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def reference_kernels(enabled: bool):
    previous = os.environ.get("KILN_REFERENCE_KERNELS")
    if enabled:
        os.environ["KILN_REFERENCE_KERNELS"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KILN_REFERENCE_KERNELS", None)
        else:
            os.environ["KILN_REFERENCE_KERNELS"] = previous


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


@dataclass(frozen=True)
class LayerDiff:
    layer: int
    errors: dict[str, float]  # point → relative error


@dataclass(frozen=True)
class VerifyReport:
    layers: list[LayerDiff]
    logits_error: float
    last_token_agrees: bool
    threshold: float
    engine_name: str
    reference_name: str
    num_tokens: int

    @property
    def first_diverged(self) -> tuple[int, str] | None:
        for diff in self.layers:
            for point in POINTS:
                if diff.errors[point] > self.threshold:
                    return diff.layer, point
        return None

    def format(self) -> str:
        lines = [f"{self.engine_name} against {self.reference_name}, {self.num_tokens} prompt "
                 f"tokens; relative error ‖a − b‖ / ‖b‖",
                 f"{'layer':>5}  {'attn':>10}  {'mlp':>10}  {'residual':>10}"]
        for diff in self.layers:
            cells = "  ".join(f"{diff.errors[p]:>10.2e}" for p in POINTS)
            over = any(diff.errors[p] > self.threshold for p in POINTS)
            lines.append(f"{diff.layer:>5}  {cells}{'  < over' if over else ''}")
        lines.append(f"logits     {self.logits_error:.2e}   last-token top-1 "
                     f"{'agrees' if self.last_token_agrees else 'DIFFERS'}")
        first = self.first_diverged
        if first is None:
            lines.append(f"no layer crosses the threshold {self.threshold:g}")
        else:
            lines.append(f"first layer over {self.threshold:g}: layer {first[0]} ({first[1]})")
        return "\n".join(lines)


def _run(model: TeacherForcedModel, token_ids: list[int], reference: bool):
    with reference_kernels(reference), capture(model.model) as records:
        logits = model.logits(token_ids)
    return dict(records), logits.cpu()


def compare_runs(
    engine: TeacherForcedModel,
    token_ids: list[int],
    *,
    against: TeacherForcedModel | None,
    threshold: float,
    engine_name: str,
    reference_name: str,
) -> VerifyReport:
    """`engine` (fast kernels) against `against` (fast kernels), or against its own run with
    the reference kernels when `against` is None."""
    values, logits = _run(engine, token_ids, reference=False)
    if against is None:
        references, reference_logits = _run(engine, token_ids, reference=True)
    else:
        references, reference_logits = _run(against, token_ids, reference=False)
    num_layers = len({layer for layer, _ in values})
    if len({layer for layer, _ in references}) != num_layers:
        raise KilnError(f"{engine_name} and {reference_name} have different numbers of layers")
    layers = [
        LayerDiff(i, {p: relative_error(values[(i, p)], references[(i, p)]) for p in POINTS})
        for i in range(num_layers)
    ]
    return VerifyReport(
        layers=layers,
        logits_error=relative_error(logits, reference_logits),
        last_token_agrees=bool(logits[-1].argmax() == reference_logits[-1].argmax()),
        threshold=threshold,
        engine_name=engine_name,
        reference_name=reference_name,
        num_tokens=len(token_ids),
    )


def run_verify(
    engine_dir: Path,
    *,
    against: Path | None,
    prompt: str,
    threshold: float,
    device: str | None,
    reference_kernels: bool,
    tokenizer: str | None = None,
) -> str:
    engine = TeacherForcedModel(engine_dir, device=device)
    token_ids = engine.text_tokenizer(tokenizer).encode(prompt, add_special_tokens=False)
    if not token_ids:
        raise KilnError("--prompt encodes to no tokens")
    token_ids = token_ids[: engine.max_window]
    reports = []
    if against is not None:
        other = TeacherForcedModel(against, device=device, dtype=_dtype_name(engine.dtype))
        if other.vocab_size != engine.vocab_size:
            raise KilnError(f"--against {against}: a different vocabulary; verify builds of one model")
        reports.append(compare_runs(engine, token_ids, against=other, threshold=threshold,
                                    engine_name=engine_dir.name, reference_name=against.name))
    if reference_kernels:
        note = "" if engine.device.type == "cuda" else (
            "\n(on the CPU every op runs its torch reference, so both runs are the same)")
        report = compare_runs(engine, token_ids, against=None, threshold=threshold,
                              engine_name=f"{engine_dir.name} fast kernels",
                              reference_name="its torch reference kernels")
        reports.append(report)
        return "\n\n".join(r.format() for r in reports) + note
    return "\n\n".join(r.format() for r in reports)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
