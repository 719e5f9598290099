"""--select swa: a fixed schedule whose weights are averaged over its second half, instead
of the epoch a few validation slides liked best (early stopping chose epoch <= 4 in a third
of folds on 6-10 validation slides)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import shared
from wsi_mil.cli import main
from wsi_mil.train.loop import _accumulate


def test_the_running_mean_is_the_mean_of_the_snapshots() -> None:
    model = torch.nn.Linear(3, 2)
    snaps, mean = [], None
    for k in range(4):
        with torch.no_grad():
            model.weight.fill_(float(k))
            model.bias.fill_(2.0 * k)
        snaps.append({n: p.detach().clone() for n, p in model.state_dict().items()})
        mean = _accumulate(mean, model, k)
    for name in ("weight", "bias"):
        assert torch.allclose(mean[name], torch.stack([s[name] for s in snaps]).mean(0))


def test_swa_trains_every_epoch_of_every_fold(tmp_path: Path) -> None:
    from wsi_mil.data.mil_import import import_classic

    manifest = import_classic("musk1", shared("mil"), tmp_path / "musk")
    run = tmp_path / "run"
    assert main(["train-mil", str(manifest), "--features", str(tmp_path / "musk" / "features"), "--out", str(run),
                 "--epochs", "8", "--patience", "1", "--select", "swa", "--folds", "3", "--bootstrap", "20",
                 "--no-progress", "-q"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [f["best_epoch"] for f in metrics["folds"]] == [8, 8, 8]  # patience 1 would have stopped early
    assert all(len(json.loads((run / "models" / f"fold{k}.json").read_text())["history"]) == 8 for k in range(3))
    assert metrics["pooled_validation"]["auc"] > 0.6
    report = (run / "report.md").read_text()  # the report says how the weights were chosen
    assert "Model selection: swa: every one of 8 epochs trained, the weights averaged over epochs 5-8" in report
    assert "whose epoch was chosen on those same cases" not in report
