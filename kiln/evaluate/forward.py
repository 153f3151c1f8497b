"""An engine's model run directly on token windows (teacher forcing), not through the
generation engine, over a private paged KV cache just large enough, logits at every
position. Two paths:

    prefill   one full-sequence forward per window (the prompt kernels)
    decode    a batch of windows fed one token a step, each step's rows attending over the
              cache as generation does (the decode kernels: an FP8 cache's decode dots, its
              split-K, its block size), logits of every row each step

Used by `kiln eval` (perplexity, agreement, KL) and `kiln verify` (per-layer diffs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import EngineInfo, open_engine
from kiln.errors import KilnError
from kiln.runtime.engine import resolve_device
from kiln.runtime.input_batch import BatchRow, prepare_inputs
from kiln.runtime.kv_tensors import (
    KVCacheSpec,
    allocate_kv_caches,
    apply_kv_scales,
    default_block_size,
    kv_cache_torch_dtype,
)

_KV_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8")


def compute_dtype_for(engine: EngineInfo, device: torch.device, dtype: str = "auto") -> torch.dtype:
    """EngineConfig's rule: the engine's dtype on a GPU, float32 on the CPU (where bf16
    matmuls are several times slower), unless a dtype is given."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return engine.dtype if device.type == "cuda" else torch.float32


class TeacherForcedModel:
    """One engine's model on a device, giving the logits of every position of a window."""

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        max_window: int | None = None,
        max_windows: int = 1,  # windows held in the cache at once (the decode path's batch)
    ) -> None:
        self.engine = open_engine(engine_dir)
        self.device = resolve_device(device)
        self.dtype = compute_dtype_for(self.engine, self.device, dtype)
        if kv_cache_dtype not in _KV_DTYPES:
            raise KilnError(
                f"--kv-cache-dtype {kv_cache_dtype!r}: expected one of {', '.join(_KV_DTYPES)}"
            )
        build = self.engine.manifest.get("build", {})
        # The runtime's rules: "auto" is the engine's build choice, else the compute dtype.
        self.kv_cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, self.dtype, build)
        if max_windows < 1:
            raise KilnError(f"max_windows must be at least 1, got {max_windows}")
        self.max_window = min(max_window or self.engine.max_model_len, self.engine.max_model_len)
        self.max_windows = max_windows
        self.model = load_engine_model(self.engine, self.device, self.dtype)
        apply_kv_scales(self.model, build, self.kv_cache_dtype)
        # The engine's block size for this cache (an FP8 cache's decode tiles follow it).
        self.block_size = default_block_size(self.kv_cache_dtype)
        self.blocks_per_window = -(-self.max_window // self.block_size)
        num_blocks = self.blocks_per_window * max_windows + 1  # + the null block
        spec = KVCacheSpec.of_model(self.model, self.kv_cache_dtype)
        self.kv_caches = allocate_kv_caches(spec, num_blocks, self.block_size, self.device)
        self.block_ids = list(range(1, num_blocks))

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def text_tokenizer(self, borrowed: str | None = None):
        """The engine's own tokenizer, or `borrowed` (another model's, --tokenizer) checked
        to fit this vocabulary: a random-weight engine has none."""
        from kiln.checkpoint.tokenizer import borrowed_tokenizer, load_tokenizer

        if borrowed is not None:
            return borrowed_tokenizer(borrowed, self.vocab_size)
        if self.engine.tokenizer_dir is None:
            raise KilnError(f"{self.engine.path}: the engine has no tokenizer, so it cannot read "
                            "text (a random-weight engine: give --tokenizer MODEL to borrow one)")
        return load_tokenizer(self.engine.tokenizer_dir)

    @torch.no_grad()
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:  # (T, H)
        """The final hidden states of one window (len ≤ max_window), from an empty cache."""
        if not 0 < len(token_ids) <= self.max_window:
            raise KilnError(f"a window of {len(token_ids)} tokens; this model takes 1..{self.max_window}")
        row = BatchRow(
            request_id="eval",
            token_ids=token_ids,
            num_computed_tokens=0,
            block_ids=self.block_ids[: -(-len(token_ids) // self.block_size)],
            logits_offsets=tuple(range(len(token_ids))),
        )
        inputs = prepare_inputs([row], self.block_size, self.device)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:  # (T, V) float32
        return self.model.compute_logits(self.hidden_states(token_ids)).float()

    @torch.no_grad()
    def decode_logits(self, windows: list[list[int]]) -> Iterator[torch.Tensor]:
        """The decode path: step i feeds token i of every window longer than i + 1 (one
        single-token row each, its first i tokens already cached) and yields those rows'
        logits, (rows, V) float32, in window order; step i's row of window w predicts
        w[i + 1]. Windows longer first, so a step's rows are a prefix of the batch."""
        if not 0 < len(windows) <= self.max_windows:
            raise KilnError(f"{len(windows)} windows at once; this model holds 1..{self.max_windows}")
        lengths = [len(w) for w in windows]
        if lengths != sorted(lengths, reverse=True) or not 1 < lengths[-1] <= lengths[0] <= self.max_window:
            raise KilnError(f"windows of {lengths} tokens: each 2..{self.max_window}, longest first")
        tables = [self.block_ids[i * self.blocks_per_window : (i + 1) * self.blocks_per_window]
                  for i in range(len(windows))]
        for step in range(lengths[0] - 1):
            rows = [
                BatchRow(request_id=f"eval{index}", token_ids=[window[step]],
                         num_computed_tokens=step, block_ids=tables[index], logits_offsets=(0,))
                for index, window in enumerate(windows) if len(window) > step + 1
            ]
            inputs = prepare_inputs(rows, self.block_size, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
            yield self.model.compute_logits(hidden).float()
