"""Adaptive k: how many tokens each request proposes this step, so speculation never costs
more than it saves.

Per request, the acceptance rate a (the chance the target accepts a proposed token given it
accepted the ones before) is tracked as decayed counts of the geometric trials verification
runs: a verify row that accepted m of k proposals counts m successes in m + [m < k] trials.
With k proposals a step emits on average

    E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)    tokens

and costs about 1 + f + (c + d) k plain steps (k > 0), where f is the fixed price of a
step with proposals (it runs synchronously, without overlap scheduling: ~14 % of a batch-1
Llama-3.1-8B step on an H200, BENCHMARKS.md; and it samples k + 1 rows), c = batch_size / ridge_tokens (the verify
tokens' share once decode leaves the weight-bound regime: at batch 1 a verify of 1 + 4
tokens reads the same weights as 1 token; at batch 256 the step is compute-bound and every
extra token costs its full share) and d is the proposer's own cost per token (a draft
model's step relative to the target's; 0 for n-gram lookup). k is the argmax of
E(k) / cost(k) over 0..max_k (k = 0 costs 1): low acceptance or a large batch gives k = 0, and speculation
stops for that request. A request at k = 0 is re-probed with k = 1 on one step in
`probe_interval` (the same step for all, so an overlapped engine drains once, not once per
request), so a request whose text turns repetitive gets speculation back.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pseudo-counts of the prior: a request starts as if 2 trials had accepted `prior` of them.
_PRIOR_TRIALS = 1.0
# Weight of the past per observation (~10 recent verify rows dominate).
_DECAY = 0.9


@dataclass
class _Acceptance:
    successes: float
    trials: float

    @property
    def rate(self) -> float:
        return self.successes / self.trials


def best_k(rate: float, max_k: int, cost_per_token: float, step_overhead: float = 0.0) -> int:
    """argmax over k in 0..max_k of E(k) / (1 + step_overhead + cost_per_token * k), k = 0
    costing 1; ties to the smaller k."""
    best, best_value = 0, 1.0
    expected, power = 1.0, 1.0
    for k in range(1, max_k + 1):
        power *= rate
        expected += power
        value = expected / (1.0 + step_overhead + cost_per_token * k)
        if value > best_value * (1 + 1e-9):
            best, best_value = k, value
    return best


class AdaptiveK:
    def __init__(
        self,
        max_k: int,
        *,
        enabled: bool = True,
        ridge_tokens: int = 256,
        proposer_cost: float = 0.0,
        prior: float = 0.7,
        step_overhead: float = 0.1,
        probe_interval: int = 64,
        disable_by_batch_size: int | None = None,
    ) -> None:
        self.max_k = max_k
        self.enabled = enabled
        self.ridge_tokens = ridge_tokens
        self.proposer_cost = proposer_cost
        self.prior = prior
        self.step_overhead = step_overhead
        self.probe_interval = probe_interval
        self.disable_by_batch_size = disable_by_batch_size
        self._acceptance: dict[str, _Acceptance] = {}
        self._num_steps = 0

    def next_step(self) -> None:
        self._num_steps += 1

    @property
    def probing(self) -> bool:
        return self._num_steps % self.probe_interval == 0

    def acceptance_rate(self, request_id: str) -> float:
        record = self._acceptance.get(request_id)
        return self.prior if record is None else record.rate

    def choose(self, request_id: str, batch_size: int) -> int:
        """k for this request this step (0: no proposals)."""
        if self.disable_by_batch_size is not None and batch_size >= self.disable_by_batch_size:
            return 0
        if not self.enabled:
            return self.max_k
        cost = self._cost(batch_size)
        rate = self.acceptance_rate(request_id)
        # E(k) <= 1 + k a <= 1 + f + c k when a <= f + c: then no k beats k = 0.
        k = best_k(rate, self.max_k, cost, self.step_overhead) if rate > cost + self.step_overhead else 0
        if k == 0 and self.probing:
            return 1
        return k

    def any_speculates(self, request_ids: list[str], batch_size: int) -> bool:
        """Whether choose() gives some request k > 0 (cheaply: a > cost decides it)."""
        if self.disable_by_batch_size is not None and batch_size >= self.disable_by_batch_size:
            return False
        if not self.enabled or self.probing:
            return bool(request_ids)
        threshold = self._cost(batch_size) + self.step_overhead
        acceptance = self._acceptance
        for request_id in request_ids:
            record = acceptance.get(request_id)
            rate = self.prior if record is None else record.rate
            # k > 0 needs E(k) > 1 + f + c k: a > f + c is necessary (E(k) <= 1 + k a); it is
            # also sufficient for some k when f is small, and choose() has the last word.
            if rate > threshold and best_k(rate, self.max_k, threshold - self.step_overhead,
                                           self.step_overhead):
                return True
        return False

    def _cost(self, batch_size: int) -> float:
        return batch_size / self.ridge_tokens + self.proposer_cost

    def observe(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        record = self._acceptance.get(request_id)
        if record is None:
            record = _Acceptance(self.prior * _PRIOR_TRIALS, _PRIOR_TRIALS)
            self._acceptance[request_id] = record
        trials = num_accepted + (1 if num_accepted < num_proposed else 0)
        record.successes = record.successes * _DECAY + num_accepted
        record.trials = record.trials * _DECAY + trials

    def drop(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
