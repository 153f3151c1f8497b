"""Which slice of the model this process holds, and the process groups that join the slices.

A `ParallelState` is plain, immutable data created by whoever owns the processes (the engine:
`ParallelState.initialize` in each worker, `close` when it shuts down) and handed to the model
at construction; every layer keeps the one it was built with. There is no module global, so
two engines in one process (a notebook, a test suite, a sweep) each have their own.

    global rank = pp_rank * tp_size + tp_rank          rank r loads rank{r}.safetensors
    tp group    = the tp_size ranks of one pipeline stage

World size 1 (the default, `SINGLE_PROCESS`) needs no torch.distributed at all: `all_reduce`
and `all_gather` return their input, so a single-GPU step runs exactly the ops it always did.

Pipeline stages hold contiguous layer ranges (`stage_layers`): the first stage also the
embedding, the last the final norm and the LM head. A stage that is not the first receives
its input activations from the previous stage (`recv_activations`), one that is not the last
sends its output to the next (`send_activations`), inside the model's forward.

`ParallelState.for_slicing` describes a rank's geometry without any process group: the
builder constructs each rank's model with it to slice the weights (never to run them).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

# Tests only: seconds a pipeline stage "computes" per step before it passes its activations
# on, and a file where each stage appends when it did (tests/parallel/test_pipelining.py
# shows with them that stages work on different micro-batches at the same time).
STAGE_DELAY_ENV = "KILN_TEST_STAGE_DELAY_S"
STAGE_TRACE_ENV = "KILN_TEST_STAGE_TRACE"


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    # torch.distributed process group of this rank's tensor-parallel peers (None at tp 1).
    tp_group: Any = field(default=None, compare=False, repr=False)
    # True when initialize() started torch.distributed for this state, so close() ends it.
    owns_process_group: bool = field(default=False, compare=False, repr=False)
    # Group over which pipeline stages pass activations (None at pp 1); global ranks.
    pp_group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, tp_size {self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank {self.pp_rank} is outside [0, pp_size {self.pp_size})")
        if self.tp_size > 1 and self.tp_group is None:
            raise ValueError(f"tp_size {self.tp_size} needs a tp_group (ParallelState.initialize)")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        """The global rank: which rank{r}.safetensors this process loads."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples: tp rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def last_stage_driver_rank(self) -> int:
        """Global rank of the sampling rank (tp rank 0 of the last stage)."""
        return (self.pp_size - 1) * self.tp_size

    def stage_layers(self, num_layers: int) -> range:
        """This stage's contiguous range of decoder layers: num_layers split as evenly as
        possible, the first (num_layers % pp) stages one layer more."""
        return stage_layer_range(num_layers, self.pp_size, self.pp_rank)

    @classmethod
    def for_slicing(cls, tp_size: int, pp_size: int, rank: int) -> "ParallelState":
        """Rank `rank`'s geometry with no process group: for building (slicing weights) only;
        its collectives raise."""
        pp_rank, tp_rank = divmod(rank, tp_size)
        return cls(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
                   tp_group=_NO_GROUP if tp_size > 1 else None,
                   pp_group=_NO_GROUP if pp_size > 1 else None)

    @classmethod
    def initialize(
        cls, tp_size: int, pp_size: int, rank: int, *, backend: str, init_method: str,
        timeout: timedelta | None = None,
    ) -> "ParallelState":
        """Join the torch.distributed world of tp_size * pp_size processes as `rank` and
        create this rank's tensor-parallel group (and, at pp > 1, the pipeline group). Every
        rank must call it (collective). `timeout`: how long a collective of these groups
        waits for a peer before it raises (a dead or hung rank)."""
        import torch.distributed as dist

        world_size = tp_size * pp_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world size {world_size})")
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend, init_method=init_method, rank=rank,
                                    world_size=world_size)
        options = {} if timeout is None else {"timeout": timeout}
        tp_group = None
        pp_rank, tp_rank = divmod(rank, tp_size)
        for stage in range(pp_size):
            # new_group is collective over the whole world: every rank creates every group.
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)), **options)
            if stage == pp_rank:
                tp_group = group
        pp_group = dist.new_group(list(range(world_size)), **options) if pp_size > 1 else None
        return cls(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
                   tp_group=tp_group if tp_size > 1 else None, owns_process_group=owns,
                   pp_group=pp_group)

    def close(self) -> None:
        """End the torch.distributed world this state started (a no-op at world size 1)."""
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def forget_groups(self) -> None:
        """After the world is left: drop this state's process groups (in place: the model's
        layers hold this very state) and its ownership of the world, so the groups are
        destroyed now, in the caller's thread (executor._leave_world says why), and a
        collective afterwards fails naming the cause."""
        for name in ("tp_group", "pp_group"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _LEFT_GROUP)
        object.__setattr__(self, "owns_process_group", False)

    def _check_group(self) -> None:
        if self.tp_group is _NO_GROUP:
            raise RuntimeError("a build-time ParallelState (for_slicing) cannot run collectives")
        if self.tp_group is _LEFT_GROUP:
            raise RuntimeError("this rank has left its world (the engine was closed): no "
                               "collectives after close()")

    # ---- pipeline: activations between stages ---------------------------------------------

    def send_activations(self, tensors: list[torch.Tensor]) -> None:
        """This stage's output (hidden, and the residual where the model carries one) to
        the same tp rank of the next stage."""
        import torch.distributed as dist

        peer = (self.pp_rank + 1) * self.tp_size + self.tp_rank
        _test_stage_delay(self.pp_rank)
        for tensor in tensors:
            dist.send(tensor.contiguous(), peer, group=self.pp_group)

    def recv_activations(self, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                         device: torch.device) -> list[torch.Tensor]:
        """The previous stage's output, as sent by send_activations (shapes agree: every
        stage builds the same flat batch from the same step message)."""
        import torch.distributed as dist

        peer = (self.pp_rank - 1) * self.tp_size + self.tp_rank
        out = []
        for shape in shapes:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(tensor, peer, group=self.pp_group)
            out.append(tensor)
        if self.is_last_stage:  # the last stage sends nothing on: its work starts here
            _test_stage_delay(self.pp_rank)
        return out

    def send_to_first_stage(self, tensor: torch.Tensor) -> list:
        """The sampling rank: start sending `tensor` (sampled ids) to every rank of stage 0;
        returns the pending sends (wait() each before `tensor` may be dropped)."""
        import torch.distributed as dist

        return [dist.isend(tensor, rank, group=self.pp_group) for rank in range(self.tp_size)]

    def receive_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """A stage 0 rank: what send_to_first_stage sent, into `tensor` (in place)."""
        import torch.distributed as dist

        dist.recv(tensor, self.last_stage_driver_rank, group=self.pp_group)
        return tensor

    def broadcast_from_driver(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` of tp rank 0 of this stage, in place on every tp rank of it (identity at
        tp 1): the sampled ids of the last stage's driver reach its tp peers, which fill the
        next step's placeholders from them (overlap scheduling at tp > 1)."""
        if self.tp_size == 1:
            return tensor
        self._check_group()
        import torch.distributed as dist

        dist.broadcast(tensor, self.pp_rank * self.tp_size, group=self.tp_group)
        return tensor

    # ---- collectives over the tensor-parallel group -------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel group, in place (identity at tp 1)."""
        if self.tp_size == 1:
            return x
        self._check_group()
        import torch.distributed as dist

        dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The tensor-parallel group's pieces of x, concatenated along `dim` in rank order
        (identity at tp 1)."""
        if self.tp_size == 1:
            return x
        self._check_group()
        import torch.distributed as dist

        pieces = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(pieces, x.contiguous(), group=self.tp_group)
        return torch.cat(pieces, dim=dim)


def _test_stage_delay(pp_rank: int) -> None:
    """Tests only (see STAGE_DELAY_ENV): sleep as if this stage computed for a while, and
    note when. One environment lookup otherwise."""
    delay = os.environ.get(STAGE_DELAY_ENV)
    if not delay:
        return
    started = time.monotonic()  # CLOCK_MONOTONIC: comparable between processes
    time.sleep(float(delay))
    trace = os.environ.get(STAGE_TRACE_ENV)
    if trace:
        with open(trace, "a") as file:
            file.write(f"{pp_rank} {started:.6f} {time.monotonic():.6f}\n")


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} layers cannot be split over {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class _NoProcessGroup:
    """The group of a build-time state, or of one whose world was left: nobody to talk to."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"<no process group: {self.why}>"


_NO_GROUP = _NoProcessGroup("build-time slicing only")
_LEFT_GROUP = _NoProcessGroup("the world was left")


# One process holding the whole model: what every engine uses until it asks for more.
SINGLE_PROCESS = ParallelState()

