"""Loading an engine's weights into a model on a device: checked against the file's header
first, staged through pinned host buffers on CUDA, never through a float32 copy.

Each process loads its own rank's file (the manifest's "parallel" section names it), into a
model built with its ParallelState and the engine's quantisation scheme. Only the tensors in
the model's compute dtype are converted to the runtime's dtype; packed ints, FP8 and scales
arrive bit-exact."""

from __future__ import annotations

import time
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from kiln.compiler.manifest import EngineInfo
from kiln.errors import EngineFormatError
from kiln.kernels.triton_utils import env_flag
from kiln.parallel.state import SINGLE_PROCESS, ParallelState
from kiln.quant.activation_fusion import fuse_fp8_activations

# Each of the two host buffers the weights pass through on their way to the GPU.
_STAGING_BYTES = 64 * 2**20


def _check_tensors(
    engine: EngineInfo, file_name: str, file, expected: dict[str, torch.Tensor]
) -> None:
    """The file holds exactly the model's tensors, each in the model's shape (checked before
    anything is copied)."""
    names = set(file.keys())
    if names != set(expected):
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        raise EngineFormatError(
            f"{engine.path}: {file_name} does not match {engine.model_config.architecture}"
            f" (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, param in expected.items():
        shape = list(file.get_slice(name).get_shape())
        if shape != list(param.shape):
            raise EngineFormatError(
                f"{engine.path}: tensor {name} in {file_name} has shape {shape}; "
                f"{engine.model_config.architecture} with this config needs {list(param.shape)}"
            )


def _check_fixed_dtypes(
    engine: EngineInfo,
    file_name: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    fixed_dtypes: dict[str, torch.dtype],
) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors, each one that keeps its own dtype (FP8, packed ints, scales) checked to
    be in the dtype its quantisation method made it with."""
    for name, tensor in tensors:
        wanted = fixed_dtypes.get(name)
        if wanted is not None and tensor.dtype != wanted:
            raise EngineFormatError(
                f"{engine.path}: tensor {name} in {file_name} is {tensor.dtype}; quantisation "
                f"scheme {engine.quant_config.scheme!r} stores it as {wanted}"
            )
        yield name, tensor


def _stage_to_device(
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
    staging_bytes: int = _STAGING_BYTES,
) -> dict[str, torch.Tensor]:
    """Host tensors (here: views of the memory-mapped file) copied to `device` through two
    reusable host buffers, pinned on CUDA. While the GPU copies one buffer, the CPU fills the
    other from the page cache (torch's copy uses every intra-op thread), so the transfer runs
    at about the slower of host memcpy and the PCIe link instead of a pageable
    tensor.to("cuda"), which the driver bounces through its own small pinned buffer one
    synchronous piece at a time. On the CPU the same path is two plain copies (for tests)."""
    cuda = device.type == "cuda"
    buffers = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]  # when the GPU finished reading each
    turn = 0
    out: dict[str, torch.Tensor] = {}
    for name, host in tensors:
        target = torch.empty(host.shape, dtype=host.dtype, device=device)
        out[name] = target
        source = host.reshape(-1).view(torch.uint8)  # (nbytes,)
        destination = target.view(-1).view(torch.uint8)  # (nbytes,)
        for start in range(0, source.numel(), staging_bytes):
            stop = min(start + staging_bytes, source.numel())
            buffer = buffers[turn][: stop - start]
            if copied[turn] is not None:
                copied[turn].synchronize()
            buffer.copy_(source[start:stop])
            destination[start:stop].copy_(buffer, non_blocking=cuda)
            if cuda:
                copied[turn] = torch.cuda.Event()
                copied[turn].record(torch.cuda.current_stream(device))
            turn ^= 1
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return out


def _as_parameters(
    model: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> dict[str, torch.nn.Parameter]:
    """The loaded tensors (no copy) as parameters that keep what the model's layers marked
    on theirs (layout, fixed dtype): load_state_dict(assign=True) would otherwise make bare
    ones."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in weights.items():
        param = torch.nn.Parameter(tensor, requires_grad=params[name].requires_grad)
        param.__dict__.update(params[name].__dict__)
        out[name] = param
    return out


def load_engine_model(
    engine: EngineInfo,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    parallel: ParallelState | None = None,
) -> torch.nn.Module:
    """This rank's model (`parallel`, default one process) with the engine's weights on
    `device`; the compute-dtype tensors in `dtype` (default: the engine's).

    The model is built on the meta device (no memory, no init), its tensors are checked
    against the rank file's header, and the weights go from the file to `device` once and
    are assigned as the parameters: no CPU copy of the model, no float32 intermediate. On
    CUDA they travel through pinned staging buffers (_stage_to_device); on the CPU the
    parameters are views of the memory-mapped file. Records its seconds on `engine.timings`."""
    from kiln.models.registry import get_model_class

    parallel = parallel or SINGLE_PROCESS
    layout = engine.layout
    if not layout.matches(parallel):
        raise EngineFormatError(
            f"{engine.path}: the engine is split for tp {layout.tp} × pp {layout.pp} and must "
            f"be loaded by that many processes; this one is rank {parallel.rank} of tp "
            f"{parallel.tp_size} × pp {parallel.pp_size}"
        )
    device = torch.device(device)
    started = time.perf_counter()
    model_class = get_model_class(engine.model_config.architecture)
    with torch.device("meta"):
        model = model_class(
            engine.model_config, quant_config=engine.quant_config, parallel=parallel
        )
    expected = model.engine_state_dict()
    compute_names = model.compute_dtype_names()
    fixed_dtypes = {n: t.dtype for n, t in expected.items() if n not in compute_names}
    constructed = time.perf_counter()
    path = engine.rank_file(parallel.rank)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            _check_tensors(engine, path.name, file, expected)
            tensors = _check_fixed_dtypes(
                engine, path.name, ((name, file.get_tensor(name)) for name in file.keys()),
                fixed_dtypes,
            )
            if device.type == "cuda":
                with torch.cuda.device(device):
                    weights = _stage_to_device(tensors, device)
            else:
                weights = dict(tensors)
    except SafetensorError as error:
        raise EngineFormatError(f"{path}: not a readable safetensors file: {error}") from None
    if dtype is not None and dtype != engine.dtype:
        weights = {
            name: tensor.to(dtype) if name in compute_names else tensor
            for name, tensor in weights.items()
        }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loaded = time.perf_counter()
    model.load_state_dict(_as_parameters(model, weights), strict=False, assign=True)
    # Derived buffers (RoPE tables, KV scales) were made on the CPU at construction.
    model = model.to(device).eval()
    if env_flag("KILN_FP8_FUSE_ACTIVATIONS", default=True):  # 0: the A/B switch
        # FP8 linears' inputs quantised by their producers (kiln/quant/activation_fusion.py).
        fuse_fp8_activations(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finished = time.perf_counter()
    engine.timings.construct_seconds = (constructed - started) + (finished - loaded)
    engine.timings.weights_seconds = loaded - constructed
    engine.timings.weight_bytes = path.stat().st_size
    return model
