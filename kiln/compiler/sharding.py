"""Sharded builds: one engine file per rank, each already sliced (`kiln build --tp N --pp M`).

Each rank's model is constructed with `ParallelState.for_slicing` (its geometry, no process
group) and loads the whole checkpoint: its layers keep only their rank's slice (column/row
parallel linears, q|k|v split by heads with KV heads replicated when tp exceeds them, the
vocabulary-parallel embedding and LM head) and its pipeline stage's layers (the others are
`OtherStage` placeholders, see parallel/pipeline.py). Then the rank's quantisation runs and
its tensors are cast, exactly as in a single-rank build.

Random-weight builds draw the whole model once (single rank, unquantised, the same draws as
a tp 1 build with the same seed), split its fused tensors back into checkpoint parts and
feed those to every rank: the ranks of a random tp 2 engine are slices of the tp 1 one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from kiln.errors import KilnError
from kiln.layers.linear import LinearBase
from kiln.models.base import CausalLM
from kiln.models.config import ModelConfig
from kiln.models.registry import get_model_class
from kiln.parallel.layout import EngineLayout
from kiln.parallel.state import SINGLE_PROCESS, ParallelState
from kiln.quant.config import NO_QUANTIZATION, QuantConfig

TensorStream = Iterable[tuple[str, torch.Tensor]]


def construct_model(model_config: ModelConfig, quant_config: QuantConfig,
                    parallel: ParallelState, dtype: torch.dtype) -> CausalLM:
    """The model of one rank, its parameters in `dtype`; a split the model cannot take
    (heads, sizes or layers not divisible) is a KilnError naming it."""
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return get_model_class(model_config.architecture)(
            model_config, quant_config=quant_config, parallel=parallel
        )
    except ValueError as error:
        raise KilnError(
            f"cannot split {model_config.architecture} for tp {parallel.tp_size} × pp "
            f"{parallel.pp_size}: {error}"
        ) from None
    finally:
        torch.set_default_dtype(previous_dtype)


def check_layout(model_config: ModelConfig, quant_config: QuantConfig, layout: EngineLayout) -> None:
    """Every rank's model can be constructed (on the meta device: no memory)."""
    for rank in range(layout.world_size):
        with torch.device("meta"):
            construct_model(model_config, quant_config,
                            ParallelState.for_slicing(layout.tp, layout.pp, rank), torch.float32)


def model_named_parts(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """A single-rank, unquantised model's tensors under their unfused names in the model's
    own naming and layout (q_proj, k_proj, ... cut out of qkv_proj by its placements)."""
    modules = dict(model.named_modules())
    for name, tensor in model.engine_state_dict().items():
        module_name, _, tensor_name = name.rpartition(".")
        module = modules.get(module_name)
        fused = module_name.rpartition(".")[2]
        if (not isinstance(module, LinearBase) or module.part_ids == (None,)
                or fused not in model.packed_modules_mapping):  # one tensor in the checkpoint too
            yield name, tensor
            continue
        sources = dict((part_id, source) for source, part_id in model.packed_modules_mapping[fused])
        for part_id in module.part_ids:
            placement = module.placement(part_id)
            rows = tensor.narrow(0, placement.output_offset, placement.output_size)
            part_name = f"{module_name[: -len(fused)]}{sources[part_id]}.{tensor_name}"
            yield part_name, rows


def random_model_parts(model_config: ModelConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    from kiln.compiler.builder import _random_init

    model = construct_model(model_config, NO_QUANTIZATION, SINGLE_PROCESS, dtype)
    _random_init(model, seed, dtype)
    return dict(model_named_parts(model))


def build_rank_weights(
    model_config: ModelConfig,
    quant_config: QuantConfig,
    dtype: torch.dtype,
    layout: EngineLayout,
    checkpoint_tensors: Callable[[int], TensorStream] | None,
    *,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Rank r's engine tensors for every r of `layout`. `checkpoint_tensors(rank)` streams the
    checkpoint (HF naming) once per rank; None: random weights drawn from `seed`."""
    check_layout(model_config, quant_config, layout)
    parts = random_model_parts(model_config, dtype, seed) if checkpoint_tensors is None else None
    rank_weights = []
    for rank in range(layout.world_size):
        parallel = ParallelState.for_slicing(layout.tp, layout.pp, rank)
        model = construct_model(model_config, quant_config, parallel, dtype)
        if parts is not None:
            model.load_checkpoint_weights(parts.items(), model_naming=True)
        else:
            model.load_checkpoint_weights(checkpoint_tensors(rank))
        compute_names = model.compute_dtype_names()
        rank_weights.append({
            name: (t.to(dtype) if name in compute_names else t).contiguous()
            for name, t in model.engine_state_dict().items()
        })
        del model
    return rank_weights


def build_sharded_engine(source, output, build_config, checkpoint, model_config: ModelConfig,
                         max_model_len: int, quant_config: QuantConfig, layout: EngineLayout,
                         *, force: bool, progress: bool, started: float):
    """builder.build_engine for tp × pp > 1: the same manifest, one sliced file per rank."""
    import time

    from tqdm import tqdm

    from kiln.compiler.builder import BuildSummary, engine_provenance, kv_scales_record
    from kiln.compiler.manifest import write_engine

    if build_config.calibration or build_config.kv_cache_dtype != "auto":
        raise KilnError("--calibration and --kv-cache-dtype fp8 are not supported with --tp/--pp "
                        "yet: build the sharded engine without them")
    dtype = getattr(torch, build_config.dtype)

    def checkpoint_tensors(rank: int) -> TensorStream:
        names = checkpoint.tensors.names()
        return tqdm(((name, checkpoint.tensors.get(name)) for name in names), total=len(names),
                    desc=f"converting rank {rank}", unit="tensor", disable=not progress)

    rank_weights = build_rank_weights(
        model_config, quant_config, dtype, layout,
        None if build_config.random_weights else checkpoint_tensors, seed=build_config.seed,
    )
    build = {**build_config.model_dump(), "max_model_len": max_model_len}
    kv_scales = kv_scales_record(None, build_config, checkpoint)  # the checkpoint's, if any
    if kv_scales is not None:
        build["kv_scales"] = kv_scales
    generation_config, source_info = engine_provenance(source, build_config, checkpoint,
                                                       model_config)
    write_engine(
        output, rank_weights=rank_weights, layout=layout, quant_config=quant_config,
        model_config=model_config, build=build, source=source_info,
        generation_config=generation_config,
        save_tokenizer=checkpoint.save_tokenizer if checkpoint else None, force=force,
    )
    return BuildSummary(
        engine_dir=output,
        architecture=model_config.architecture,
        num_parameters=sum(t.numel() for rank in rank_weights for t in rank.values()),
        engine_bytes=sum(p.stat().st_size for p in output.rglob("*") if p.is_file()),
        seconds=time.perf_counter() - started,
    )
