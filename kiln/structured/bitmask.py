"""Token bitmasks: which token ids a row may sample, 32 per int32 word.

Layout (xgrammar's): row r, token t is allowed when bit (t % 32) of word [r, t // 32] is set;
a row of all ones (-1) allows everything. The host builds a step's mask (xgrammar fills the
rows of constrained requests) and the sampler applies it on the logits' device, before
penalties and temperature, by setting disallowed logits to -inf.

`apply_token_bitmask` is plain torch, the same on every device: at batch 64 and a 128k
vocabulary it touches 32 MB, a few tens of microseconds on an H200, next to a decode step of
milliseconds. Its oracle in the tests is xgrammar's own CPU kernel.
"""

from __future__ import annotations

import torch

BITS_PER_WORD = 32
ALL_ALLOWED = -1  # an int32 word with every bit set


def bitmask_width(vocab_size: int) -> int:
    return -(-vocab_size // BITS_PER_WORD)


def allocate_token_bitmask(num_rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """(R, ceil(V / 32)) int32 on the host, every token allowed. Pinned for an asynchronous
    copy to a CUDA device; a fresh buffer each step (the caching host allocator does not
    hand it out again while a copy still reads it)."""
    bitmask = torch.empty(num_rows, bitmask_width(vocab_size), dtype=torch.int32,
                          pin_memory=pin_memory)
    bitmask.fill_(ALL_ALLOWED)
    return bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits (R, V) of disallowed tokens to -inf, in place. bitmask (R, ceil(V / 32))
    int32 on the logits' device. Ids past the mask's width (there are none when it was
    allocated for V) would stay allowed, so the widths are checked."""
    num_rows, vocab_size = logits.shape
    if bitmask.shape != (num_rows, bitmask_width(vocab_size)):
        raise ValueError(f"token bitmask of shape {tuple(bitmask.shape)} does not fit logits "
                         f"of shape {tuple(logits.shape)}")
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=logits.device)  # (32,)
    allowed = (bitmask.unsqueeze(-1) >> shifts) & 1  # (R, W, 32), bit t % 32 of word t // 32
    allowed = allowed.view(num_rows, -1)[:, :vocab_size].bool()  # (R, V)
    logits.masked_fill_(~allowed, float("-inf"))
