"""Tensor-parallel linear layers (world size 1 today) that load checkpoint shards.

Each parameter carries a `weight_loader(param, loaded_weight[, shard_id])` that slices this
rank's part out of the full checkpoint tensor and, for fused layers, copies it into the
right rows:

    QKVParallelLinear.weight rows:  [ q (Hq*D) | k (Hkv*D) | v (Hkv*D) ]   shard ids q, k, v
    MergedColumnParallelLinear:     [ gate (I) | up (I) ]                   shard ids 0, 1
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from kiln.errors import CheckpointError
from kiln.parallel.state import all_reduce, get_tp_rank, get_tp_size
from kiln.quant.base import UnquantizedLinearMethod


def _check_shape(param_name: str, expected: torch.Size, loaded: torch.Tensor) -> None:
    if tuple(expected) != tuple(loaded.shape):
        raise CheckpointError(
            f"tensor {param_name!r} has shape {tuple(loaded.shape)}, expected {tuple(expected)}"
        )


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
    _check_shape(name, param.shape, loaded)
    param.data.copy_(loaded)


class LinearBase(nn.Module, abc.ABC):
    def __init__(
        self, in_features: int, out_features: int, bias: bool, quant_method=None
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    @abc.abstractmethod
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        """Copy this rank's slice of the full checkpoint tensor into `param`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        default_weight_loader(param, loaded, name)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank holds out_features / tp rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant_method=None):
        if out_features % get_tp_size():
            raise ValueError(f"out_features {out_features} not divisible by tp {get_tp_size()}")
        super().__init__(in_features, out_features // get_tp_size(), bias, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        rows = param.shape[0]
        _check_shape(name, (rows * self.tp_size, *param.shape[1:]), loaded)
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one weight (e.g. gate|up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, quant_method=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, quant_method)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, name: str = "", shard_id: int = 0
    ) -> None:
        shard_rows = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _check_shape(name, (self.output_sizes[shard_id], *param.shape[1:]), loaded)
        shard = loaded.narrow(0, self.tp_rank * shard_rows, shard_rows)
        param.data.narrow(0, offset, shard_rows).copy_(shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one weight; heads split across ranks (KV heads replicated
    when there are fewer KV heads than ranks)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        quant_method=None,
    ):
        tp = get_tp_size()
        if num_heads % tp:
            raise ValueError(f"num_attention_heads {num_heads} not divisible by tp {tp}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, quant_method)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, name: str = "", shard_id: str = "q"
    ) -> None:
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, rows, rank = 0, q_rows, self.tp_rank
            full = q_rows * self.tp_size
        else:
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, rank = kv_rows, self.tp_rank // self.kv_replicas
            full = kv_rows * (self.tp_size // self.kv_replicas)
        _check_shape(name, (full, *param.shape[1:]), loaded)
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, rank * rows, rows))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce. The
    bias is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant_method=None):
        if in_features % get_tp_size():
            raise ValueError(f"in_features {in_features} not divisible by tp {get_tp_size()}")
        super().__init__(in_features // get_tp_size(), out_features, bias, quant_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if param.dim() == 1:  # bias: whole on every rank
            default_weight_loader(param, loaded, name)
            return
        cols = param.shape[1]
        _check_shape(name, (param.shape[0], cols * self.tp_size), loaded)
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, None)
        out = all_reduce(out)
        return out if self.bias is None else out + self.bias
