"""Draft-model proposals: a second, smaller kiln engine with the same tokenizer, run in the
same process with its own paged KV cache (and CUDA graphs on a GPU).

Per request the draft keeps the tokens whose KV its cache holds. Each step:

    1. sync      the target's committed tokens (prompt + outputs) are compared with the
                 draft's: the common prefix stays, the rest (proposals the target rejected)
                 is rolled back and its blocks freed; preemption of the target changes
                 nothing here (the draft's cache is its own)
    2. catch up  tokens the draft has not computed but the last are run without logits
                 (a new request's prompt, the target's bonus token), in chunks that fit the
                 draft's input buffers
    3. propose   k decode forwards over the batch: the last known token, then each
                 forward's argmax fed to the next on the device (a CUDA graph per forward
                 on a GPU); one device → host copy of the (B, k) proposals at the end

Proposals are the draft's argmax: a point mass, which rejection sampling verifies exactly
for greedy and random requests alike (kiln/spec/rejection.py). A request the draft has no
blocks for gets no proposals this step (its draft state is dropped and rebuilt later).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.compiler.manifest import EngineInfo, open_engine
from kiln.errors import KilnError
from kiln.runtime.input_batch import BatchRow
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.messages import PLACEHOLDER_TOKEN_ID
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.token_history import token_ids_between
from kiln.spec.proposer import ProposalRequest, Proposer

_ONE_TOKEN_LOGITS = (0,)
# The draft's share of GPU memory for its KV cache, of what the engine may use.
DRAFT_KV_MEMORY_SHARE = 0.1


@dataclass
class _DraftSequence:
    """What the draft's cache holds for one request (the KVCacheManager's view of it)."""

    request_id: str
    # Tokens whose KV is computed: the first num_computed_tokens of the request's history
    # as the draft saw it (proposals included, until the target's outcome is compared).
    tokens: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    # Of `tokens`, how many are known to be the target's committed tokens.
    num_verified: int = 0

    @property
    def num_computed_tokens(self) -> int:
        return len(self.tokens)


def tokenizer_fingerprint(info: EngineInfo) -> str | None:
    """sha256 over the engine's tokenizer files (None: the engine has no tokenizer)."""
    directory = info.tokenizer_dir
    if directory is None:
        return None
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        path = Path(directory) / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_draft_compatible(target: EngineInfo, draft: EngineInfo, draft_path: str,
                           max_model_len: int) -> None:
    """One-line errors for a draft the target cannot verify."""
    target_vocab, draft_vocab = target.model_config.vocab_size, draft.model_config.vocab_size
    if target_vocab != draft_vocab:
        raise KilnError(
            f"draft engine {draft_path} has a vocabulary of {draft_vocab} tokens, the target "
            f"{target_vocab}: a draft must use the target's tokenizer"
        )
    if tokenizer_fingerprint(target) != tokenizer_fingerprint(draft):
        raise KilnError(
            f"draft engine {draft_path} has a different tokenizer from the target (its "
            f"tokenizer files differ): a draft must use the target's tokenizer"
        )
    if draft.max_model_len < max_model_len:
        raise KilnError(
            f"draft engine {draft_path} serves {draft.max_model_len} tokens, the target "
            f"{max_model_len}: rebuild the draft with --max-model-len {max_model_len} or "
            f"lower max_model_len"
        )


