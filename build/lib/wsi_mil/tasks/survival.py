"""Survival: follow-up time and event (1: the event was seen, 0: censored) in the manifest's
``label_time`` and ``label_event`` columns; one output, the log relative risk, trained with the
Cox partial likelihood over each batch of bags (Breslow's handling of tied times). Splits are
stratified on the event; the validation median of the risk splits patients into a high- and
a low-risk group (Kaplan-Meier curves and a log-rank test in the report)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from wsi_mil.tasks.base import NoClassKind, Question, finite_number, fmt, report_sets

if TYPE_CHECKING:
    from wsi_mil.data.bags import Task

TIME, EVENT = "label_time", "label_event"
EVENT_VALUES = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0}


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """The negative Cox log partial likelihood per event (Breslow ties): for each event, its
    risk against the log-sum-exp of the risks of everyone still at risk at its time. Zero
    (with a gradient path) for a batch without an event."""
    at_risk = time[None, :] >= time[:, None]  # row i: who is at risk at time_i
    masked = risk[None, :].expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    terms = (risk - torch.logsumexp(masked, dim=1)) * event
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -terms.sum() / n_events


def interval_of(time: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The time interval each time falls in (0 .. len(edges)), intervals closed on the right of their edge."""
    return torch.bucketize(time, edges, right=True)


