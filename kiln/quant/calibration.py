"""Calibration at build (`kiln build --calibration sharegpt|FILE`): run real text through the
model while its quantised layers still hold their full-precision weights (the builder calls
`calibrate` between loading and quantising; kiln/quant/quantize.py), and measure

    per linear layer   max |x| of its input over every token      → fp8 static input_scale
                       (amax / 448, --act-scales static)
                       mean |x| per input channel and a sample of   → AWQ (kiln/quant/awq.py)
                       input rows                                       for int4-wo, int8-wo
                       E[x xᵀ] over every token (with --gptq)       → GPTQ's rounding
                                                                       (kiln/quant/gptq.py)
                       then, with --gptq, a second pass rounds the decoder layers one by
                       one against the full-precision model (kiln/quant/gptq_sequential.py)
    per attention      the keys' per-channel mean as written to     → k_offset (FP8 KV
                       the cache (after RoPE), max |k - mean|,          subtracts it),
                       max |v|                                         k_scale, v_scale
                                                                       (amax / 448, fp8 KV)

Data: the calibration half of ShareGPT's assistant replies (even-indexed conversations; `kiln
eval` uses the odd ones, see kiln/evaluate/corpus.py) or a text/JSONL file, cut into
`--calibration-samples` samples of SAMPLE_TOKENS tokens. A random-weight build has no
tokenizer: it calibrates on random token ids (for timing; its scales mean nothing).

Runs on the GPU when there is one (the model moves there for the forward and back after),
else on the CPU in float32 (bf16 matmuls are several times slower there; bf16 → float32 →
bf16 is exact, so the weights come back unchanged).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import KilnError
from kiln.layers.attention import Attention
from kiln.layers.linear import LinearBase
from kiln.quant.awq import apply_awq, runs_awq
from kiln.quant.gptq import CALIBRATION_GRAM
from kiln.quant.gptq_sequential import gptq_layer_by_layer, layer_linears
from kiln.quant.quantize import FP8_MAX, FULL_PRECISION

DEFAULT_SAMPLES = 128
SAMPLE_TOKENS = 512
MIN_SAMPLES = 8
# Input rows kept per linear layer for AWQ's error measurement (a random subset of tokens).
AWQ_ROWS = 512
_BLOCK_SIZE = 16
_TOKENS_PER_FORWARD = {"cuda": 16384, "cpu": 2048}


@dataclass
class LinearStatistics:
    """What calibration saw at one linear layer's input (on the calibration device)."""

    amax: float = 0.0  # max |x| over every token
    abs_sum: torch.Tensor | None = None  # (in,) Σ_tokens |x|, float32
    tokens: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)  # sampled (n, in) float32 inputs
    gram: torch.Tensor | None = None  # (in, in) Σ_tokens x xᵀ, float32 (with --gptq)

    @property
    def mean_abs(self) -> torch.Tensor:  # (in,)
        return self.abs_sum / max(1, self.tokens)

    def sample(self) -> torch.Tensor:  # (≤ AWQ_ROWS, in)
        return torch.cat(self.rows)[:AWQ_ROWS]


@dataclass
class CalibrationResult:
    """What `calibrate` measured and the quant config the manifest records (with the
    calibration source and sample count, and awq=True when AWQ ran)."""

    quant_config: object  # QuantConfig
    num_samples: int
    num_tokens: int
    linears: dict[str, LinearStatistics]  # by layer prefix
    kv: list["KVStatistics"]  # per attention layer


