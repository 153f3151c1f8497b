"""How layers take checkpoint tensors: layers that slice for tensor parallelism, fuse parts
or quantise (linear layers, the vocabulary-parallel embedding and LM head) load their own
tensors; everything else (norms) is a plain whole-tensor copy."""

from __future__ import annotations

import abc

import torch
from torch import nn

from kiln.errors import CheckpointError


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
    """The whole checkpoint tensor into a parameter of the same shape."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


class CheckpointLoadable(abc.ABC):
    """A layer that puts its checkpoint tensors into its parameters itself."""

    @abc.abstractmethod
    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        """The tensors (names under the layer's prefix) a checkpoint holds for this layer."""

    @abc.abstractmethod
    def load_checkpoint_tensor(
        self,
        name: str,
        loaded: torch.Tensor,
        *,
        part_id: int | str | None = None,
        source_name: str,
    ) -> None:
        """Take this rank's slice of checkpoint tensor `name` (of fused part `part_id`);
        `source_name` is its checkpoint name, for messages."""

    def process_weights_after_loading(self) -> None:
        """Runs once at build time after every checkpoint tensor is loaded."""
