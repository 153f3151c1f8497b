"""User-facing configuration, validated at the edge with messages a person can act on."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import KilnError

DTYPES = ("bfloat16", "float16", "float32")

# `kiln build --quant keep`: the checkpoint's own quantisation (a pre-quantised checkpoint).
KEEP_QUANTIZATION = "keep"

# Step sizes: the one place they are set. A server (`kiln serve`, LLMEngine) bounds a step's
# latency with 512 sequences / 8,192 tokens: on the H100, 128/128 offline throughput rose
# from 13.1 k to 15.5 k output tok/s going from 256 to 512 sequences (BENCHMARKS.md), and
# decode at 256 rows is still weight-bound. SchedulerConfig takes the same defaults.
DEFAULT_MAX_NUM_SEQS = 512
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_BLOCK_SIZE = 16
# An FP8 KV cache's default block size (unless block_size is set): its V is stored
# dims-major in each block, so decode reads V in runs of a block's keys, and 16-byte runs
# (16 tokens) cost the copy twice its L2 traffic. At 32 tokens (TensorRT-LLM's default),
# decode attention over 448 rows of 2-4 k context takes 0.85 ms a layer against 1.01 ms at 16
# (H200, BENCHMARKS.md, 2026-12-04).
FP8_KV_DEFAULT_BLOCK_SIZE = 32
# While any request decodes, a prompt longer than this puts at most this many tokens into a
# step (its chunks share the cap with other long prompts): a server's decoding streams wait
# about one 512-token chunk (~8 ms at 8B on the H200) for a long prompt, not a whole step.
DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING = 512
# When a waiting request may start (SchedulerConfig, kiln/runtime/scheduler.py): while blocks
# are free, preempting by recompute when they run out (vLLM's way; the default), or only while
# every running request and it can reach its longest length at once (TensorRT-LLM's default,
# GUARANTEED_NO_EVICT): never a preemption, fewer requests at a time.
CAPACITY_POLICIES = ("max-utilization", "guaranteed-no-evict")
# Offline runs (`LLM` on a GPU) hand the engine every request at once and no one waits on a
# single step: larger steps, as vLLM's offline defaults for 80 GB cards (on the H100 at
# 128/128: 16.1 k against 15.6 k output tok/s at 512 / 8192 in one run), and no prefill cap
# while decoding, which only spaces out the prompts there: with it, 2048/2048 admitted 512
# prompt tokens a step, so its 450 requests took ~1,800 steps to start, each an eager mixed
# step, and the batch spent most of the run ramping up (BENCHMARKS.md, seventh session).
OFFLINE_GPU_DEFAULTS = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384,
                        "max_prefill_tokens_while_decoding": None}


class BuildConfig(BaseModel):
    """How `kiln build` turns a checkpoint into an engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="weight and activation dtype of the engine"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="longest sequence (prompt + output) the engine serves; "
        "defaults to the model's max_position_embeddings"
    )
    random_weights: bool = Field(
        False, description="fill weights with random values (benchmark engines; no checkpoint)"
    )
    seed: int = Field(0, description="seed for --random-weights")
    quant: str = Field(
        "none", description="quantisation scheme of the linear layers' weights (none: the "
        "engine dtype); one of kiln.quant.config.known_quant_schemes()"
    )

    group_size: int | None = Field(
        None, description="inputs per quantisation group (int8-wo: -1 = per channel, the "
        "default; int4-wo: default 128)"
    )
    act_scales: Literal["dynamic", "static"] | None = Field(
        None, description="fp8 activation scales: per token at run time (dynamic, the default) "
        "or one per tensor from --calibration (static)"
    )
    quant_lm_head: bool = Field(False, description="quantise the LM head too")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="the engine's default KV cache dtype (fp8: E4M3 with per-layer "
        "scales, calibrated with --calibration, else 1.0)"
    )
    calibration: str | None = Field(
        None, description="calibration data: 'sharegpt' or a file (activation, KV and AWQ scales)"
    )
    calibration_samples: int | None = Field(
        None, ge=1, description="calibration samples (default: the calibration's own)"
    )
    gptq: bool = Field(
        False, description="round the weights with GPTQ's error feedback from --calibration "
        "(instead of to nearest)"
    )
    unquantized_layers: list[str] | None = Field(
        None, description="linears the scheme leaves in the engine dtype: layer names "
        "(model.layers.11.mlp.down_proj), prefixes (model.layers.0) or globs "
        "(model.layers.*.self_attn.qkv_proj)"
    )

    @field_validator("quant")
    @classmethod
    def _known_quant_scheme(cls, scheme: str) -> str:
        # Imported here: kiln.quant brings torch, and this module is read before any build.
        from kiln.quant.config import known_quant_schemes

        known = known_quant_schemes() + [KEEP_QUANTIZATION]
        if scheme not in known:
            raise ValueError(
                f"unknown quantisation scheme {scheme!r}; this kiln knows: {', '.join(known)}"
            )
        return scheme

    @model_validator(mode="after")
    def _consistent_quantisation(self) -> "BuildConfig":
        # --quant keep takes the checkpoint's groups and scales as stored: a flag that would
        # change them is refused rather than ignored.
        keep_ignores = (
            ("--group-size", self.group_size is not None, "uses the checkpoint's own groups"),
            ("--quant-lm-head", self.quant_lm_head, "keeps the LM head the checkpoint stores"),
            ("--act-scales", self.act_scales is not None, "keeps the checkpoint's own "
             "activation scales"),
        )
        for flag, given, what_keep_does in keep_ignores:
            if given and self.quant == KEEP_QUANTIZATION:
                raise ValueError(f"{flag}: --quant keep {what_keep_does}; drop the flag")
        if self.act_scales == "static" and not self.calibration:
            raise ValueError("--act-scales static needs --calibration: static activation "
                             "scales are measured by running calibration data")
        if self.calibration_samples is not None and not self.calibration:
            raise ValueError("--calibration-samples needs --calibration")
        if self.gptq and (self.quant in ("none", KEEP_QUANTIZATION) or not self.calibration):
            raise ValueError("--gptq rounds the weights a build quantises, measured on "
                             "calibration data: it needs --quant fp8, int8-wo or int4-wo and "
                             "--calibration")
        if self.unquantized_layers is not None:
            if self.quant in ("none", KEEP_QUANTIZATION):
                raise ValueError("--unquantized-layers picks layers a build's scheme leaves "
                                 "unquantised: it needs --quant fp8, int8-wo or int4-wo (a "
                                 "--quant keep checkpoint says which layers it quantised)")
            if not self.unquantized_layers or not all(p.strip() for p in self.unquantized_layers):
                raise ValueError("--unquantized-layers has an empty layer name; give names, "
                                 "prefixes or globs separated by commas")
        if self.calibration and self.quant == "none" and self.kv_cache_dtype == "auto":
            raise ValueError("--calibration has nothing to calibrate without --quant or "
                             "--kv-cache-dtype fp8")
        if self.quant == KEEP_QUANTIZATION and self.calibration and self.kv_cache_dtype != "fp8":
            raise ValueError("--calibration with --quant keep only calibrates the FP8 KV "
                             "cache: add --kv-cache-dtype fp8 or drop it")
        return self


