"""PNG plots for reports: ROC curves, confusion matrix, training curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from wsi_mil.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def roc_plot(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Path:
    """ROC curves, one per entry ``name -> (labels, scores)``, AUC in the legend."""
    return _save(roc_figure(curves, title), path)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Any:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p) in curves.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        # drawn over the frame and never clipped: a perfect curve runs along the axes
        ax.plot(fpr, tpr, lw=2 if name.startswith("ensemble") else 1, label=f"{name} (AUC {roc_auc_score(y, p):.3f})",
                clip_on=False, zorder=3)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def confusion_plot(path: Path, cm: list[list[float]], classes: list[str], title: str) -> Path:
    plt = _plt()
    m = np.asarray(cm, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:g}", ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def curves_plot(path: Path, histories: dict[str, list[dict[str, Any]]], score: str = "AUC", loss_note: str = "") -> Path:
    """Training loss and validation loss / score (``score``: the task's, AUC by default) per epoch, one line per
    fold; ``loss_note`` under the loss panel's title."""
    return _save(curves_figure(histories, score, loss_note), path)


def curves_figure(histories: dict[str, list[dict[str, Any]]], score: str = "AUC", loss_note: str = "") -> Any:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        line = axes[0].plot(ep, [h["train_loss"] for h in hist], label=f"{name} train")[0]
        if any(h.get("val_loss") is not None for h in hist):
            axes[0].plot(ep, [h.get("val_loss") for h in hist], ls="--", c=line.get_color(), label=f"{name} val")
            axes[1].plot(ep, [h.get("val_auc") if h.get("val_auc") is not None else np.nan for h in hist], c=line.get_color(), label=name)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss" + (f"\n{loss_note}" if loss_note else ""))
    if loss_note:
        axes[0].title.set_fontsize(8)
    values = [float(h["val_auc"]) for hist in histories.values() for h in hist if h.get("val_auc") is not None]
    # (an AUC or a concordance is in [0, 1]; an R² or a skill over chance can fall below 0: never cut off)
    low = min([0.0, *values]) if values else 0.0
    axes[1].set(xlabel="epoch", ylabel=score, title=f"validation {score}", ylim=(min(-0.02, low - 0.02), 1.02))
    axes[0].legend(fontsize=7)
    return fig


def reliability_plot(path: Path, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Reliability diagram (observed positive rate against mean predicted probability per
    bin, marker area by count), one line per set, ECE in the legend."""
    from wsi_mil.eval.metrics import calibration_bins, expected_calibration_error

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    for name, (y, p) in sets.items():
        if not len(y):
            continue
        b = calibration_bins(y, p)
        ece = expected_calibration_error(y, p)
        line = ax.plot(b["confidence"], b["observed"], marker="o", ms=3, lw=1, label=f"{name} (ECE {ece:.3f})")[0]
        ax.scatter(b["confidence"], b["observed"], s=8 + 200 * np.asarray(b["count"]) / max(1, len(y)),
                   color=line.get_color(), alpha=0.5)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", title="reliability",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
