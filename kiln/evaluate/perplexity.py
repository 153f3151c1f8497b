"""`kiln eval`: perplexity of an engine on held-out text and, against a second engine,
teacher-forced top-1 agreement, mean KL divergence and the perplexity delta.

The token stream is cut into consecutive windows of `window` tokens, each read from an
empty cache, and every position but the window's last predicts the next token.
`num_tokens` counts predicted tokens. The "prefill" path reads a window in one forward;
"decode" feeds a batch of windows one token a step through the decode kernels, as
generation does (forward.py), so a decode-only change (an FP8 cache's decode dots) shows.
With a comparison engine both models see the same windows by the same path; per predicted
position:

    top-1 agreement   argmax of the engine's logits == argmax of the other's
    KL                KL(P_other || P_engine) = Σ_v P_other(v) (log P_other(v) − log P_engine(v))
                      (the other engine is the reference: a quantised engine is compared
                      --compare against its full-precision build)
    perplexity        exp(mean negative log-likelihood of the actual next tokens)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kiln.errors import KilnError
from kiln.evaluate import EVAL_PATHS
from kiln.evaluate.forward import TeacherForcedModel


@dataclass
class _Totals:
    """Running sums of one engine over the predicted positions seen so far."""

    nll: float = 0.0
    tokens: int = 0
    agree: int = 0  # positions whose argmax equals the reference's
    kl: float = 0.0  # Σ KL(P_reference || P_engine)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclass(frozen=True)
class CompareResult:
    perplexity: float  # the other (reference) engine's
    ppl_delta_pct: float  # (engine − other) / other, in percent
    top1_agreement: float  # fraction of predicted positions, 0..1
    mean_kl: float  # nats per predicted position


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    num_tokens: int
    compare: CompareResult | None

    def to_json(self) -> dict:
        compare = None
        if self.compare is not None:
            c = self.compare
            compare = {"perplexity": c.perplexity, "ppl_delta_pct": c.ppl_delta_pct,
                       "top1_agreement": c.top1_agreement, "mean_kl": c.mean_kl}
        return {"perplexity": self.perplexity, "num_tokens": self.num_tokens, "compare": compare}


def kl_and_agreement(reference_log_probs: torch.Tensor, log_probs: torch.Tensor,
                     reference_probs: torch.Tensor | None = None) -> tuple[float, int]:
    """Σ KL(P_reference || P) over the positions, in nats, and how many positions' argmax
    agree; (P, V) log-probabilities each (`reference_probs`: their exp, when the caller has
    it for several engines)."""
    if reference_probs is None:
        reference_probs = reference_log_probs.exp()
    agree = int((log_probs.argmax(-1) == reference_log_probs.argmax(-1)).sum())
    # 0 · log 0 is 0: a token the reference rules out costs nothing.
    kl = torch.where(reference_probs > 0, reference_probs * (reference_log_probs - log_probs), 0.0)
    return float(kl.sum()), agree


def windows(token_ids: list[int], window: int, num_tokens: int) -> list[list[int]]:
    """Consecutive windows (each ≥ 2 tokens) predicting at most `num_tokens` tokens."""
    out, start, predicted = [], 0, 0
    while predicted < num_tokens and len(token_ids) - start >= 2:
        size = min(window, len(token_ids) - start, num_tokens - predicted + 1)
        if size < 2:
            break
        out.append(token_ids[start : start + size])
        predicted += size - 1
        start += size
    return out


@torch.no_grad()
def evaluate(
    model: TeacherForcedModel,
    token_ids: list[int],
    *,
    window: int,
    num_tokens: int,
    other: TeacherForcedModel | None = None,
    progress: bool = True,
    path: str = "prefill",
) -> EvalResult:
    """Perplexity of `model` on `token_ids` (and the comparison with `other`)."""
    if other is None:
        return evaluate_many(model, {}, token_ids, window=window, num_tokens=num_tokens,
                             progress=progress, path=path)["reference"]
    return evaluate_many(other, {"engine": model}, token_ids, window=window,
                         num_tokens=num_tokens, progress=progress, path=path)["engine"]


def _groups(chunks: list[list[int]], path: str, batch: int) -> list[list[list[int]]]:
    """The windows each model reads at once: one (prefill), or up to `batch` (decode; the
    windows are equal but the last, so each group is longest first)."""
    if path == "prefill":
        return [[chunk] for chunk in chunks]
    return [chunks[start : start + batch] for start in range(0, len(chunks), batch)]


def _predictions(model: TeacherForcedModel, group: list[list[int]], path: str) -> Iterator[torch.Tensor]:
    """A group's logits in pieces matching _targets: a window's positions (prefill), or one
    step's rows (decode)."""
    if path == "prefill":
        yield model.logits(group[0])[:-1]
    else:
        yield from model.decode_logits(group)


