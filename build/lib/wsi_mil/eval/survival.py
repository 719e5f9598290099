"""Survival figures from scikit-survival: Harrell's and Uno's concordance, time-dependent
AUC, the integrated Brier score (beside the Kaplan-Meier curve's), Kaplan-Meier curves of
risk groups and the log-rank test between them. Nothing here is written by hand but the
bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def _surv(time: npt.NDArray[Any], event: npt.NDArray[Any]) -> Any:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, float))


def harrell_c(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any]) -> float | None:
    """Harrell's concordance index (None: no comparable pair)."""
    from sksurv.metrics import concordance_index_censored

    try:
        return float(concordance_index_censored(np.asarray(event, bool), np.asarray(time, float),
                                                np.asarray(risk, float))[0])
    except (ValueError, ZeroDivisionError):
        return None


def _boot_ci(n: int, stat: Any, n_boot: int, seed: int) -> tuple[float, float] | None:
    """A percentile bootstrap interval of ``stat(indices)`` over ``n`` samples (a resample where the figure is
    undefined, ``stat`` gives None, is left out; None when half of them are)."""
    if n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    stats = [v for v in (stat(rng.integers(0, n, n)) for _ in range(n_boot)) if v is not None]
    if len(stats) < n_boot // 2:
        return None
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def _harrell_ci(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any], n_boot: int,
                seed: int) -> tuple[float, float] | None:
    if event.sum() < 2:
        return None
    return _boot_ci(len(time), lambda i: harrell_c(time[i], event[i], risk[i]) if event[i].any() else None,
                    n_boot, seed)


def uno_c(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any]) -> float | None:
    """Uno's concordance (censoring weights from this set; None where they cannot be estimated)."""
    from sksurv.metrics import concordance_index_ipcw

    if not event.any():
        return None
    y = _surv(time, event)
    try:
        return float(concordance_index_ipcw(y, y, risk)[0])
    except (ValueError, ZeroDivisionError):
        return None


def td_auc(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any],
           times: list[float]) -> tuple[dict[str, float], float] | None:
    """The cumulative / dynamic AUC at ``times`` and its mean (None where it cannot be estimated)."""
    from sksurv.metrics import cumulative_dynamic_auc

    ok = [t for t in times if time.min() <= t < time.max()]
    if not ok or not event.any():
        return None
    y = _surv(time, event)
    try:
        aucs, mean_auc = cumulative_dynamic_auc(y, y, risk, ok)
    except (ValueError, ZeroDivisionError):
        return None
    if not np.isfinite(mean_auc):
        return None
    return {f"{t:.4g}": float(a) for t, a in zip(ok, aucs, strict=True)}, float(mean_auc)


def eval_times(time: npt.NDArray[Any], event: npt.NDArray[Any]) -> list[float]:
    """The times the time-dependent AUC is read at: the quartiles of the event times, inside the follow-up."""
    t_event = time[event.astype(bool)]
    if len(t_event) < 2:
        return []
    qs = np.unique(np.quantile(t_event, [0.25, 0.5, 0.75]))
    return [float(t) for t in qs if time.min() <= t < time.max()]


def brier_times(time: npt.NDArray[Any], event: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """The grid the integrated Brier score runs over: deciles 1 to 9 of the event times, inside the follow-up."""
    t_event = time[event.astype(bool)]
    if len(t_event) < 5:
        return np.zeros(0)
    grid = np.unique(np.quantile(t_event, np.linspace(0.1, 0.9, 17)))
    return grid[(grid >= time.min()) & (grid < time.max())]


def integrated_brier(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any],
                     grid: npt.NDArray[Any]) -> tuple[float | None, float | None]:
    """(the model's integrated Brier score, the Kaplan-Meier curve's: everyone given the set's own curve).
    The model's survival curves come from its risk through a Breslow baseline hazard estimated on this
    set (a Cox model's risk is relative: the baseline is the set's); the censoring weights (IPCW) too."""
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.metrics import integrated_brier_score
    from sksurv.nonparametric import kaplan_meier_estimator

    if len(grid) < 2:
        return None, None
    y = _surv(time, event)
    try:
        fns = BreslowEstimator().fit(risk, event.astype(bool), time).get_survival_function(risk)
        est = np.stack([f(grid) for f in fns])
        t_km, s_km = kaplan_meier_estimator(event.astype(bool), time)
        km = s_km[np.clip(np.searchsorted(t_km, grid, side="right") - 1, 0, None)]
        return (float(integrated_brier_score(y, y, est, grid)),
                float(integrated_brier_score(y, y, np.tile(km, (len(time), 1)), grid)))
    except ValueError:  # (censoring weights that cannot be estimated at these times)
        return None, None


