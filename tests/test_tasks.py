"""Task kinds as objects (wsi_mil/tasks): each owns its targets, activation, loss, score, thresholds,
metrics, call and report; the rest of the package asks the kind instead of testing its name."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsi_mil import choices
from wsi_mil.data.bags import Task
from wsi_mil.tasks import KINDS, kind_of

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_mil"
TASKS = {
    "binary": Task("binary", ("tumour",), ("label",), ("normal", "tumour")),
    "multiclass": Task("multiclass", ("a", "b", "c"), ("label",), ("a", "b", "c")),
    "multilabel": Task("multilabel", ("x", "y"), ("label_x", "label_y")),
}
LABELS = {
    "binary": [{"label": v} for v in ("normal", "tumour") * 10],
    "multiclass": [{"label": v} for v in ("a", "b", "c") * 7],
    "multilabel": [{"label_x": a, "label_y": b} for a, b in (("1", "0"), ("0", "1"), ("1", "1"), ("0", "0")) * 5],
}


def test_every_task_of_the_choices_is_a_registered_kind() -> None:
    assert set(KINDS) == set(choices.TASKS) - {"auto"}
    with pytest.raises(ValueError, match="unknown task kind 'ordinal'"):
        kind_of("ordinal")


@pytest.mark.parametrize("name", list(TASKS))
def test_a_kind_carries_a_cohort_from_labels_to_its_report(name) -> None:
    task, kind = TASKS[name], kind_of(name)
    assert task.kind_obj is kind
    y = np.stack([task.target(lab, f"row {i}") for i, lab in enumerate(LABELS[name])])
    assert y.shape == (len(LABELS[name]), task.n_outputs) and not np.isnan(y).any()
    rng = np.random.default_rng(0)
    logits = torch.from_numpy((4 * (y - 0.5) + rng.normal(0, 1.5, y.shape)).astype(np.float32))
    p = kind.activation(logits).numpy()
    assert np.all((p >= 0) & (p <= 1)) and (not kind.argmax_call or np.allclose(p.sum(axis=1), 1, atol=1e-5))
    target = torch.from_numpy(y)
    loss = kind.loss(logits, target, None, "none", 2.0)
    assert loss.item() > 0 and loss.item() < kind.loss(-logits, target, None, "none", 2.0).item()  # right beats wrong
    blank = target.clone()
    blank[0] = float("nan")  # a blank label is masked, never counted as negative
    assert torch.isfinite(kind.loss(logits, blank, kind.loss_weights(y), "weighted", 2.0))
    score = kind.score(task, y, p)
    assert score is not None and score > 0.8
    config = SimpleNamespace(bootstrap=50, seed=0)
    thresholds = kind.thresholds(task, y, p, "youden", 0.9)
    assert len(thresholds) == (0 if kind.argmax_call else task.n_outputs)
    metrics = kind.evaluate(task, y, p, thresholds, config)
    assert metrics["auc"] is not None and metrics["auc"] > 0.8
    call = kind.predicted(task, p[1], thresholds)
    assert call  # a class name, or the list of labels called positive
    table = "\n".join(kind.report_table(task, {"ensemble_test": metrics, "pooled_validation": metrics, "folds": []}))
    assert table.startswith("| set |") and "ensemble of folds, test" in table
    assert kind.summary_line(metrics).strip()
    w = kind.sample_weights(y)
    assert np.isclose(w.sum(), 1.0) and (w > 0).all()


def test_no_module_outside_the_task_kinds_tests_a_task_by_its_name() -> None:
    """Only the task kinds and the recognition of a manifest's task (data/bags.py: --task auto)
    spell the names; everything else asks the kind (a new kind must not need edits elsewhere)."""
    allowed = {"tasks", "choices.py", "data/bags.py"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.split("/")[0] in allowed or rel in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""(\bkind\b|\[["']kind["']\])\s*[!=]=\s*["'](binary|multiclass|multilabel)["']""", line):
                found.append(f"wsi_mil/{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
