"""Helpers the model benchmarks share: the real CLI timed as a whole process, and the
summary cells of repeated runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WSI_MIL = [sys.executable, "-m", "wsi_mil.cli"]


def run_cli(args: list[str], out: Path) -> float:
    """``wsi-mil ARGS --out OUT`` in a fresh process; its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run(WSI_MIL + args + ["--out", str(out), "--no-progress", "-q"], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def accuracy_at_half(out: Path, positive: str) -> float:
    """Test accuracy of a run's fold ensemble at probability 0.5 (predictions.csv)."""
    with open(out / "predictions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["fold"] == "ensemble"]
    prob = np.asarray([float(next(v for k, v in r.items() if k.startswith("prob_"))) for r in rows])
    truth = np.asarray([r["label"] == positive for r in rows])
    return float(((prob >= 0.5) == truth).mean())


def median_cell(rows: list[dict], key: str, fmt: str = ".3f", unit: str = "") -> str:
    """'median (min–max)' over repeated runs; the value alone for one run."""
    v = np.asarray([x[key] for x in rows], float)
    return f"{np.median(v):{fmt}}{unit} ({v.min():{fmt}}–{v.max():{fmt}}{unit})" if len(v) > 1 else f"{v[0]:{fmt}}{unit}"


def result_row(name: str, rows: list[dict]) -> str:
    """One markdown row of repeated classification runs: AUC, the first run's CI,
    accuracies, sensitivity, specificity, ECE and whole-process wall time."""
    ci = rows[0]["auc_ci95"]
    cells = [median_cell(rows, "auc"), f"{ci[0]:.3f}–{ci[1]:.3f}"]
    cells += [median_cell(rows, k) for k in ("accuracy", "accuracy_at_0.5", "sensitivity", "specificity", "ece")]
    return f"| wsi-mil {name} | " + " | ".join(cells) + f" | {median_cell(rows, 'wall_s', '.0f', ' s')} |"