def _ibs_ci(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any], grid: npt.NDArray[Any],
            n_boot: int, seed: int) -> tuple[float, float] | None:
    """A percentile bootstrap interval of the model's integrated Brier score (at most 200 resamples: each
    refits the baseline and the censoring weights)."""
    def stat(i: npt.NDArray[Any]) -> float | None:
        ok = (grid >= time[i].min()) & (grid < time[i].max())
        if event[i].sum() < 2 or ok.sum() < 2:
            return None
        return integrated_brier(time[i], event[i], risk[i], grid[ok])[0]

    return _boot_ci(len(time), stat, min(n_boot, 200), seed)


def survival_metrics(time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any], threshold: Any,
                     *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Figures of a risk score (higher: earlier event) against follow-up ``time`` and ``event``
    (1: event seen, 0: censored). Uno's concordance and the time-dependent AUC weigh by the
    censoring distribution estimated on this same set (scikit-survival's IPCW)."""
    from sksurv.compare import compare_survival

    time, event, risk = np.asarray(time, float), np.asarray(event, float), np.asarray(risk, float)
    out: dict[str, Any] = {"n": len(time), "n_events": int(event.sum())}
    if len(time) < 2 or event.sum() == 0:
        return out
    out["c_index"] = harrell_c(time, event, risk)
    out["c_index_ci"] = _harrell_ci(time, event, risk, n_boot, seed)
    if event.sum() < 5:  # (a concordance of one or two events is 0 or 1 by chance)
        out["c_index_ci_note"] = f"not informative: {int(event.sum())} event(s)"
    y = _surv(time, event)
    # (Uno's C and the time-dependent AUC refit the censoring weights on each resample: at most 200)
    out["c_index_uno"] = uno_c(time, event, risk)
    if out["c_index_uno"] is not None and event.sum() >= 2:
        out["c_index_uno_ci"] = _boot_ci(len(time), lambda i: uno_c(time[i], event[i], risk[i]),
                                         min(n_boot, 200), seed)
    times = eval_times(time, event)
    found = td_auc(time, event, risk, times) if times else None
    if found is not None:
        out["td_auc"], out["td_auc_mean"] = found
        out["td_auc_mean_ci"] = _boot_ci(len(time), lambda i: (lambda r: r[1] if r else None)(
            td_auc(time[i], event[i], risk[i], times)), min(n_boot, 200), seed)
    grid = brier_times(time, event)
    out["ibs"], out["ibs_kaplan_meier"] = integrated_brier(time, event, risk, grid)
    if out["ibs"] is not None:
        out["ibs_ci"] = _ibs_ci(time, event, risk, grid, n_boot, seed)
        out["ibs_times"] = [float(f"{grid[0]:.4g}"), float(f"{grid[-1]:.4g}")]
    if threshold is not None:
        high = risk >= threshold  # (one threshold, or each sample's fold's own)
        if np.ndim(threshold) == 0:
            out["threshold"] = float(threshold)
        out["n_high_risk"] = int(high.sum())
        if 0 < high.sum() < len(high):
            chisq, p = compare_survival(y, high.astype(int))[:2]
            out["logrank_chi2"], out["logrank_p"] = float(chisq), float(p)
    return out


def _logrank_p(time: npt.NDArray[Any], event: npt.NDArray[Any], high: npt.NDArray[np.bool_]) -> float | None:
    """The log-rank p of two groups (None: one group is empty)."""
    from sksurv.compare import compare_survival

    if not 0 < high.sum() < len(high):
        return None
    return float(compare_survival(_surv(time, event), high.astype(int))[1])


def km_plot(path: Path, time: npt.NDArray[Any], event: npt.NDArray[Any], risk: npt.NDArray[Any], threshold: Any,
            where: str) -> None:
    """Kaplan-Meier curves (with 95% log-log bands) of the patients above and below the risk threshold."""
    from sksurv.nonparametric import kaplan_meier_estimator

    from wsi_mil.eval.plots import _plt, _save

    fig, ax = _plt().subplots(figsize=(5.2, 4.2))
    high = risk >= threshold
    for group, name, colour in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
        if group.sum() == 0:
            continue
        t, s, band = kaplan_meier_estimator(event[group].astype(bool), time[group], conf_type="log-log")
        ax.step(t, s, where="post", color=colour, label=f"{name} (n = {int(group.sum())}, events {int(event[group].sum())})")
        ax.fill_between(t, band[0], band[1], step="post", color=colour, alpha=0.15)
    p = _logrank_p(time, event, high)
    ax.set_title(f"Kaplan-Meier by predicted risk ({where})" + (f"\nlog-rank p = {p:.3g}" if p is not None else ""))
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    _save(fig, path)
