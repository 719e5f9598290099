"""Binary: one label column with two classes, one sigmoid output (the positive class)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_mil.tasks.base import Question, TaskKind, fmt, single_column_describe, single_column_target

if TYPE_CHECKING:
    from wsi_mil.data.bags import Task

#: the report's columns after n and AUC (the names of binary_metrics' figures)
_COLUMNS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "balanced_accuracy")


def binary_line(name: str, m: dict[str, Any]) -> str:
    """One row of the binary report table."""
    from wsi_mil.eval.metrics import auc_text

    return "| " + " | ".join([name, str(m.get("n", "")), auc_text(m)] + [fmt(m.get(k)) for k in _COLUMNS]
                             + [fmt(m.get("threshold")), fmt(m.get("ece"))]) + " |"


class Binary(TaskKind):
    name = "binary"
    single_positive = True

    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        found = single_column_target(task, labels, where)
        if found is None:
            return np.full(task.n_outputs, np.nan, np.float32)
        value, values = found
        return np.asarray([float(value == values[1])], np.float32)

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        return single_column_describe(task, entries, "negative, positive: ")

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        return next(iter(self.per_output_metrics(task, y, p, thresholds, config, weights, ci).values()))

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        if np.isnan(probs).any():
            return ""
        return task.classes[int(probs[0] >= thresholds[0])]

    def confusion_classes(self, task: Task) -> list[str]:
        return list(task.classes)

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        ok = np.isin(t[:, 0], (0.0, 1.0))
        return [(None, [i for i, k in zip(ids, ok, strict=True) if k], t[ok, 0].astype(int).tolist(), None)]

    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        lines = ["| set | n | AUC (95% CI) | sensitivity | specificity | PPV | NPV | F1 | accuracy | balanced acc. "
                 "| threshold | ECE |", "|" + "---|" * 12]
        for name, key in (("ensemble of folds, test", "ensemble_test"),
                          ("… at the true prevalence", "ensemble_test_at_true_prevalence"),
                          ("pooled out-of-fold validation", "pooled_validation")):
            if m.get(key):
                lines.append(binary_line(name, m[key]))
        for f in m["folds"]:
            if f["test"]:
                lines.append(binary_line(f"fold {f['fold']}, test", f["test"]))
            lines.append(binary_line(f"fold {f['fold']}, validation", f["val"]))
        return lines

    def summary_line(self, head: dict[str, Any]) -> str:
        from wsi_mil.eval.metrics import auc_text

        return (f"  AUC {auc_text(head) if head.get('auc') is not None else 'n/a'}, n = {head.get('n')}"
                + "".join(f", {k} {head[k]:.3f}" for k in ("sensitivity", "specificity", "ppv", "f1")
                          if head.get(k) is not None))

    def what(self, task: Task) -> str:
        return f"{task.classes[1]} vs {task.classes[0]}"
