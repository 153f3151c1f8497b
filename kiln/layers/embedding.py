"""Token embedding and the LM head (vocabulary-parallel slicing arrives with TP > 1)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import ops
from kiln.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) → (T, H)
        return nn.functional.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden (T, H) → logits (T, V) in float32. With tied embeddings it owns no weight and
    reads the embedding's, so the engine file stores the matrix once."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None):
        super().__init__()
        self.tied_to = tied_to
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear(hidden, self._weight(), None).float()

    def logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(N, H) → the (N, V) logits in the weight dtype, written into `out`: no float32
        copy (bf16 → fp32 is exact, so a consumer that needs fp32 converts losslessly)."""
        weight = self._weight()
        if hidden.shape[0] == 1 or not hidden.is_cuda:  # the GEMV path at one row
            return out.copy_(ops.linear(hidden, weight, None))
        return torch.mm(hidden, weight.t(), out=out)

    @property
    def vocab_size(self) -> int:
        return self._weight().shape[0]

    def _weight(self) -> torch.Tensor:
        return self.tied_to.weight if self.tied_to is not None else self.weight
