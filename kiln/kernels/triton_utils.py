"""What every Triton launcher needs: a launchability check, dot operand types, and input checks
with messages a person can act on.

On the CPU the kernels run through Triton's interpreter, which `TRITON_INTERPRET=1` selects,
and only if it is set before triton is first imported: triton decorates its own standard
library (tl.sum, tl.max, ...) at import time. The test suite's conftest sets it on machines
without CUDA.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime.interpreter import InterpretedFunction

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# A window wider than any context: every causal key is inside it (kernels take an int, not None).
NO_WINDOW = 1 << 30

next_power_of_2 = triton.next_power_of_2


def interpreter_active() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1: kernels then run on CPU tensors.
    (Its standard library is an interpreted function exactly then.)"""
    return isinstance(tl.sum, InterpretedFunction)


def power_of_2_dividing(value: int) -> int:
    """The largest power of 2 that divides `value` (> 0): the widest power-of-2 tile that
    walks it without a remainder."""
    return value & -value


def env_flag(name: str, default: bool) -> bool:
    """A 0/1 switch from the environment (unset or empty: default). Anything else is an error
    naming the variable, so a misspelt value (`true`, `on`) never silently does nothing."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (or unset); got {value!r}")
    return default if value == "" else value == "1"


def batch_invariant() -> bool:
    """KILN_BATCH_INVARIANT=1 (vLLM's VLLM_BATCH_INVARIANT): a row's logits do not depend on
    the other rows of its step. Decode and verify steps of up to 16 rows then run every bf16
    / fp16 linear on the same tensor-core tiles whatever the row count (the batch-1 GEMV
    otherwise takes a CUDA-core path with another summation order), and decode attention
    cuts a sequence's keys by its own length only (a fixed split count). Greedy speculative
    decoding then gives exactly the tokens of plain decoding in bf16. Read when a kernel is
    launched or captured into a CUDA graph: set it before the engine starts."""
    return env_flag("KILN_BATCH_INVARIANT", default=False)


def launchable(kernel, tensor: torch.Tensor):
    """`kernel`, after checking it can run where `tensor` lives."""
    interpreted = interpreter_active() and isinstance(kernel, InterpretedFunction)
    if not tensor.is_cuda and not interpreted:
        raise RuntimeError(
            f"{kernel.__name__} got {tensor.device} tensors: Triton kernels run on the CPU only "
            "through Triton's interpreter. Set TRITON_INTERPRET=1 before triton is first imported."
        )
    return kernel


@functools.lru_cache(maxsize=None)
def _device_is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def has_sm90(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives on a Hopper-or-newer GPU: griddepcontrol (PDL) and
    cp.async.bulk.prefetch are sm_90+ instructions."""
    return tensor.is_cuda and _device_is_sm90(tensor.device.index or 0)


def use_pdl(tensor: torch.Tensor) -> bool:
    """Whether a kernel on `tensor` launches as a programmatic dependent launch (PDL): sm_90+
    GPUs, never under the interpreter, unless KILN_PDL=0. Pass it as the kernel's USE_PDL and
    as `launch_pdl`. KILN_PDL=0 is for profiling: under PDL a kernel starts while the one
    before it runs, so a profiler's per-kernel times include that wait and do not add up to
    the step (benchmarks/profile_step.py). Read when a kernel is launched or captured."""
    return has_sm90(tensor) and not interpreter_active() and env_flag("KILN_PDL", default=True)


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """First thing in a PDL-launched kernel. Such a kernel may start while the kernel before
    it in the stream still runs: wait for that one to finish (its writes visible) before
    touching anything it produces, then let the next kernel start its own prologue. At batch
    1 a decode step is ~300 small kernels; overlapping each one's launch and ramp-up with the
    previous one's tail is worth ~5 % of the step. Kernels that wait before reading or
    writing anything keep the chain ordered: each completes only after its predecessor."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def dot_dtype(tensor: torch.Tensor):
    """Operand type for `tl.dot`: the tensor's own 16-bit type on the GPU (tensor cores, fp32
    accumulation), float32 under the interpreter, whose bf16 arithmetic is wrong."""
    return _TL_DTYPES[tensor.dtype] if tensor.is_cuda else tl.float32


def dot_precision(tensor: torch.Tensor) -> str:
    """fp32 operands use exact fp32 products ("ieee"), not Triton's default TF32, so fp32 models
    match their reference; 16-bit operands ignore this."""
    return "ieee" if tensor.dtype == torch.float32 or not tensor.is_cuda else "tf32"


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _TL_DTYPES:
        raise ValueError(
            f"{name} has dtype {tensor.dtype}; the Triton kernels take float16, bfloat16 or float32"
        )


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    # Kernels index the last axis as offset + arange: that is what makes their loads 16-byte wide.
    if tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last axis (stride {tensor.stride(-1)}); "
            "call .contiguous() first"
        )


def check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(
            f"the Triton attention kernels need a power-of-2 head_dim >= 16 (tl.dot tiles); got "
            f"{head_dim}. Set KILN_REFERENCE_KERNELS=1 to run this model with the torch reference."
        )