def discrete_nll(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The mean negative log-likelihood of a discrete-time hazard model (logistic hazard per interval, as in
    Zadeh & Schmid 2020 and PORPOISE): an event in interval j contributes log S(j - 1) + log h(j), a slide censored
    in interval j log S(j) (it counts as having survived its interval), with h = sigmoid(logit) and S the
    product of (1 - h) over the intervals so far; in log space throughout."""
    j = interval_of(time, edges)[:, None]
    log_h = F.logsigmoid(logits)
    log_surv = torch.cumsum(F.logsigmoid(-logits), dim=1)  # log S(k): survived intervals 0..k
    log_surv_before = torch.cat([torch.zeros_like(log_surv[:, :1]), log_surv[:, :-1]], dim=1)
    seen = log_surv_before.gather(1, j)[:, 0] + log_h.gather(1, j)[:, 0]
    censored = log_surv.gather(1, j)[:, 0]
    ll = torch.where(event > 0.5, seen, censored)
    return -ll.mean() if len(ll) else logits.sum() * 0.0


def discrete_risk(logits: torch.Tensor) -> torch.Tensor:
    """A discrete-time model's risk: minus its expected number of intervals survived, -sum_k S(k) (higher:
    earlier event), one column."""
    return -torch.exp(torch.cumsum(F.logsigmoid(-logits.float()), dim=1)).sum(dim=1, keepdim=True)


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}"


def _ibs_text(m: dict[str, Any]) -> str:
    v, ci = m.get("ibs"), m.get("ibs_ci")
    if v is None:
        return "–"
    return f"{v:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "") + f" vs {fmt(m.get('ibs_kaplan_meier'))}"


def _ci_text(m: dict[str, Any]) -> str:
    c, ci = m.get("c_index"), m.get("c_index_ci")
    note = f" ({m['c_index_ci_note']})" if m.get("c_index_ci_note") else ""
    return "–" if c is None else f"{c:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "") + note


def _with(m: dict[str, Any], key: str) -> str:
    """A figure with its bootstrap interval (``key``_ci), or –."""
    v, ci = m.get(key), m.get(f"{key}_ci")
    return "–" if v is None else f"{v:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


class Survival(NoClassKind):
    name = "survival"
    bags_per_batch = 16
    loss_over_set = True
    min_bags_per_batch = 4
    why_batches = "the Cox partial likelihood ranks the bags of one batch against each other (one bag alone has no loss)"

    column_prefix = "log_"
    contribution_unit = "log relative risk"
    loss_choice = True
    own_settings = (("survival_loss", "cox"),)
    score_name = "Harrell's C"
    score_key = "c_index"

    def value_text(self, probability: dict[str, float], digits: int = 2) -> str:
        return ", ".join(f"log relative {k} = {v:.{digits}f}" for k, v in probability.items())

    def output_columns(self, task: Task) -> list[str]:
        return ["risk"] if task.time_bins else super().output_columns(task)  # (not a log: minus intervals survived)

    def threshold_count(self, task: Task) -> int:
        return 1

    def threshold_rule(self, rule: str, task: Task | None = None) -> str:
        return ("each fold's median validation risk splits its slides into a high- and a low-risk group; the fold "
                "ensemble, whose risk is the mean of the folds' log risks, at the mean of the folds' medians")

    def ensemble_threshold(self, thresholds: list[float]) -> float:
        return float(np.mean(thresholds))  # (log risks average as they are)

    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        from wsi_mil.errors import ManifestError

        t_raw, e_raw = labels.get(TIME, "").strip(), labels.get(EVENT, "").strip()
        if not t_raw and not e_raw:
            return np.full(2, np.nan, np.float32)
        t = finite_number(t_raw)
        if t is None or t < 0:
            raise ManifestError(f"{where}: {TIME} {t_raw!r} is not a follow-up time (a finite number >= 0)")
        if e_raw not in EVENT_VALUES:
            raise ManifestError(f"{where}: {EVENT} {e_raw!r} is not 1 (event) or 0 (censored)")
        return np.asarray([t, EVENT_VALUES[e_raw]], np.float32)

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        text = f"survival task on columns {TIME!r} (follow-up) and {EVENT!r} (1: event, 0: censored)"
        if task.time_bins:
            text += (f", discrete time: {task.time_bins} intervals" + (f" (edges {', '.join(f'{b:.4g}' for b in task.bins)})"
                                                                       if task.bins else ""))
        if entries is not None:
            ev = [e.labels.get(EVENT, "").strip() for e in entries]
            n = sum(bool(v) for v in ev)
            text += f" ({n} slide(s), {sum(EVENT_VALUES.get(v, 0.0) for v in ev):.0f} events)"
        return text

    # ---- training
    def activation(self, logits: torch.Tensor, task: Task | None = None) -> torch.Tensor:
        if task is not None and task.time_bins:
            return discrete_risk(logits)
        return logits.float()  # the log relative risk

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, mode: str,
             gamma: float, task: Task | None = None) -> torch.Tensor:
        known = ~torch.isnan(y).any(dim=1)
        if task is not None and task.time_bins:
            edges = torch.tensor(task.bins, dtype=torch.float32, device=logits.device)
            return discrete_nll(logits.float()[known], y[known, 0], y[known, 1], edges)
        return cox_loss(logits.float()[known, 0], y[known, 0], y[known, 1])

    def fitted(self, task: Task, targets: npt.NDArray[Any]) -> Task:
        """A discrete-time model's interval edges: quantiles of the development slides' event times."""
        if not task.time_bins:
            return task
        import dataclasses

        t = targets[(~np.isnan(targets).any(axis=1)) & (targets[:, 1] > 0.5), 0]
        edges = np.unique(np.quantile(t, np.arange(1, task.time_bins) / task.time_bins)) if len(t) else np.zeros(0)
        return dataclasses.replace(task, bins=tuple(float(e) for e in edges), time_bins=len(edges) + 1)

    def contribution_units(self, task: Task, shares: torch.Tensor) -> torch.Tensor | None:
        return None if task.time_bins else shares  # (a discrete model's risk is not a sum of the patches' shares)

    def score(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float | None:
        """Harrell's concordance index."""
        from wsi_mil.eval.survival import harrell_c

        k = ~np.isnan(targets).any(axis=1)
        if k.sum() < 2 or targets[k, 1].sum() == 0:
            return None
        return harrell_c(targets[k, 0], targets[k, 1], probs[k, 0])

    def covariate_model(self, task: Task, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Any:
        """A Cox model of the covariates alone (scikit-survival, Breslow ties, ridge penalty 0.1): its log risk."""
        from sksurv.linear_model import CoxPHSurvivalAnalysis
        from sksurv.util import Surv

        k = ~np.isnan(y).any(axis=1)
        fit = CoxPHSurvivalAnalysis(alpha=0.1).fit(x[k], Surv.from_arrays(y[k, 1].astype(bool), y[k, 0]))
        return lambda z: fit.predict(z)[:, None]

    # ---- evaluation
    def thresholds(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], rule: str,
                   target_sensitivity: float) -> list[float]:
        """The median validation risk: the split into a high- and a low-risk group."""
        return [float(np.median(p[:, 0]))] if len(p) else [0.0]

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        from wsi_mil.eval.survival import survival_metrics

        k = ~np.isnan(y).any(axis=1)
        thr = None if not len(thresholds) else (thresholds[0] if np.ndim(thresholds[0]) == 0 else np.asarray(thresholds[0])[k])
        return survival_metrics(y[k, 0], y[k, 1], p[k, 0], thr, n_boot=config.bootstrap if ci else 0, seed=config.seed)

    def truth_columns(self, task: Task, target: npt.NDArray[Any]) -> dict[str, Any] | None:
        blank = bool(np.isnan(target).any())
        return {TIME: "" if blank else float(f"{float(target[0]):.6g}"), EVENT: "" if blank else int(target[1])}

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        if np.isnan(probs[0]):
            return ""
        return "high risk" if probs[0] >= thresholds[0] else "low risk"

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        ok = ~np.isnan(t).any(axis=1)  # (the event against the nuisances: a site with every death is a shortcut)
        return [("event", [i for i, k in zip(ids, ok, strict=True) if k], t[ok, 1].astype(int).tolist(),
                 ["censored", "event"])]

    def strata(self, task: Task, targets: npt.NDArray[Any]) -> list[str] | None:
        return ["blank" if np.isnan(t[1]) else ("event" if t[1] > 0.5 else "censored") for t in targets]

    def plots(self, task: Task, out: Any, y: npt.NDArray[Any], p: npt.NDArray[Any], where: str,
              thresholds: Sequence[Any] = ()) -> list[str]:
        from wsi_mil.eval.survival import km_plot

        k = ~np.isnan(y).any(axis=1)
        if k.sum() < 4 or not len(thresholds):
            return []
        thr = thresholds[0] if np.ndim(thresholds[0]) == 0 else np.asarray(thresholds[0])[k]
        km_plot(out / "kaplan_meier.png", y[k, 0], y[k, 1], p[k, 0], thr, where)
        return ["kaplan_meier.png"]

    # ---- report
    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        risk = ("minus the number of time intervals the model expects the slide to survive (discrete-time hazards, "
                f"{task.time_bins} intervals, edges at {', '.join(f'{b:.4g}' for b in task.bins)}: quantiles of the "
                "development slides' event times)" if task.time_bins else "the model's log relative risk")
        lines = [f"Risk: {risk} (higher: earlier event). Uno's C and the time-dependent AUC "
                 "weigh by the censoring distribution of the set itself (scikit-survival, IPCW; – where that "
                 "distribution cannot be estimated, e.g. no censored slide or times that do not differ); risk groups "
                 "split at the median validation risk; a concordance from fewer than 5 events is marked not "
                 "informative. Integrated Brier score (lower is better) over deciles 1-9 of the set's event times: "
                 "the model's survival curves from its risk through a Breslow baseline hazard estimated on the set "
                 f"itself ({'the risk used as a Cox model would use it' if task.time_bins else 'a Cox risk is relative'}), beside the score of the set's Kaplan-Meier curve given to every "
                 "slide (no model); a model no better than that curve has learnt nothing about time. Intervals: "
                 "percentile bootstrap of the set's slides (Uno's C, the time-dependent AUC and the Brier score "
                 "refit the censoring weights on each resample: at most 200 resamples).", "",
                 "| set | n | events | Harrell's C (95% CI) | Uno's C (95% CI) | time-dependent AUC (mean, 95% CI; "
                 "at t) | "
                 "integrated Brier (95% CI) vs Kaplan-Meier | log-rank p (high vs low risk) |",
                 "|---|---|---|---|---|---|---|---|"]
        for name, mm in report_sets(m):
            td = mm.get("td_auc") or {}
            at = "; ".join(f"{t}: {a:.3f}" for t, a in td.items())
            lines.append(f"| {name} | {mm.get('n')} | {mm.get('n_events')} | {_ci_text(mm)} | "
                         f"{_with(mm, 'c_index_uno')} | {_with(mm, 'td_auc_mean')}{f'; {at}' if at else ''} | "
                         f"{_ibs_text(mm)} | {_p(mm.get('logrank_p'))} |")
        return lines

    def summary_line(self, head: dict[str, Any]) -> str:
        return (f"  Harrell's C {_ci_text(head)}, Uno's C {_with(head, 'c_index_uno')}, time-dependent AUC "
                f"{_with(head, 'td_auc_mean')}, integrated Brier {_ibs_text(head)}, log-rank p {_p(head.get('logrank_p'))}, n = {head.get('n')} "
                f"({head.get('n_events')} events)")

    def what(self, task: Task) -> str:
        return ("risk of the event (discrete-time hazards: minus the expected intervals survived)" if task.time_bins
                else "risk of the event (Cox)")
