"""Tensor-parallel linear layers: each rank holds a slice of the weight, stored and applied
by the layer's quantisation method.

A layer knows its tensor-parallel geometry and says, for every checkpoint tensor, where this
rank's slice goes (`placement`); the method (kiln/quant/) owns the parameters and copies
each slice in by its layout, so neither re-implements the other. Fused layers:

    QKVParallelLinear, this rank's rows:  [ q (Hq/tp * D) | k (Hkv/tp * D) | v (Hkv/tp * D) ]
                                          parts "q", "k", "v"
    MergedColumnParallelLinear:           [ gate (I/tp) | up (I/tp) ]    parts 0, 1

At tp 1 every placement is the whole tensor and `forward` is the method's one matmul.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from kiln.layers.loading import CheckpointLoadable
from kiln.parallel.state import ParallelState
from kiln.quant.base import make_parameter
from kiln.quant.config import QuantConfig
from kiln.quant.placement import BIAS_LAYOUT, ShardPlacement, copy_into_place


def _divide(size: int, parallel: ParallelState, what: str) -> int:
    if size % parallel.tp_size:
        raise ValueError(
            f"{what} {size} is not divisible by the tensor-parallel size {parallel.tp_size}"
        )
    return size // parallel.tp_size


class LinearBase(nn.Module, CheckpointLoadable):
    # The fused parts the weight is made of; (None,) for one unfused checkpoint tensor.
    part_ids: tuple[int | str | None, ...] = (None,)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        *,
        quant_config: QuantConfig,
        parallel: ParallelState,
        prefix: str,
    ) -> None:
        """input_size, output_size: this rank's share. `prefix` is the layer's name in the
        model (model.layers.3.self_attn.qkv_proj): the quantisation scheme picks by it."""
        super().__init__()
        self.parallel = parallel
        self.prefix = prefix
        self.input_size, self.output_size = input_size, output_size
        self.quant_method = quant_config.linear_method(prefix)
        self.quant_method.create_weights(self, input_size, output_size)
        if bias:
            self.bias = make_parameter((output_size,), BIAS_LAYOUT)
        else:
            self.register_parameter("bias", None)

    @abc.abstractmethod
    def placement(self, part_id: int | str | None) -> ShardPlacement:
        """Where this rank's slice of the checkpoint tensor of part `part_id` goes."""

    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        names = self.quant_method.checkpoint_tensor_names()
        return names + ("bias",) if self.bias is not None else names

    def load_checkpoint_tensor(self, name: str, loaded: torch.Tensor, *,
                               part_id: int | str | None = None, source_name: str) -> None:
        if part_id not in self.part_ids:
            raise ValueError(f"{self.prefix}: part {part_id!r} is not one of {self.part_ids}")
        placement = self.placement(part_id)
        if name == "bias":
            copy_into_place(self.bias, loaded, placement, source_name)
        else:
            self.quant_method.load_checkpoint_tensor(self, name, loaded, placement, source_name)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, input_size) → (T, output_size)
        return self.quant_method.apply(self, x, self.bias)

    def _rows_placement(
        self, part_id: int | str | None, part_index: int, rows: int, slice_index: int,
        num_slices: int, offset: int,
    ) -> ShardPlacement:
        """`rows` output rows of this rank at `offset`: slice `slice_index` of a checkpoint
        tensor made of `num_slices` such slices; all input columns."""
        return ShardPlacement(
            part_id=part_id, part_index=part_index,
            checkpoint_output_size=rows * num_slices, output_start=slice_index * rows,
            output_size=rows, output_offset=offset,
            checkpoint_input_size=self.input_size, input_start=0, input_size=self.input_size,
        )


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def placement(self, part_id: int | str | None) -> ShardPlacement:
        return self._rows_placement(None, 0, self.output_size, 0, 1, 0)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank holds output_size / tp rows."""

    def __init__(self, input_size: int, output_size: int, bias: bool, *,
                 quant_config: QuantConfig, parallel: ParallelState, prefix: str) -> None:
        rows = _divide(output_size, parallel, "output size")
        super().__init__(input_size, rows, bias, quant_config=quant_config, parallel=parallel,
                         prefix=prefix)

    def placement(self, part_id: int | str | None) -> ShardPlacement:
        rank, size = self.parallel.tp_rank, self.parallel.tp_size
        return self._rows_placement(None, 0, self.output_size, rank, size, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one weight (e.g. gate|up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, *,
                 quant_config: QuantConfig, parallel: ParallelState, prefix: str) -> None:
        for size in output_sizes:
            _divide(size, parallel, "fused output size")
        self.output_sizes = list(output_sizes)
        self.part_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias, quant_config=quant_config,
                         parallel=parallel, prefix=prefix)

    def placement(self, part_id: int | str | None) -> ShardPlacement:
        rank, size = self.parallel.tp_rank, self.parallel.tp_size
        offset = sum(self.output_sizes[:part_id]) // size
        rows = self.output_sizes[part_id] // size
        return self._rows_placement(part_id, part_id, rows, rank, size, offset)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one weight; heads split across ranks (KV heads replicated
    when there are fewer KV heads than ranks)."""

    part_ids = ("q", "k", "v")

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        *,
        quant_config: QuantConfig,
        parallel: ParallelState,
        prefix: str,
    ) -> None:
        tp = parallel.tp_size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tp {tp}")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads {num_kv_heads} and tp {tp}: one must divide the other"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads // tp  # this rank's
        self.num_kv_heads = max(1, num_kv_heads // tp)
        # Ranks that hold the same KV heads (1 unless there are fewer KV heads than ranks).
        self.kv_replicas = max(1, tp // num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, output_size, bias, quant_config=quant_config,
                         parallel=parallel, prefix=prefix)

    def placement(self, part_id: int | str | None) -> ShardPlacement:
        rank, size = self.parallel.tp_rank, self.parallel.tp_size
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        if part_id == "q":
            return self._rows_placement("q", 0, q_rows, rank, size, 0)
        offset, index = (q_rows, 1) if part_id == "k" else (q_rows + kv_rows, 2)
        # kv_replicas consecutive ranks share one slice of the KV heads.
        slice_index, num_slices = rank // self.kv_replicas, size // self.kv_replicas
        return self._rows_placement(part_id, index, kv_rows, slice_index, num_slices, offset)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce. The
    bias is whole on every rank and added once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool, *,
                 quant_config: QuantConfig, parallel: ParallelState, prefix: str) -> None:
        columns = _divide(input_size, parallel, "input size")
        super().__init__(columns, output_size, bias, quant_config=quant_config,
                         parallel=parallel, prefix=prefix)

    def placement(self, part_id: int | str | None) -> ShardPlacement:
        columns = self.input_size
        return ShardPlacement(
            part_id=None, part_index=0,
            checkpoint_output_size=self.output_size, output_start=0,
            output_size=self.output_size, output_offset=0,
            checkpoint_input_size=columns * self.parallel.tp_size,
            input_start=self.parallel.tp_rank * columns, input_size=columns,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, input_size) → (T, output_size)
        out = self.quant_method.apply(self, x, None)
        out = self.parallel.all_reduce(out)
        return out if self.bias is None else out + self.bias
