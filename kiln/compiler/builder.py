"""The build pipeline: checkpoint → model parameters (fused, cast) → engine directory.

    read (checkpoint/)  →  config_from_hf  →  load_checkpoint_weights (fuse q|k|v, gate|up)
      →  cast to the build dtype  →  write_engine (temp dir, sha256 per file and per
         256 MiB chunk, rename)

Every transformation that does not depend on the requests happens here, once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kiln.compiler.manifest import write_engine
from kiln.compiler.verify import sha256_file
from kiln.checkpoint.base import Checkpoint
from kiln.config import BuildConfig
from kiln.errors import CheckpointError, KilnError
from kiln.models.config import ModelConfig
from kiln.models.registry import get_model_class


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


def read_checkpoint(source: str | Path, *, weights: bool = True) -> Checkpoint:
    """An HF directory, an HF config.json alone (random weights), or a .gguf file."""
    path = Path(source)
    if path.suffix == ".gguf":
        from kiln.checkpoint.gguf import read_gguf

        return read_gguf(path)
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


def _random_init(model: torch.nn.Module, seed: int) -> None:
    """Hugging Face-style init: normal(0, 0.02) matrices, ones for norms, zeros for biases."""
    # Drawn on the GPU when there is one: an 8B model's 8 G normal samples take minutes on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.zero_()
        elif param.dim() == 1:
            param.data.fill_(1.0)
        else:
            noise = torch.empty(param.shape, dtype=torch.float32, device=device)
            noise.normal_(0, 0.02, generator=generator)
            param.data.copy_(noise.to(param.dtype))


def build_engine(
    source: str | Path,
    output: str | Path,
    build_config: BuildConfig | None = None,
    *,
    hf_config: dict | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuildSummary:
    """Build `source` (HF dir, config.json, .gguf) into an engine directory at `output`.
    `hf_config` overrides the source's config (presets for --random-weights)."""
    build_config = build_config or BuildConfig()
    output = Path(output)
    if output.exists() and not force:
        raise KilnError(f"{output} already exists; pass --force to replace it")
    started = time.perf_counter()
    checkpoint = None
    if hf_config is None:
        checkpoint = read_checkpoint(source, weights=not build_config.random_weights)
        hf_config = checkpoint.config
    model_config = model_config_from_hf(hf_config)
    max_model_len = _resolve_max_model_len(model_config, build_config.max_model_len)
    dtype = getattr(torch, build_config.dtype)

    # Construct directly in the build dtype: an 8B model never exists in float32.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = get_model_class(model_config.architecture)(model_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    if build_config.random_weights:
        _random_init(model, build_config.seed)
    else:
        names = checkpoint.tensors.names()
        tensors = ((name, checkpoint.tensors.get(name)) for name in names)
        bar = tqdm(tensors, total=len(names), desc="converting", unit="tensor", disable=not progress)
        model.load_checkpoint_weights(bar)
    weights = {name: t.to(dtype).contiguous() for name, t in model.engine_state_dict().items()}

    build = {**build_config.model_dump(), "max_model_len": max_model_len}
    generation_config = dict(checkpoint.generation_config) if checkpoint else {}
    eos = generation_config.get("eos_token_id", list(model_config.eos_token_ids) or None)
    if eos is not None:
        generation_config["eos_token_id"] = eos
    source_info = {"path": str(source), "files": {}}
    if checkpoint is not None and not build_config.random_weights:
        source_info["files"] = {p.name: sha256_file(p) for p in checkpoint.source_files}
    write_engine(
        output,
        weights=weights,
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
