"""Multi-label: several 0 / 1 label columns, one sigmoid output each (a sample may have several)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from wsi_mil.tasks.base import Question, TaskKind, fmt

if TYPE_CHECKING:
    from wsi_mil.data.bags import Task


class Multilabel(TaskKind):
    name = "multilabel"

    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        from wsi_mil.data.bags import NEGATIVE_VALUES, POSITIVE_VALUES
        from wsi_mil.errors import ManifestError

        out = []
        for col in task.label_columns:
            v = labels.get(col, "").strip().lower()
            if not v:  # not labelled (only images allow it; infer_task refuses blank slide labels)
                out.append(np.nan)
                continue
            if v not in POSITIVE_VALUES | NEGATIVE_VALUES:
                raise ManifestError(f"{where}: {col}={labels.get(col)!r}; multi-label columns take 0 or 1")
            out.append(1.0 if v in POSITIVE_VALUES else 0.0)
        return np.asarray(out, np.float32)

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        from wsi_mil.data.bags import POSITIVE_VALUES

        counts = ""
        if entries:
            counts = ", ".join(f"{name} {sum(e.labels.get(col, '').strip().lower() in POSITIVE_VALUES for e in entries)} "
                               f"positive" for name, col in zip(task.outputs, task.label_columns, strict=True))
        return f"multilabel task over {len(task.outputs)} labels ({counts or ', '.join(task.outputs)})"

    def sample_weights(self, targets: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Inverse to the frequency of the bag's rarest positive label (or of the all-negative pattern)."""
        t = np.nan_to_num(np.asarray(targets, dtype=float), nan=0.0) > 0.5
        freq = t.mean(axis=0).clip(min=1e-6)
        neg = max(1e-6, float((~t.any(axis=1)).mean()))
        w = np.asarray([1.0 / freq[row].min() if row.any() else 1.0 / neg for row in t])
        return w / w.sum()

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        per = self.per_output_metrics(task, y, p, thresholds, config, weights, ci)
        aucs = [m["auc"] for m in per.values() if m["auc"] is not None]
        return {"per_label": per, "auc": float(np.mean(aucs)) if aucs else None, "n": len(y)}

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        if np.isnan(probs).any():  # a blank label (targets): not labelled
            return [name for c, name in enumerate(task.outputs) if probs[c] >= 0.5]
        return [name for c, name in enumerate(task.outputs) if probs[c] >= thresholds[c]]

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        out: list[Question] = []
        for c in range(t.shape[1]):
            ok = np.isin(t[:, c], (0.0, 1.0))
            name = task.outputs[c] if task is not None else str(c)
            out.append((name, [i for i, k in zip(ids, ok, strict=True) if k], t[ok, c].astype(int).tolist(), None))
        return out

    def calibration_lines(self, task: Task, ys: npt.NDArray[Any], ps: npt.NDArray[Any],
                          where: str) -> dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
        known = ~np.isnan(ys)
        return {f"{name} ({where})": (ys[known[:, c], c], ps[known[:, c], c]) for c, name in enumerate(task.outputs)}

    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        lines = ["| set | label | n labelled | positives | AUC (95% CI) | sensitivity | specificity | PPV | F1 | threshold | ECE |",
                 "|" + "---|" * 11]
        for name, key in (("ensemble of folds, test", "ensemble_test"), ("pooled out-of-fold validation", "pooled_validation")):
            for label, mm in (m.get(key) or {}).get("per_label", {}).items():
                ci = mm.get("auc_ci95")
                auc = fmt(mm.get("auc")) + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
                lines.append("| " + " | ".join([name, label, str(mm.get("n")), str(mm.get("n_positive")), auc]
                                                + [fmt(mm.get(k)) for k in ("sensitivity", "specificity", "ppv", "f1",
                                                                             "threshold", "ece")]) + " |")
        lines += ["", ("Per-label AUC needs both classes among the labelled images; a label with few positives has a wide "
                  "interval (or none: '–').")]
        return lines

    def summary_line(self, head: dict[str, Any]) -> str:
        return ("  mean AUC over labels " + (f"{head['auc']:.3f}" if head.get("auc") is not None else "n/a") + "; "
                + ", ".join(f"{k} {v['auc']:.3f}" for k, v in head.get("per_label", {}).items() if v.get("auc") is not None))
