"""Multi-class: one label column with three or more classes, one softmax output per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from wsi_mil.tasks.base import Question, TaskKind, fmt, single_column_describe, single_column_target

if TYPE_CHECKING:
    from wsi_mil.data.bags import Task


class Multiclass(TaskKind):
    name = "multiclass"
    calibrated_per_output = False
    argmax_call = True

    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        found = single_column_target(task, labels, where)
        if found is None:
            return np.full(task.n_outputs, np.nan, np.float32)
        value, values = found
        onehot = np.zeros(len(values), np.float32)
        onehot[values.index(value)] = 1.0
        return onehot

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        return single_column_describe(task, entries, "")

    def activation(self, logits: torch.Tensor, task: Task | None = None) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def weight_shape(self, task: Task) -> tuple[int, ...]:
        return (task.n_outputs,)

    def threshold_count(self, task: Task) -> int:
        return 0

    def loss_weights(self, targets: npt.NDArray[np.float32], task: Task | None = None) -> torch.Tensor:
        """(C,) class weights, inverse to each class's frequency among the labelled targets."""
        t = np.asarray(targets, dtype=np.float64)
        t = t[~np.isnan(t).any(axis=1)]
        freq = t.mean(axis=0).clip(min=1e-6)
        w = 1.0 / freq
        return torch.tensor(w / w.mean(), dtype=torch.float32)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, mode: str,
             gamma: float, task: Task | None = None) -> torch.Tensor:
        logits = logits.float()
        rows = (~torch.isnan(y)).all(dim=1)
        target = torch.nan_to_num(y, nan=0.0).argmax(dim=1)
        ce = F.cross_entropy(logits, target, weight=weights, reduction="none")
        if mode == "focal":
            pt = torch.softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
            ce = ce * (1 - pt) ** gamma
        return (ce * rows).sum() / rows.sum().clamp(min=1)

    def covariate_model(self, task: Task, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Any:
        """A multinomial logistic regression (scikit-learn) on the labelled samples."""
        from sklearn.linear_model import LogisticRegression

        k = ~np.isnan(y).any(axis=1)
        fit = LogisticRegression(max_iter=2000).fit(x[k], y[k].argmax(axis=1))

        def predict(z: npt.NDArray[Any]) -> npt.NDArray[Any]:
            out = np.zeros((len(z), task.n_outputs))
            out[:, fit.classes_] = fit.predict_proba(z)
            return out
        return predict

    def score(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float | None:
        """The macro one-vs-rest AUC (None unless every class is among the targets)."""
        rows = ~np.isnan(targets).any(axis=1)
        y = targets[rows].argmax(axis=1)
        if len(np.unique(y)) < task.n_outputs:
            return None
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, probs[rows], multi_class="ovr", labels=list(range(task.n_outputs))))

    def thresholds(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], rule: str,
                   target_sensitivity: float) -> list[float]:
        return []  # the most probable class is the call

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        from wsi_mil.eval.metrics import multiclass_metrics

        rows = (~np.isnan(y)).all(axis=1)
        return multiclass_metrics(y[rows].argmax(axis=1), p[rows], list(task.outputs))

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        if np.isnan(probs).any():
            return ""
        return task.outputs[int(np.argmax(probs))]

    def output_names(self, task: Task) -> list[str]:
        return list(task.classes or task.outputs)

    def one_vs_rest(self, y: npt.NDArray[Any], c: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int_]]:
        ok = ~np.isnan(y).any(axis=1)
        return ok, (y[ok].argmax(axis=1) == c).astype(int)

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        ok = ~np.isnan(t).any(axis=1) & (t.sum(axis=1) > 0)
        names = list(task.classes or task.outputs) if task is not None else None
        return [(None, [i for i, k in zip(ids, ok, strict=True) if k], t[ok].argmax(axis=1).tolist(), names)]

    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        lines = ["| set | n | AUC | accuracy | balanced acc. |", "|---|---|---|---|---|"]
        for name, key in (("ensemble of folds, test", "ensemble_test"), ("pooled out-of-fold validation", "pooled_validation")):
            if m.get(key):
                mm = m[key]
                lines.append(f"| {name} | {mm.get('n')} | {fmt(mm.get('auc'))} | {fmt(mm.get('accuracy'))} | "
                             f"{fmt(mm.get('balanced_accuracy'))} |")
        return lines

    def summary_line(self, head: dict[str, Any]) -> str:
        return "  " + ", ".join(f"{k} {head[k]:.3f}" for k in ("auc", "accuracy", "balanced_accuracy")
                                if head.get(k) is not None)
