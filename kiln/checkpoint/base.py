"""What every checkpoint reader returns: an HF-style config, tensors under HF names, and a
way to write the tokenizer files.

Readers know file formats, not models: they hand out tensors under the names the Hugging
Face implementation of the architecture uses (`model.layers.0.self_attn.q_proj.weight`), and
each model declaration maps those names onto its own (fused) parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

if TYPE_CHECKING:
    from kiln.checkpoint.quantized import CheckpointQuantization


class TensorSource(Protocol):
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, HF naming."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape without reading its data."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a CPU torch tensor (dequantised to float32 for quantised formats)."""


@dataclass
class Checkpoint:
    # config.json-style dict: "architectures", "model_type", "hidden_size", ... as the HF
    # config of that architecture would spell them.
    config: dict
    tensors: TensorSource
    # Writes tokenizer.json / tokenizer_config.json (with the chat template) /
    # generation_config.json into the given directory; None when the source has no tokenizer.
    save_tokenizer: Callable[[Path], None] | None
    # The source files whose sha256 goes into the engine manifest.
    source_files: list[Path] = field(default_factory=list)
    # generation_config.json-style dict (eos_token_id, bos_token_id, ...), possibly empty.
    generation_config: dict = field(default_factory=dict)
    # A checkpoint whose linears stay quantised (kiln/checkpoint/quantized.py): its scheme,
    # parameters and format; the tensors are then in that scheme's layout. None: full
    # precision (or dequantised on reading, as GGUF without --quant keep).
    quantization: "CheckpointQuantization | None" = None

    @property
    def quant_config(self):
        """The QuantConfig that keeps this checkpoint's quantisation (prequantized=True),
        or None for a full-precision checkpoint (`kiln build --quant keep`)."""
        if self.quantization is None:
            return None
        from kiln.quant.config import quant_config_from_manifest

        return quant_config_from_manifest(self.quantization.quant_section())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors.names():
            yield name, self.tensors.get(name)