@dataclass
class KVStatistics:
    """What calibration saw written to one attention layer's cache (float64 sums)."""

    key_sum: torch.Tensor  # (Hkv, D) Σ_tokens k
    key_max: torch.Tensor  # (Hkv, D) per-channel max of k
    key_min: torch.Tensor  # (Hkv, D)
    value_amax: float  # max |v|
    tokens: int

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor) -> "KVStatistics":  # (n, Hkv, D) each
        keys = keys.double()
        return cls(keys.sum(0), keys.amax(0), keys.amin(0), float(values.abs().amax()),
                   keys.shape[0])

    def merged(self, other: "KVStatistics") -> "KVStatistics":
        return KVStatistics(self.key_sum + other.key_sum, torch.maximum(self.key_max, other.key_max),
                            torch.minimum(self.key_min, other.key_min),
                            max(self.value_amax, other.value_amax), self.tokens + other.tokens)

    @property
    def key_mean(self) -> torch.Tensor:  # (Hkv, D) float32
        return (self.key_sum / max(1, self.tokens)).float()

    @property
    def centred_key_amax(self) -> float:
        """max |k - mean| over every token and channel (from the per-channel extremes)."""
        mean = self.key_sum / max(1, self.tokens)
        return float(torch.maximum(self.key_max - mean, mean - self.key_min).amax())


# ─── data ───────────────────────────────────────────────────────────────────────────────


def calibration_samples(
    source: str, tokenizer, num_samples: int, vocab_size: int, seed: int = 0,
    sample_tokens: int = SAMPLE_TOKENS,
) -> list[list[int]]:
    """`num_samples` token-id lists of `sample_tokens` each, from `source` (the calibration
    half of it), or random ids when there is no tokenizer (random-weight builds)."""
    if num_samples < MIN_SAMPLES:
        raise KilnError(f"--calibration-samples {num_samples} is too few to calibrate on; use at "
                        f"least {MIN_SAMPLES} (default {DEFAULT_SAMPLES})")
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (num_samples, sample_tokens), generator=generator)
        return ids.tolist()
    from kiln.evaluate.corpus import documents, token_stream

    wanted = num_samples * sample_tokens
    ids = token_stream(tokenizer, documents(source, "calibration"), wanted)
    if len(ids) < wanted:
        raise KilnError(
            f"--calibration {source}: {len(ids):,} tokens of text make only "
            f"{len(ids) // sample_tokens} samples of {sample_tokens} tokens, {num_samples} asked "
            f"for; give more text or fewer --calibration-samples"
        )
    return [ids[i * sample_tokens : (i + 1) * sample_tokens] for i in range(num_samples)]


def tokenizer_of(checkpoint):
    """The checkpoint's tokenizer (written to a temporary directory and loaded), or None."""
    if checkpoint is None or checkpoint.save_tokenizer is None:
        return None
    from kiln.checkpoint.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save_tokenizer(Path(directory))
        return load_tokenizer(Path(directory))


# ─── running the model ──────────────────────────────────────────────────────────────────


class _Capture:
    """Forward hooks recording every quantised linear's input and nothing else."""

    def __init__(self, model: nn.Module, keep_rows: bool, generator: torch.Generator,
                 keep_gram: bool = False, skip_gram: set[str] = frozenset()):
        self.linears: dict[str, LinearStatistics] = {}
        self.keep_rows = keep_rows
        self.keep_gram = keep_gram
        self.skip_gram = skip_gram
        self.generator = generator
        self.rows_per_forward = 0
        self.handles = [
            layer.register_forward_pre_hook(self._hook(layer.prefix))
            for layer in model.modules()
            if isinstance(layer, LinearBase) and getattr(layer, FULL_PRECISION, None) is not None
        ]

    def _hook(self, prefix: str):
        def record(module, inputs):
            x = inputs[0].detach().float()  # (T, in)
            stats = self.linears.setdefault(prefix, LinearStatistics())
            stats.amax = max(stats.amax, float(x.abs().amax()))
            column_sum = x.abs().sum(0)
            stats.abs_sum = column_sum if stats.abs_sum is None else stats.abs_sum + column_sum
            stats.tokens += x.shape[0]
            if self.keep_gram and prefix not in self.skip_gram:
                gram = x.T @ x
                stats.gram = gram if stats.gram is None else stats.gram.add_(gram)
            if self.keep_rows and self.rows_per_forward:
                pick = torch.randperm(x.shape[0], generator=self.generator)[: self.rows_per_forward]
                stats.rows.append(x[pick.to(x.device)].clone())
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _move_staged(model: nn.Module, device: torch.device) -> None:
    for layer in model.modules():
        staged = getattr(layer, FULL_PRECISION, None)
        if staged is not None:
            setattr(layer, FULL_PRECISION, staged.to(device))


