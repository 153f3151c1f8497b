"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of tp and each rank holds one contiguous shard of
rows (the padding rows, past the real vocabulary, are zero):

    rank r holds vocabulary ids [r * shard, (r + 1) * shard),   shard = padded_vocab / tp

The embedding looks up the ids in its shard, zeroes the rest and all-reduces; the LM head
computes its shard's logits and all-gathers them along the vocabulary. At tp 1 both are the
plain lookup and matmul, with no masking and no collective.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.errors import CheckpointError
from kiln.kernels import ops
from kiln.layers.linear import LinearBase
from kiln.layers.loading import CheckpointLoadable
from kiln.parallel.state import ParallelState
from kiln.quant.base import make_parameter
from kiln.quant.config import QuantConfig
from kiln.quant.placement import ShardPlacement
from kiln.quant.placement import WEIGHT_LAYOUT


class VocabShard:
    """This rank's rows of a (vocab_size, hidden_size) matrix split by vocabulary."""

    def __init__(self, vocab_size: int, parallel: ParallelState) -> None:
        self.vocab_size = vocab_size  # the real vocabulary, not padded
        tp = parallel.tp_size
        self.padded_vocab_size = -(-vocab_size // tp) * tp
        self.shard_size = self.padded_vocab_size // tp
        self.start = parallel.tp_rank * self.shard_size
        self.end = self.start + self.shard_size
        # Real (not padding) rows in this shard.
        self.num_real_rows = max(0, min(self.end, vocab_size) - self.start)

    def load_rows(self, weight: torch.Tensor, loaded: torch.Tensor, source_name: str) -> None:
        """This shard's rows of the whole (vocab_size, hidden) checkpoint tensor into
        `weight`; padding rows become zero."""
        expected = (self.vocab_size, weight.shape[1])
        if tuple(loaded.shape) != expected:
            raise CheckpointError(
                f"tensor {source_name!r} has shape {tuple(loaded.shape)}, expected {expected}"
            )
        rows = self.num_real_rows
        if rows:  # none when the whole shard is padding (a tiny vocabulary over many ranks)
            weight.data[:rows].copy_(loaded.narrow(0, self.start, rows))
        weight.data[rows:].zero_()


class VocabParallelEmbedding(nn.Module, CheckpointLoadable):
    def __init__(
        self, vocab_size: int, hidden_size: int, *, parallel: ParallelState, prefix: str
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.prefix = prefix
        self.shard = VocabShard(vocab_size, parallel)
        self.weight = make_parameter((self.shard.shard_size, hidden_size), WEIGHT_LAYOUT)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) → (T, H)
        if self.parallel.tp_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.shard.start) & (input_ids < self.shard.end)  # (T,)
        local_ids = torch.where(in_shard, input_ids - self.shard.start, 0)  # (T,)
        hidden = nn.functional.embedding(local_ids, self.weight)  # (T, H)
        hidden = hidden.masked_fill(~in_shard.unsqueeze(-1), 0)
        return self.parallel.all_reduce(hidden)

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        return ("weight",)

    def load_checkpoint_tensor(
        self, name: str, loaded: torch.Tensor, *, part_id=None, source_name: str
    ) -> None:
        self.shard.load_rows(self.weight, loaded, source_name)


class ParallelLMHead(nn.Module, CheckpointLoadable):
    """hidden (T, H) → logits (T, V) in float32. With tied embeddings it owns no weight and
    reads the embedding's (sharded the same way), so the engine file stores the matrix once."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tied_to: VocabParallelEmbedding | None,
        parallel: ParallelState,
        prefix: str,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.prefix = prefix
        self.shard = VocabShard(vocab_size, parallel)
        self.tied_to = tied_to
        if tied_to is None:
            self.weight = make_parameter((self.shard.shard_size, hidden_size), WEIGHT_LAYOUT)

    @property
    def vocab_size(self) -> int:
        """The real vocabulary (logits have this many columns), not the padded one."""
        return self.shard.vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, H) → (N, V) float32
        logits = ops.linear(hidden, self._weight(), None)  # (N, V / tp)
        return self._gather(logits).float()

    def logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(N, H) → the (N, V) logits in the weight dtype, written into `out`: no float32
        copy (bf16 → fp32 is exact, so a consumer that needs fp32 converts losslessly)."""
        weight = self._weight()
        if self.parallel.tp_size > 1:
            return out.copy_(self._gather(ops.linear(hidden, weight, None)))
        if hidden.shape[0] == 1 or not hidden.is_cuda:  # the GEMV path at one row
            return out.copy_(ops.linear(hidden, weight, None))
        return torch.mm(hidden, weight.t(), out=out)

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        return () if self.tied_to is not None else ("weight",)

    def load_checkpoint_tensor(
        self, name: str, loaded: torch.Tensor, *, part_id=None, source_name: str
    ) -> None:
        self.shard.load_rows(self.weight, loaded, source_name)

    def _gather(self, logits: torch.Tensor) -> torch.Tensor:  # (N, V / tp) → (N, V)
        if self.parallel.tp_size == 1:
            return logits
        gathered = self.parallel.all_gather(logits, dim=-1)  # (N, padded V)
        return gathered[:, : self.vocab_size]

    def _weight(self) -> torch.Tensor:  # (V / tp, H)
        return self.tied_to.weight if self.tied_to is not None else self.weight


class QuantizedLMHead(LinearBase):
    """The LM head with a quantised weight (`kiln build --quant-lm-head`): the build's scheme
    holds the (vocab, hidden) matrix, and logits come from its GEMM/GEMV like any linear
    layer's. Never tied: a tied model keeps its embedding in the compute dtype and this head
    gets its own quantised copy, loaded from the embedding's checkpoint tensor. One rank
    (the builder refuses --quant-lm-head with --tp/--pp), so no vocabulary padding."""

    tied_to = None  # the loader's test for a head that takes a tied matrix's copy

    def __init__(self, vocab_size: int, hidden_size: int, *, quant_config: QuantConfig,
                 parallel: ParallelState, prefix: str) -> None:
        if parallel.tp_size > 1:
            raise ValueError("a quantised LM head runs at tp 1 only")
        super().__init__(hidden_size, vocab_size, False, quant_config=quant_config,
                         parallel=parallel, prefix=prefix)

    @property
    def vocab_size(self) -> int:
        return self.output_size

    def placement(self, part_id: int | str | None) -> ShardPlacement:
        return self._rows_placement(None, 0, self.output_size, 0, 1, 0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, H) → (N, V) float32
        return self.quant_method.apply(self, hidden, None).float()

    def logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(N, H) → the (N, V) logits written into `out` (the CUDA graphs' shared buffer)."""
        return out.copy_(self.quant_method.apply(self, hidden, None))