def _targets(group: list[list[int]], path: str) -> Iterator[list[int]]:
    if path == "prefill":
        yield group[0][1:]
        return
    for step in range(len(group[0]) - 1):
        yield [window[step + 1] for window in group if len(window) > step + 1]


@torch.no_grad()
def evaluate_many(
    reference: TeacherForcedModel,
    engines: dict[str, TeacherForcedModel],
    token_ids: list[int],
    *,
    window: int,
    num_tokens: int,
    progress: bool = True,
    path: str = "prefill",
) -> dict[str, EvalResult]:
    """Each engine compared with one reference on the same windows, the reference's
    forward run once per window (quality tables of several quantised builds). Returns
    EvalResults by name, and the reference's own under "reference"."""
    if path not in EVAL_PATHS:
        raise KilnError(f"path {path!r}: expected one of {', '.join(EVAL_PATHS)}")
    totals = {name: _Totals() for name in ("reference", *engines)}
    chunks = windows(token_ids, window, num_tokens)
    batch = min(model.max_windows for model in (reference, *engines.values()))
    bar = tqdm(total=sum(len(c) - 1 for c in chunks), desc="evaluating", unit="tok",
               disable=not progress)
    for group in _groups(chunks, path, batch):
        streams = [_predictions(model, group, path) for model in (reference, *engines.values())]
        # Every model's piece of the same positions together: (P, V) logits, P targets.
        for target_ids, reference_logits, *engine_logits in zip(_targets(group, path), *streams):
            targets = torch.tensor(target_ids, device=reference.device)  # (P,)
            reference_log_probs = torch.log_softmax(reference_logits, dim=-1)  # (P, V)
            reference_probs = reference_log_probs.exp()
            _accumulate(totals["reference"], reference_log_probs, targets)
            for name, logits in zip(engines, engine_logits):
                log_probs = torch.log_softmax(logits, dim=-1).to(reference.device)
                total = totals[name]
                _accumulate(total, log_probs, targets)
                kl, agree = kl_and_agreement(reference_log_probs, log_probs, reference_probs)
                total.kl += kl
                total.agree += agree
                del log_probs
            bar.update(len(targets))
    bar.close()
    base = totals["reference"]
    results = {"reference": EvalResult(base.perplexity, base.tokens, None)}
    for name in engines:
        total = totals[name]
        compare = None
        if total.tokens:
            compare = CompareResult(
                perplexity=base.perplexity,
                ppl_delta_pct=100.0 * (total.perplexity - base.perplexity) / base.perplexity,
                top1_agreement=total.agree / total.tokens,
                mean_kl=total.kl / total.tokens,
            )
        results[name] = EvalResult(total.perplexity, total.tokens, compare)
    return results


def _accumulate(total: _Totals, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
    total.nll += float(-log_probs.gather(1, targets[:, None]).sum())  # (T-1, V), (T-1,)
    total.tokens += len(targets)


def format_table(result: EvalResult, engine_name: str, other_name: str | None) -> str:
    """Side by side: the engine, the other engine, and the difference."""
    rows = [f"tokens evaluated  {result.num_tokens:,}"]
    if result.compare is None:
        rows.append(f"perplexity        {result.perplexity:.4f}   ({engine_name})")
        return "\n".join(rows)
    c = result.compare
    width = max(len(engine_name), len(other_name or ""), 10)
    rows += [
        f"{'':18}{engine_name:>{width}}  {other_name:>{width}}  {'delta':>10}",
        f"{'perplexity':18}{result.perplexity:>{width}.4f}  {c.perplexity:>{width}.4f}  "
        f"{c.ppl_delta_pct:>+9.3f}%",
        f"{'top-1 agreement':18}{100 * c.top1_agreement:>{width - 1}.3f}%",
        f"{'mean KL (nats)':18}{c.mean_kl:>{width}.5f}",
    ]
    return "\n".join(rows)
