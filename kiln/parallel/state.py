"""Tensor-parallel rank and world size as the layers see them.

Only world size 1 runs today; layers already slice their weights by (rank, size) so adding
tensor parallelism changes this module and the runner, never a model file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1


_state = ParallelState()


def get_tp_rank() -> int:
    return _state.tp_rank


def get_tp_size() -> int:
    return _state.tp_size


def all_reduce(x):
    """Sum over the tensor-parallel group (identity at world size 1)."""
    if _state.tp_size == 1:
        return x
    # Unreachable today: nothing sets tp_size > 1 until the TP runner exists (issue to come);
    # failing loudly beats silently returning a partial sum.
    raise NotImplementedError("tensor parallelism > 1 is not implemented yet")