class DraftProposer(Proposer):
    def __init__(
        self,
        draft_path: str,
        target: EngineInfo,
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_cuda_graphs: bool,
        gpu_memory_utilization: float,
        cpu_kv_cache_bytes: int,
        verify_hashes: bool = True,
        num_kv_blocks: int | None = None,
    ) -> None:
        from kiln.compiler.engine_cache import resolve_engine

        # An engine directory, or anything `kiln build` takes (built once into the cache).
        info = open_engine(resolve_engine(draft_path), verify_hashes=verify_hashes)
        check_draft_compatible(target, info, draft_path, max_model_len)
        self.engine_info = info
        gpu_share = None
        if device.type == "cuda" and num_kv_blocks is None:
            # Sized before the target's runner, which then sees this memory as in use.
            free, total = torch.cuda.mem_get_info(device)
            weights = sum(entry["bytes"] for entry in info.manifest.get("files", {}).values())
            gpu_share = min(1.0, (total - free + weights) / total
                            + DRAFT_KV_MEMORY_SHARE * gpu_memory_utilization)
        self.runner = ModelRunner(
            info, device, dtype, block_size, num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, enable_cuda_graphs=enable_cuda_graphs,
            gpu_memory_utilization=gpu_share or gpu_memory_utilization,
            cpu_kv_cache_bytes=cpu_kv_cache_bytes,
        )
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(self.runner.num_kv_blocks, block_size, enable_prefix_caching=False)
        self._sequences: dict[str, _DraftSequence] = {}
        self.num_forwards = 0

    # ---- the proposer interface -------------------------------------------------------

    def propose(self, requests: Sequence[ProposalRequest]) -> dict[str, list[int]]:
        if self.runner.model is None:
            raise RuntimeError("the draft proposer is closed")
        batch: list[tuple[_DraftSequence, list[int], int]] = []  # (sequence, to feed, k)
        # Every request runs the batch's largest k forwards (one batch per forward).
        max_k = max((request.num_tokens for request in requests), default=0)
        # ... but never feeding a position past max_model_len - 1 (the last fed proposal
        # of a request is at num_known - 1 + max_k - 1).
        for request in requests:
            num_known = len(request.prompt_token_ids) + len(request.output_token_ids)
            max_k = min(max_k, self.max_model_len - num_known + 1)
        for request in requests:
            sequence = self._sync(request)
            num_known = len(request.prompt_token_ids) + len(request.output_token_ids)
            to_feed = token_ids_between(request.prompt_token_ids, request.output_token_ids,
                                        sequence.num_computed_tokens, num_known)
            k = min(request.num_tokens, max_k)
            if k < 1:
                continue
            # Slots for the fed tokens and max_k - 1 proposals (the last is never fed).
            if not self.kv.allocate_slots(sequence, len(to_feed) + max_k - 1):
                self._drop_one(request.request_id)
                continue
            batch.append((sequence, to_feed, k))
        if not batch:
            return {}
        return self._run(batch)

    def drop(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._drop_one(request_id)

    def close(self) -> None:
        self._sequences.clear()
        if self.runner.model is not None:
            self.runner.close()

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    # ---- internals ----------------------------------------------------------------------

    def _sync(self, request: ProposalRequest) -> _DraftSequence:
        """The request's draft sequence, rolled back to its common prefix with the target's
        committed tokens (and never past the last one, which gives the first proposal)."""
        sequence = self._sequences.get(request.request_id)
        if sequence is None:
            sequence = _DraftSequence(request.request_id)
            self._sequences[request.request_id] = sequence
        prompt, outputs = request.prompt_token_ids, request.output_token_ids
        num_known = len(prompt) + len(outputs)
        common = min(sequence.num_verified, num_known)
        tail = sequence.tokens[common:]
        if tail:  # proposals fed last step: keep those the target accepted
            committed = token_ids_between(prompt, outputs, common,
                                          min(num_known, common + len(tail)))
            for draft_token, target_token in zip(tail, committed):
                if draft_token != target_token:
                    break
                common += 1
        common = min(common, num_known - 1)
        if common < sequence.num_computed_tokens:
            del sequence.tokens[common:]
            self.kv.trim(sequence, common)
        sequence.num_verified = common
        return sequence

    def _drop_one(self, request_id: str) -> None:
        sequence = self._sequences.pop(request_id, None)
        if sequence is not None:
            self.kv.free(sequence)

    @torch.inference_mode()
    def _run(self, batch: list[tuple[_DraftSequence, list[int], int]]) -> dict[str, list[int]]:
        runner = self.runner
        capacity = runner.buffers.max_num_tokens
        # 2. Catch up. A few tokens each (the usual: the last token, or a rejected
        # proposal's replacement, or the bonus token after the last proposal) go in the
        # first propose forward as one-token rows, which a decode graph replays; longer
        # runs (a new request's prompt) go first, eagerly, without logits, in chunks
        # within the input buffers, until one token each is left.
        few = sum(len(to_feed) for _, to_feed, _ in batch) <= runner.buffers.max_num_seqs
        while not few and any(len(to_feed) > 1 for _, to_feed, _ in batch):
            budget = capacity
            rows = []
            for sequence, to_feed, _ in batch:
                take = min(len(to_feed) - 1, budget)
                if take <= 0:
                    continue
                chunk = to_feed[:take]
                rows.append(BatchRow(sequence.request_id, chunk, sequence.num_computed_tokens,
                                     sequence.block_ids))
                sequence.tokens += chunk
                del to_feed[:take]
                budget -= take
            if not rows:
                break
            runner.forward_rows(rows)
            self.num_forwards += 1
        # 3. Propose: k forwards of one token per request (the batch's largest k; a
        # request with a smaller k returns fewer proposals).
        max_k = max(k for _, _, k in batch)
        proposals = []
        rows, last_rows = [], []
        for sequence, to_feed, _ in batch:
            for index, token in enumerate(to_feed):
                rows.append(BatchRow(sequence.request_id, [token],
                                     sequence.num_computed_tokens + index, sequence.block_ids,
                                     _ONE_TOKEN_LOGITS))
            last_rows.append(len(rows) - 1)
        logits = runner.forward_rows(rows)
        if len(rows) != len(batch):  # each request's proposal comes from its last token
            logits = logits[torch.tensor(last_rows, device=logits.device)]
        feed = logits.argmax(dim=-1)  # (B,) on the device
        proposals.append(feed)
        self.num_forwards += 1
        for step in range(1, max_k):
            rows = [BatchRow(sequence.request_id, [PLACEHOLDER_TOKEN_ID],
                             sequence.num_computed_tokens + len(to_feed) - 1 + step,
                             sequence.block_ids, _ONE_TOKEN_LOGITS)
                    for sequence, to_feed, _ in batch]
            logits = runner.forward_rows(rows, feed)
            self.num_forwards += 1
            feed = logits.argmax(dim=-1)  # (B,) on the device
            proposals.append(feed)
        tokens = torch.stack(proposals, dim=1).tolist()  # (B, max_k): the one sync
        result = {}
        for (sequence, to_feed, k), proposed in zip(batch, tokens):
            # Computed now: the last known token and the first max_k - 1 proposals (their
            # KV stays valid for whichever of them the target commits).
            sequence.num_verified = len(sequence.tokens) + len(to_feed)
            sequence.tokens += to_feed + proposed[: max_k - 1]
            result[sequence.request_id] = proposed[:k]
        return result
