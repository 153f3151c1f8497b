"""The build pipeline: checkpoint → model parameters (fused, quantised, cast) → engine dir.

    read (checkpoint/)  →  config_from_hf  →  load_checkpoint_weights (fuse q|k|v, gate|up;
      each linear layer's quantisation method takes its tensors, then quantises them)
      →  cast the compute-dtype tensors to the build dtype (quantised tensors and scales
         keep theirs)  →  write_engine (temp dir, sha256 per file and per 256 MiB chunk, rename)

Builds are one process; `--tp`/`--pp` builds write one sliced file per rank (sharding.py).

Every transformation that does not depend on the requests happens here, once.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kiln.compiler.manifest import write_engine
from kiln.compiler.verify import sha256_file
from kiln.checkpoint.base import Checkpoint
from kiln.config import KEEP_QUANTIZATION, BuildConfig
from kiln.errors import CheckpointError, KilnError
from kiln.layers.linear import LinearBase
from kiln.layers.loading import CheckpointLoadable
from kiln.models.base import CausalLM
from kiln.models.config import ModelConfig
from kiln.models.registry import get_model_class
from kiln.parallel.layout import EngineLayout
from kiln.parallel.state import SINGLE_PROCESS
from kiln.quant.base import UnquantizedLinearMethod, has_fixed_dtype
from kiln.quant.config import NO_QUANTIZATION, QuantConfig, quant_config_for_build
from kiln.quant.fp8 import check_fp8_device
from kiln.quant.layer_selection import select_layers
from kiln.quant.scheme_base import LM_HEAD_PREFIX
from kiln.runtime.kv_tensors import kv_scales_of, stored_kv_scales


@dataclass(frozen=True)
class BuildSummary:
    engine_dir: Path
    architecture: str
    num_parameters: int
    engine_bytes: int
    seconds: float

    def describe(self) -> str:
        return (
            f"built {self.architecture} engine at {self.engine_dir}: "
            f"{self.num_parameters / 1e6:.1f} M parameters, "
            f"{self.engine_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s"
        )


def read_checkpoint(source: str | Path, *, weights: bool = True,
                    keep_quantized: bool = False) -> Checkpoint:
    """An HF directory, an HF config.json alone (random weights), or a .gguf file
    (keep_quantized: its Q8_0/Q6_K/Q4_0/Q4_1/Q4_K linears stay quantised, `--quant keep`)."""
    path = Path(source)
    if path.suffix == ".gguf":
        from kiln.checkpoint.gguf import read_gguf

        return read_gguf(path, keep_quantized=keep_quantized)
    from kiln.checkpoint.hf import read_hf_directory

    if path.is_file() and path.name.endswith(".json"):
        if weights:
            raise CheckpointError(f"{path}: a config file alone has no weights; use --random-weights")
        from kiln.checkpoint.hf import read_json

        return Checkpoint(config=read_json(path, "config"), tensors=None, save_tokenizer=None,
                          source_files=[path])
    return read_hf_directory(path, weights=weights)


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    architecture = hf_config["architectures"][0]
    return get_model_class(architecture).config_from_hf(hf_config)


def _resolve_max_model_len(config: ModelConfig, requested: int | None) -> int:
    limit = config.max_position_embeddings
    if requested is None:
        return limit
    if requested > limit:
        raise KilnError(
            f"--max-model-len {requested} exceeds the model's max_position_embeddings ({limit})"
        )
    return requested


def _random_init(model: CausalLM, seed: int, dtype: torch.dtype,
                 quantize_each_layer: bool = True) -> set[int]:
    """Hugging Face-style init: normal(0, 0.02) matrices, ones for norms, zeros for biases.
    A quantised linear layer gets a full-precision normal(0, 0.02) weight through its
    method, as a checkpoint's would arrive; the builder then quantises it
    (process_weights_after_loading), as after a checkpoint's weights.

    The draws come in the model's parameter order whatever the scheme, and a quantised
    layer's weight is drawn whole at its layer's turn, in the build dtype, as an unquantised
    layer's is: so --quant fp8 and the bf16 build of one seed hold the same weights, and
    `kiln eval --compare` between them measures quantisation (drawn after the other
    parameters, as before, the quantised builds were unrelated models: 0 % agreement)."""
    # Drawn on the GPU when there is one: an 8B model's 8 G normal samples take minutes on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(shape) -> torch.Tensor:
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        return noise.normal_(0, 0.02, generator=generator)

    seen: set[int] = set()
    processed: set[int] = set()
    for module in model.modules():  # named_parameters' order: modules, then their own
        quantised = isinstance(module, LinearBase) and not isinstance(
            module.quant_method, UnquantizedLinearMethod)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or has_fixed_dtype(param):
                continue  # tied, or a quantised layer's own tensors (made below)
            seen.add(id(param))
            if name.endswith("bias"):
                param.data.zero_()
            elif param.dim() == 1:
                param.data.fill_(1.0)
            elif not quantised:
                param.data.copy_(normal(param.shape).to(param.dtype))
        if quantised:  # after its plain tensors, which quantising may then overwrite
            _random_init_quantized(module, normal, dtype)
            if quantize_each_layer:
                # Quantised now, so only one layer's full-precision weight exists at a time
                # (an 8B model's would be 16 GB of host memory); returned so the builder's
                # after-loading pass skips it (that step runs once per layer).
                module.process_weights_after_loading()
                processed.add(id(module))
    return processed


def _random_init_quantized(layer: LinearBase, normal, dtype: torch.dtype) -> None:
    """The layer's whole (output, input) weight in one draw, rounded to the build dtype as
    an unquantised layer's (and a checkpoint's), then handed over part by part (q, k, v)."""
    if "weight" not in layer.quant_method.checkpoint_tensor_names():
        raise KilnError(
            f"{layer.prefix}: its quantisation method loads pre-quantised checkpoints only, "
            f"so it cannot build random weights"
        )
    weight = normal((layer.output_size, layer.input_size)).to(dtype).cpu()
    for part_id in layer.part_ids:
        placement = layer.placement(part_id)
        rows = weight.narrow(0, placement.output_offset, placement.output_size)
        layer.load_checkpoint_tensor("weight", rows, part_id=part_id,
                                     source_name=f"{layer.prefix}.weight")


def _quantisable_layer_names(model_config: ModelConfig, quant_lm_head: bool) -> list[str]:
    """The model's linear layers in order (and the LM head when it is quantised), read off
    the model built on the meta device (no memory, ~0.1 s at 8B)."""
    with torch.device("meta"):
        model = get_model_class(model_config.architecture)(
            model_config, quant_config=NO_QUANTIZATION, parallel=SINGLE_PROCESS)
    names = [m.prefix for m in model.modules() if isinstance(m, LinearBase)]
    return names + ([LM_HEAD_PREFIX] if quant_lm_head else [])


def _quant_config(build_config: BuildConfig, checkpoint: Checkpoint | None,
                  source: str | Path, model_config: ModelConfig) -> QuantConfig:
    """The scheme and parameters the build flags ask for (ValueError naming a bad flag)."""
    if build_config.quant == KEEP_QUANTIZATION:
        # A pre-quantised checkpoint's reader says what it holds (kiln/checkpoint/).
        kept = getattr(checkpoint, "quant_config", None) if checkpoint is not None else None
        if kept is None:
            raise KilnError(f"--quant keep: {source} is not a quantised checkpoint this kiln "
                            f"reads; pick a scheme (fp8, int8-wo, int4-wo) to quantise it")
        return kept
    if build_config.quant_lm_head and build_config.quant == "none":
        raise KilnError("--quant-lm-head quantises the LM head with the build's scheme: add "
                        "--quant fp8, int8-wo or int4-wo, or drop the flag")
    options = {"group_size": build_config.group_size,
               "activation_scales": build_config.act_scales,
               "quantize_lm_head": True if build_config.quant_lm_head else None}
    if build_config.unquantized_layers:
        options["unquantized_layers"] = select_layers(
            build_config.unquantized_layers,
            _quantisable_layer_names(model_config, build_config.quant_lm_head))
    if build_config.quant != "none" and build_config.calibration:
        options.update(calibration=build_config.calibration,
                       calibration_samples=build_config.calibration_samples,
                       gptq=True if build_config.gptq else None)
    return quant_config_for_build(build_config.quant, options)


def kv_scales_record(model: CausalLM | None, build_config: BuildConfig,
                     checkpoint: Checkpoint | None) -> dict | None:
    """The build section's kv_scales: measured by --calibration for an FP8 cache; else those
    a prequantised checkpoint stores (recorded whatever this build's cache dtype, so an FP8
    cache chosen at serve time uses them too); else 1.0 for an FP8 cache (warned at load)."""
    quantization = checkpoint.quantization if checkpoint is not None else None
    fp8 = build_config.kv_cache_dtype == "fp8"
    if fp8 and build_config.calibration:
        return kv_scales_of(model, True)
    if quantization is not None and quantization.kv_scales:
        return stored_kv_scales(quantization.kv_scales)
    return kv_scales_of(model, False) if fp8 else None


def _calibrate(model: CausalLM, build_config: BuildConfig, quant_config: QuantConfig,
               checkpoint: Checkpoint | None, progress: bool) -> QuantConfig:
    """Run calibration (kiln/quant/calibration.py): it fills static input scales, the
    attention layers' KV scales and AWQ-scaled weights in place. Returns the quant config to
    record (the calibration's, when it reports one, e.g. with the sample count it used)."""
    from kiln.quant.calibration import calibrate

    # The checkpoint's tokenizer reads the calibration text (none: random token ids).
    result = calibrate(model, build_config, checkpoint=checkpoint, progress=progress)
    if getattr(quant_config, "prequantized", False):
        # --quant keep: only the KV cache was calibrated (the build section's kv_scales); the
        # checkpoint's weights and scales are as it stored them, so is its quant section (the
        # calibration's would claim AWQ for them).
        return quant_config
    return getattr(result, "quant_config", None) or quant_config


def engine_provenance(source, build_config: BuildConfig, checkpoint: Checkpoint | None,
                      model_config: ModelConfig) -> tuple[dict, dict]:
    """The manifest's generation config (the checkpoint's, EOS filled in from the model) and
    source section (path; the source files' sha256, none for random weights)."""
    generation_config = dict(checkpoint.generation_config) if checkpoint else {}
    eos = generation_config.get("eos_token_id", list(model_config.eos_token_ids) or None)
    if eos is not None:
        generation_config["eos_token_id"] = eos
    source_info = {"path": str(source), "files": {}}
    if checkpoint is not None and not build_config.random_weights:
        source_info["files"] = {p.name: sha256_file(p) for p in checkpoint.source_files}
    return generation_config, source_info


def build_engine(
    source: str | Path,
    output: str | Path,
    build_config: BuildConfig | None = None,
    *,
    hf_config: dict | None = None,
    force: bool = False,
    progress: bool = True,
    tp: int = 1,
    pp: int = 1,
) -> BuildSummary:
    """Build `source` (HF dir, config.json, .gguf) into an engine directory at `output`.
    `hf_config` overrides the source's config (presets for --random-weights). tp, pp > 1:
    one file per rank, each sliced (compiler/sharding.py)."""
    build_config = build_config or BuildConfig()
    output = Path(output)
    if output.exists() and not force:
        raise KilnError(f"{output} already exists; pass --force to replace it")
    started = time.perf_counter()
    checkpoint = None
    if hf_config is None:
        keep = build_config.quant == KEEP_QUANTIZATION
        checkpoint = read_checkpoint(source, weights=not build_config.random_weights,
                                     keep_quantized=keep)
        hf_config = checkpoint.config
        if checkpoint.quantization is not None and not keep:
            raise KilnError(f"{source} is a quantised checkpoint "
                            f"({checkpoint.quantization.describe()}); build it with --quant keep")
    model_config = model_config_from_hf(hf_config)
    max_model_len = _resolve_max_model_len(model_config, build_config.max_model_len)
    dtype = getattr(torch, build_config.dtype)
    quant_config = _quant_config(build_config, checkpoint, source, model_config)
    if build_config.calibration and importlib.util.find_spec("kiln.quant.calibration") is None:
        raise KilnError("calibration is not available in this build of kiln; drop --calibration")
    if build_config.kv_cache_dtype == "fp8" or quant_config.scheme == "fp8":
        check_fp8_device()
    if tp < 1 or pp < 1:
        raise KilnError(f"--tp {tp} --pp {pp}: both must be at least 1")
    if tp * pp > 1:
        from kiln.compiler.sharding import build_sharded_engine

        if build_config.quant_lm_head:
            raise KilnError("--quant-lm-head is not supported with --tp/--pp yet (the "
                            "vocabulary-parallel head keeps the compute dtype); drop one")

        return build_sharded_engine(
            source, output, build_config, checkpoint, model_config, max_model_len, quant_config,
            EngineLayout.for_sizes(tp, pp), force=force, progress=progress, started=started,
        )

    # Construct directly in the build dtype: an 8B model never exists in float32.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = get_model_class(model_config.architecture)(
            model_config, quant_config=quant_config, parallel=SINGLE_PROCESS
        )
    finally:
        torch.set_default_dtype(previous_dtype)
    processed: set[int] = set()
    if build_config.random_weights:
        processed = _random_init(model, build_config.seed, dtype,
                                 quantize_each_layer=not build_config.calibration)
    else:
        names = checkpoint.tensors.names()
        tensors = ((name, checkpoint.tensors.get(name)) for name in names)
        bar = tqdm(tensors, total=len(names), desc="converting", unit="tensor", disable=not progress)
        model.load_checkpoint_weights(bar, process=False)
    # Quantised layers still hold their full-precision weights here and run unquantised:
    # calibration measures activations (static and KV scales, AWQ) on that model.
    if build_config.calibration:
        quant_config = _calibrate(model, build_config, quant_config, checkpoint, progress)
    # Quantisation (round-to-nearest, or GPTQ's rounding: minutes for an 8B, so a bar).
    pending = [m for m in model.modules()
               if isinstance(m, CheckpointLoadable) and id(m) not in processed]
    gptq = bool(getattr(quant_config, "gptq", False))
    for module in tqdm(pending, desc="GPTQ", unit="module", disable=not (progress and gptq)):
        model.process_layer(module)
    compute_names = model.compute_dtype_names()
    weights = {
        name: (t.to(dtype) if name in compute_names else t).contiguous()
        for name, t in model.engine_state_dict().items()
    }

    build = {**build_config.model_dump(), "max_model_len": max_model_len}
    kv_scales = kv_scales_record(model, build_config, checkpoint)
    if kv_scales is not None:
        build["kv_scales"] = kv_scales
    generation_config, source_info = engine_provenance(source, build_config, checkpoint,
                                                       model_config)
    write_engine(
        output,
        rank_weights=[weights],
        layout=EngineLayout(),
        quant_config=quant_config,
        model_config=model_config,
        build=build,
        source=source_info,
        generation_config=generation_config,
        save_tokenizer=checkpoint.save_tokenizer if checkpoint else None,
        force=force,
    )
    return BuildSummary(
        engine_dir=output,
        architecture=model_config.architecture,
        num_parameters=sum(t.numel() for t in weights.values()),
        engine_bytes=sum(p.stat().st_size for p in output.rglob("*") if p.is_file()),
        seconds=time.perf_counter() - started,
    )