def validated(cls: type[BaseModel], **values) -> BaseModel:
    """Build a pydantic config, turning validation errors into one readable KilnError."""
    try:
        return cls(**values)
    except ValidationError as error:
        # A field's error shows the value given; a whole-config check (no loc) names its
        # flags in the message, and repeating every field after it would bury it.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            if e["loc"] else e["msg"].removeprefix("Value error, ")
            for e in error.errors()
        )
        raise KilnError(f"invalid {cls.__name__}: {problems}") from None


class EngineConfig(BaseModel):
    """Runtime knobs: the same names on `LLM(...)`, `LLMEngine` and the CLI."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(
        DEFAULT_BLOCK_SIZE, ge=1, le=1024,
        description=f"tokens per KV cache block ({FP8_KV_DEFAULT_BLOCK_SIZE} for an FP8 KV "
        f"cache unless set)",
    )
    max_num_seqs: int = Field(
        DEFAULT_MAX_NUM_SEQS, ge=1, le=65536, description="most requests in one step"
    )
    max_num_batched_tokens: int = Field(
        DEFAULT_MAX_NUM_BATCHED_TOKENS, ge=1, le=1 << 20,
        description="token budget of one step (prefill chunks + decodes)",
    )
    max_prefill_tokens_while_decoding: int | None = Field(
        DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING, ge=1, le=1 << 20,
        description="while any request decodes, prompts longer than this take at most this "
        "many tokens per step, together; None = no cap (offline runs on a GPU)",
    )
    capacity_policy: Literal[CAPACITY_POLICIES] = Field(  # the tuple spells the choices
        CAPACITY_POLICIES[0], description="when a waiting request may start: while KV blocks "
        "are free, preempting the newest when they run out (max-utilization), or only while "
        "every running request can reach prompt + max_tokens at once (guaranteed-no-evict, "
        "TensorRT-LLM's default: no preemption, fewer requests at a time)",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="longest prompt + output; defaults to the engine's"
    )
    num_kv_blocks: int | None = Field(
        None, ge=2, description="KV pool size in blocks; overrides sizing from memory"
    )
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(
        0.90, gt=0.0, le=1.0, description="fraction of GPU memory for weights + KV cache"
    )
    device: str | None = Field(None, description="'cuda', 'cuda:N' or 'cpu'; default cuda if present")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="compute dtype; auto = the engine's on a GPU, float32 on the CPU "
        "(CPU bfloat16 matmuls are several times slower than float32 ones)"
    )
    kv_cache_dtype: Literal["auto", "bfloat16", "float16", "float32", "fp8"] = Field(
        "auto", description="dtype of the paged KV cache; auto = the engine's build choice "
        "(--kv-cache-dtype at build), else the compute dtype; fp8 = E4M3 with per-layer scales"
    )
    enable_cuda_graphs: bool = Field(True, description="replay decode steps as CUDA graphs")
    overlap_scheduling: bool | None = Field(
        None, description="schedule and prepare step N+1 on the host while the GPU runs step N; "
        "default on for CUDA, off on the CPU (where host and 'device' are the same cores)"
    )
    verify_hashes: bool = Field(True, description="check every engine file's sha256 at load")
    cpu_kv_cache_bytes: int = Field(
        1 << 30, ge=1 << 20, description="KV pool size on the CPU when num_kv_blocks is unset"
    )
    # Tensor / pipeline parallelism (kiln/parallel/): None = the engine's layout; an engine
    # runs only with the layout it was built for (`kiln build --tp N --pp M`).
    tensor_parallel_size: int | None = Field(
        None, ge=1, le=64, description="tensor-parallel ranks (default: the engine's)"
    )
    pipeline_parallel_size: int | None = Field(
        None, ge=1, le=64, description="pipeline stages (default: the engine's)"
    )
