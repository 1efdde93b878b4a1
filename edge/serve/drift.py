"""Are recent films still like the validation films? Two tests on a rolling window.

Export stores the validation split's scores (the model's output P(labels[1])) as 101 quantiles
in the manifest (`operating_point.validation_scores`). Over the last `window` films we compute:

- The population stability index (PSI) of the scores over the ten validation deciles:
  PSI = sum((a - e) * ln(a / e)), e = 0.1 per decile. Bound: the larger of 0.25, the usual
  "major shift" level of the PSI (0.1-0.25 is "moderate"), and the level chance alone reaches
  once in a thousand windows: without drift, PSI is about chi-square with 9 degrees of freedom
  times (1/n + 1/m) for a window of n films and m validation films (both are samples), whose
  99.9th percentile is 27.9 (1/n + 1/m): 0.17 for n = 200, m = 1000 (so 0.25 holds), but 0.72
  for a small validation split of 78 against a window of 78, where 0.25 would be crossed by
  chance (measured: two halves of the same shared set gave PSI 0.28).
- An exact two-sided binomial test of the share called positive against the validation share
  at the threshold in use (read off the quantiles): drift when p < 0.001 (a window of 200 films
  at a validation share of 0.5 flags below about 38% or above 62%).

Nothing is said before `min_films` films (too few for either test to mean anything).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


PSI_BOUND = 0.25
CHI2_9_999 = 27.877  # 99.9th percentile of chi-square with 9 degrees of freedom
P_BOUND = 1e-3
WINDOW = 200
MIN_FILMS = 50


def expected_positive_share(dist: dict, threshold: float) -> float:
    """Share of validation scores >= threshold, from the stored quantiles."""
    q = np.asarray(dist["quantiles"], dtype=np.float64)
    below = np.interp(threshold, q, np.linspace(0, 1, q.size), left=0.0, right=1.0)
    return float(1.0 - below)


def psi(scores, dist: dict) -> float:
    """PSI of `scores` over the validation deciles (half a film added to each bin: no log(0))."""
    q = np.asarray(dist["quantiles"], dtype=np.float64)
    inner = q[10:100:10]  # the nine inner decile edges
    counts = np.bincount(np.searchsorted(inner, np.asarray(scores), side="right"), minlength=10)
    a = (counts + 0.5) / (counts.sum() + 5.0)
    e = np.full(10, 0.1)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_bound(n: int, m: int | None) -> float:
    """The PSI above which a window of n films departs from m validation films (see the module doc)."""
    return max(PSI_BOUND, CHI2_9_999 * (1.0 / max(n, 1) + (1.0 / m if m else 0.0)))


def binomial_p(k: int, n: int, p0: float) -> float:
    """Exact two-sided binomial p-value (sum of outcomes no more likely than k)."""
    if n == 0:
        return 1.0
    p0 = min(max(p0, 1e-9), 1 - 1e-9)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p0) + (n - i) * math.log1p(-p0) for i in range(n + 1)]
    cut = logs[k] + 1e-7
    return float(min(1.0, sum(math.exp(v) for v in logs if v <= cut)))


@dataclass(frozen=True)
class DriftState:
    films: int
    psi: float | None
    positive_share: float | None
    expected_share: float | None
    p_value: float | None
    drifting: bool
    reason: str

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def assess(scores, positives, dist: dict, threshold: float | None, min_films: int = MIN_FILMS,
           called: str = "labels[1]") -> DriftState:
    """The drift state of one window of scores and calls of labels[1] (named `called`)."""
    n = len(scores)
    if not dist.get("quantiles"):
        return DriftState(n, None, None, None, None, False, "no validation scores in the manifest")
    if n < min_films:
        return DriftState(n, None, None, None, None, False, f"waiting for {min_films} films ({n} so far)")
    value = psi(scores, dist)
    bound = psi_bound(n, dist.get("n"))
    k = int(sum(positives))
    exp = expected_positive_share(dist, 0.5 if threshold is None else threshold)
    p = binomial_p(k, n, exp)
    why = []
    if value > bound:
        why.append(f"score PSI {value:.2f} > {bound:.2f}")
    if p < P_BOUND:
        why.append(f"share called {called} {k / n:.0%} vs {exp:.0%} at validation (binomial p={p:.1e} < {P_BOUND})")
    return DriftState(n, value, k / n, exp, p, bool(why), "; ".join(why) or "within bounds")


class DriftMonitor:
    """A rolling window; `add` returns a line to log when the state changes, else None."""

    def __init__(self, dist: dict, threshold: float | None, window: int = WINDOW, min_films: int = MIN_FILMS,
                 called: str = "labels[1]"):
        self.dist, self.threshold, self.min_films, self.called = dist, threshold, min_films, called
        self.scores: deque[float] = deque(maxlen=window)
        self.positives: deque[bool] = deque(maxlen=window)
        self.drifting = False

    def add(self, score: float, positive: bool) -> str | None:
        self.scores.append(score)
        self.positives.append(positive)
        state = self.state()
        if state.drifting == self.drifting:
            return None
        self.drifting = state.drifting
        if state.drifting:
            return (f"warning: drift over the last {state.films} films: {state.reason}; "
                    "the films no longer look like the validation films, check the model's fit for this site")
        return f"drift cleared over the last {state.films} films ({state.reason})"

    def state(self) -> DriftState:
        return assess(list(self.scores), list(self.positives), self.dist, self.threshold, self.min_films, self.called)