class _Batches:
    """The calibration samples cut into forwards of several samples each, every sample its
    own blocks of one zeroed cache per layer; `run(i)` forwards batch i."""

    def __init__(self, model: nn.Module, samples: list[list[int]], device: torch.device,
                 dtype: torch.dtype) -> None:
        from kiln.runtime.kv_tensors import KVCacheSpec

        self.model, self.samples, self.device = model, samples, device
        self.per_forward = max(1, _TOKENS_PER_FORWARD[device.type] // len(samples[0]))
        self.blocks_per_sample = -(-len(samples[0]) // _BLOCK_SIZE)
        self.spec = KVCacheSpec.of_model(model, dtype)
        num_blocks = 1 + self.per_forward * self.blocks_per_sample
        shape = (2, num_blocks, _BLOCK_SIZE, self.spec.num_kv_heads, self.spec.head_dim)
        self.caches = [torch.zeros(shape, dtype=dtype, device=device)
                       for _ in range(self.spec.num_layers)]

    def __len__(self) -> int:
        return -(-len(self.samples) // self.per_forward)

    def batch(self, index: int) -> list[list[int]]:
        return self.samples[index * self.per_forward : (index + 1) * self.per_forward]

    def run(self, index: int):
        """Forward batch `index`; returns its inputs (the slots it wrote)."""
        from kiln.runtime.input_batch import BatchRow, prepare_inputs

        per = self.blocks_per_sample
        rows = [
            BatchRow(request_id=str(i), token_ids=ids, num_computed_tokens=0,
                     block_ids=list(range(1 + i * per, 1 + (i + 1) * per)), logits_offsets=())
            for i, ids in enumerate(self.batch(index))
        ]
        inputs = prepare_inputs(rows, _BLOCK_SIZE, self.device)
        for cache in self.caches:
            cache.zero_()
        self.model(inputs.input_ids, inputs.positions, self.caches, inputs.metadata)
        return inputs


def _run(batches: _Batches, capture: _Capture, progress: bool) -> list[KVStatistics]:
    """Forward every sample over a zeroed cache; returns per attention layer what was
    written to the cache."""
    spec = batches.spec
    kv: list[KVStatistics | None] = [None] * spec.num_layers
    # About AWQ_ROWS rows per layer in all, spread over the forwards.
    capture.rows_per_forward = -(-AWQ_ROWS * batches.per_forward // len(batches.samples))
    bar = tqdm(total=len(batches.samples), desc="calibrating", unit="sample",
               disable=not progress, file=sys.stderr)
    for index in range(len(batches)):
        inputs = batches.run(index)
        slots = inputs.metadata.slot_mapping
        slots = slots[slots >= 0]
        for layer, cache in enumerate(batches.caches):
            flat = cache.view(2, -1, spec.num_kv_heads, spec.head_dim)  # (2, slots, Hkv, D)
            seen = KVStatistics.of(flat[0, slots], flat[1, slots])
            kv[layer] = seen if kv[layer] is None else kv[layer].merged(seen)
        bar.update(len(batches.batch(index)))
    bar.close()
    return kv


def _compute_dtype_params(model: nn.Module) -> list[torch.Tensor]:
    names = model.compute_dtype_names()
    return [p for name, p in model.named_parameters() if name in names]


@torch.no_grad()
def calibrate(model: nn.Module, build_config, *, checkpoint=None, progress: bool = True
              ) -> CalibrationResult:
    """Measure the model on calibration data and write what the build asked for into it:
    static FP8 input scales, attention KV scales, AWQ-scaled weights (int4-wo, int8-wo), and with
    --gptq each quantised linear's input second moment for GPTQ's rounding."""
    quant_config = model.quant_config
    scheme = quant_config.scheme
    gptq = bool(getattr(quant_config, "gptq", False))
    awq = runs_awq(model, scheme, gptq)
    source = build_config.calibration
    num_samples = build_config.calibration_samples or DEFAULT_SAMPLES
    tokenizer = tokenizer_of(checkpoint)
    if tokenizer is None and not build_config.random_weights:
        raise KilnError("--calibration needs the checkpoint's tokenizer to read text, and this "
                        "checkpoint has none")
    # Samples fit the model's context (and --max-model-len).
    sample_tokens = min(SAMPLE_TOKENS, model.config.max_position_embeddings,
                        build_config.max_model_len or SAMPLE_TOKENS)
    samples = calibration_samples(source, tokenizer, num_samples, model.config.vocab_size,
                                  seed=build_config.seed, sample_tokens=sample_tokens)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = _compute_dtype_params(model)
    build_dtype = params[0].dtype
    run_dtype = build_dtype if device.type == "cuda" else torch.float32
    originals = [(p, p.data) for p in params]
    for p in params:
        p.data = p.data.to(device=device, dtype=run_dtype)
    buffers = [(b, b.data) for b in model.buffers()]
    for b in model.buffers():
        b.data = b.data.to(device)
    _move_staged(model, device)
    # Decoder layers' linears are rounded layer by layer after this pass (gptq_sequential);
    # any other (a quantised LM head) from this pass's second moment.
    layer_by_layer = layer_linears(model) if gptq else set()
    capture = _Capture(model, keep_rows=awq, keep_gram=gptq, skip_gram=layer_by_layer,
                       generator=torch.Generator().manual_seed(build_config.seed))
    batches = _Batches(model, samples, device, run_dtype)
    try:
        kv = _run(batches, capture, progress)
    finally:
        capture.close()
    if gptq:
        _attach_grams(model, capture.linears)
    if awq:  # searches and folds on `device` (weights and statistics are there); not with gptq
        apply_awq(model, capture.linears, progress=progress)
    if layer_by_layer:
        gptq_layer_by_layer(model, len(batches), batches.run, progress=progress)
    del batches  # its caches
    for p, original in originals:  # back to the build's device and dtype (AWQ folded norms)
        p.data = p.data.to(device=original.device, dtype=original.dtype)
    for b, original in buffers:
        b.data = b.data.to(original.device)

    _set_scales(model, capture.linears, kv)
    changes = {"calibration": str(source), "calibration_samples": len(samples)}
    if awq:
        changes["awq"] = True
    result_config = dataclasses.replace(quant_config, **changes) if scheme != "none" else quant_config
    return CalibrationResult(
        quant_config=result_config, num_samples=len(samples),
        num_tokens=len(samples) * sample_tokens, linears=capture.linears, kv=kv,
    )


def _attach_grams(model: nn.Module, linears: dict[str, LinearStatistics]) -> None:
    """Each staged linear gets E[x xᵀ] of its inputs (CALIBRATION_GRAM), which
    process_weights_after_loading hands to GPTQ (kiln/quant/gptq.py)."""
    for layer in model.modules():
        stats = linears.get(getattr(layer, "prefix", None))
        if (isinstance(layer, LinearBase) and getattr(layer, FULL_PRECISION, None) is not None
                and stats is not None and stats.gram is not None):
            setattr(layer, CALIBRATION_GRAM, stats.gram.div_(max(1, stats.tokens)))
            stats.gram = None


def _set_scales(model: nn.Module, linears: dict[str, LinearStatistics],
                kv: list[KVStatistics]) -> None:
    """Static FP8 input scales (amax / 448); attention key offsets (the keys' mean) and KV
    scales (amax of k - offset and of v, / 448)."""
    for layer in model.modules():
        if isinstance(layer, LinearBase) and hasattr(layer, "input_scale") and layer.prefix in linears:
            amax = linears[layer.prefix].amax
            layer.input_scale.data.fill_(max(amax, 1e-12) / FP8_MAX)
    attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer, seen in zip(attention_layers, kv):
        layer.k_offset.copy_(seen.key_mean)
        layer.k_scale.fill_(max(seen.centred_key_amax, 1e-12) / FP8_MAX)
        layer.v_scale.fill_(max(seen.value_amax, 1e-12) / FP8_MAX)
