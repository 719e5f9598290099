"""Regression: one numeric label column (a biomarker level, a score, a lesion fraction), one
output. The model predicts the target standardised by the mean and standard deviation of the
development (non-test) slides' targets, which the task records (``Task.scale``) so that every
prediction is given, and every figure computed, in the target's own units."""

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


def _scale(task: Task) -> tuple[float, float]:
    return task.scale if task.scale is not None else (0.0, 1.0)


def _with_ci(v: float | None, ci: tuple[float, float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


class Regression(NoClassKind):
    name = "regression"
    column_prefix = "predicted_"
    score_name = "R²"
    score_key = "r2"
    chance = 0.0
    own_settings = (("regression_loss", "huber"), ("standardise_target", True))

    def value_text(self, probability: dict[str, float], digits: int = 2) -> str:
        return ", ".join(f"predicted {k} = {v:.4g}" for k, v in probability.items())

    def threshold_rule(self, rule: str, task: Task | None = None) -> str:
        return "none (a continuous prediction; the fold ensemble predicts the mean of the folds' predictions)"

    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        from wsi_mil.errors import ManifestError

        raw = labels.get(task.label_columns[0], "").strip()
        if not raw:
            return np.full(1, np.nan, np.float32)
        value = finite_number(raw)
        if value is None:
            raise ManifestError(f"{where}: label {raw!r} of column {task.label_columns[0]!r} is not a finite number")
        return np.asarray([value], np.float32)

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        col = task.label_columns[0]
        text = f"regression task on column {col!r}"
        if entries is not None:
            v = np.asarray([finite_number(e.labels.get(col, "")) for e in entries if e.labels.get(col, "").strip()], float)
            if len(v):
                text += (f" ({len(v)} slide(s); mean {v.mean():.4g}, sd {v.std(ddof=1) if len(v) > 1 else 0.0:.4g}, "
                         f"range {v.min():.4g} to {v.max():.4g})")
        return text

    # ---- training
    def activation(self, logits: torch.Tensor, task: Task | None = None) -> torch.Tensor:
        mean, sd = _scale(task) if task is not None else (0.0, 1.0)
        return logits.float() * sd + mean

    contribution_unit = "the target's units (the development mean is not a patch's)"

    def contribution_units(self, task: Task, shares: torch.Tensor) -> torch.Tensor:
        """Shares of the standardised prediction times the target's sd: they sum to the prediction minus the mean."""
        return shares * _scale(task)[1]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, mode: str,
             gamma: float, task: Task | None = None) -> torch.Tensor:
        """Huber loss (delta 1) or the squared error (``task.loss``) between the output and the target as the
        model predicts it (standardised, or raw with ``task.standardise`` off), over the labelled bags."""
        mean, sd = _scale(task) if task is not None else (0.0, 1.0)
        known = ~torch.isnan(y)
        z = (torch.nan_to_num(y, nan=mean) - mean) / sd
        if task is not None and task.loss == "mse":
            per = (logits.float() - z) ** 2
        else:
            per = F.smooth_l1_loss(logits.float(), z, reduction="none", beta=1.0)
        return (per * known).sum() / known.sum().clamp(min=1)

    def score(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float | None:
        """The coefficient of determination R² on the labelled samples (None: fewer than 3, or a constant target)."""
        k = ~np.isnan(targets[:, 0])
        y, p = targets[k, 0], probs[k, 0]
        if len(y) < 3 or np.var(y) == 0:
            return None
        return float(1.0 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))

    def covariate_model(self, task: Task, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Any:
        """A ridge regression (scikit-learn, alpha 1) on the labelled samples, in the target's units."""
        from sklearn.linear_model import Ridge

        k = ~np.isnan(y[:, 0])
        fit = Ridge(alpha=1.0).fit(x[k], y[k, 0])
        return lambda z: fit.predict(z)[:, None]

    def configured(self, task: Task, config: Any) -> Task:
        import dataclasses

        return dataclasses.replace(task, loss=config.regression_loss, standardise=config.standardise_target)

    def fitted(self, task: Task, targets: npt.NDArray[Any]) -> Task:
        """The task with the development samples' mean and sd (the model's standardisation; 0 and 1 with
        ``task.standardise`` off: the model predicts the raw target)."""
        import dataclasses

        if not task.standardise:
            return dataclasses.replace(task, scale=(0.0, 1.0))
        v = targets[:, 0][~np.isnan(targets[:, 0])]
        sd = float(v.std(ddof=1)) if len(v) > 1 else 1.0
        return dataclasses.replace(task, scale=(float(v.mean()), sd if sd > 0 else 1.0))

    # ---- evaluation
    def thresholds(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], rule: str,
                   target_sensitivity: float) -> list[float]:
        return []  # (a continuous prediction: nothing to threshold)

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        from wsi_mil.eval.regression import regression_metrics

        k = ~np.isnan(y[:, 0])
        return regression_metrics(y[k, 0], p[k, 0], n_boot=config.bootstrap if ci else 0, seed=config.seed)

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        return "" if np.isnan(probs[0]) else float(f"{float(probs[0]):.6g}")  # (a float32 label: 49.65, not 49.650002)

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        return []

    def strata(self, task: Task, targets: npt.NDArray[Any]) -> list[str] | None:
        """Quartiles of the target, so that each split spans its range."""
        v = targets[:, 0]
        known = ~np.isnan(v)
        if known.sum() < 8:
            return None
        edges = np.quantile(v[known], [0.25, 0.5, 0.75])
        return ["blank" if not k else f"q{int(np.searchsorted(edges, x, side='right'))}" for x, k in zip(v, known, strict=True)]

    def plots(self, task: Task, out: Any, y: npt.NDArray[Any], p: npt.NDArray[Any], where: str,
              thresholds: Sequence[Any] = ()) -> list[str]:
        from wsi_mil.eval.regression import calibration_plot

        k = ~np.isnan(y[:, 0])
        if k.sum() < 2:
            return []
        calibration_plot(out / "calibration.png", y[k, 0], p[k, 0], task.label_columns[0], where)
        return ["calibration.png"]

    # ---- report
    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        how = (f"standardised for training by the development slides' mean {_scale(task)[0]:.4g} and sd "
               f"{_scale(task)[1]:.4g} (recorded with the models)" if task.standardise else
               "trained on its raw values (--no-standardise-target)")
        loss = "the squared error" if task.loss == "mse" else "the Huber loss (delta 1)"
        lines = [f"Target `{task.label_columns[0]}`, {how}, with {loss}; figures in its units.", "",
                 "| set | n | MAE | RMSE | R² (95% CI) | Pearson r (95% CI) | Spearman ρ (95% CI) |",
                 "|---|---|---|---|---|---|---|"]
        for name, mm in report_sets(m):
            lines.append(f"| {name} | {mm.get('n')} | {fmt(mm.get('mae'))} | {fmt(mm.get('rmse'))} | "
                         f"{_with_ci(mm.get('r2'), mm.get('r2_ci'))} | {_with_ci(mm.get('pearson'), mm.get('pearson_ci'))} | "
                         f"{_with_ci(mm.get('spearman'), mm.get('spearman_ci'))} |")
        return lines

    def summary_line(self, head: dict[str, Any]) -> str:
        return (f"  R² {_with_ci(head.get('r2'), head.get('r2_ci'))}, MAE {fmt(head.get('mae'))}, "
                f"RMSE {fmt(head.get('rmse'))}, Spearman {fmt(head.get('spearman'))}, n = {head.get('n')}")

    def what(self, task: Task) -> str:
        return f"{task.label_columns[0]} (continuous)"
