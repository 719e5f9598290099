"""Planted outcomes for survival and regression tests and benchmarks: a follow-up time drawn
from an exponential (proportional-hazards) model whose log hazard rises with the slide's
lesion burden and with a clinical covariate, censored by an independent exponential
follow-up; the regression target is the burden itself. Every draw is seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Outcomes:
    time: npt.NDArray[np.float64]  # follow-up: the event or the censoring, whichever came first
    event: npt.NDArray[np.int64]  # 1: the event was seen, 0: censored
    log_hazard: npt.NDArray[np.float64]  # the truth the oracle knows


def plant_outcomes(burden: npt.ArrayLike, covariate: npt.ArrayLike | None = None, *, burden_effect: float = 1.0,
                   covariate_effect: float = 0.5, censoring: float = 0.4, base_rate: float = 0.1,
                   seed: int = 0) -> Outcomes:
    """Times with hazard ``base_rate * exp(burden_effect * z(burden) + covariate_effect * z(covariate))``
    (z: standardised over the cohort), about ``censoring`` of them censored."""
    rng = np.random.default_rng(seed)
    b = np.asarray(burden, dtype=float)

    def z(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        sd = v.std()
        return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)

    log_h = np.log(base_rate) + burden_effect * z(b)
    if covariate is not None:
        log_h = log_h + covariate_effect * z(np.asarray(covariate, dtype=float))
    t_event = rng.exponential(1.0 / np.exp(log_h))
    if censoring <= 0:
        return Outcomes(t_event, np.ones(len(b), np.int64), log_h)
    # an exponential follow-up whose scale gives about the asked censored share (found by bisection)
    lo, hi = 1e-3, 1e3
    u = rng.exponential(1.0, len(b))
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        share = float(np.mean(u * mid * np.median(t_event) < t_event))
        lo, hi = (mid, hi) if share > censoring else (lo, mid)
    t_censor = u * np.sqrt(lo * hi) * np.median(t_event)
    event = (t_event <= t_censor).astype(np.int64)
    return Outcomes(np.minimum(t_event, t_censor), event, log_h)
