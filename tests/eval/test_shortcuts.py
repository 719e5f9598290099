"""Shortcut checks on generated cohorts of real tissue: a cohort whose site (and its stain)
comes with the label is warned about before training and after it, in the log, the
summary and report.md; a balanced cohort (matched pairs of sources and stains) is not."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WSI_MIL
from wsi_mil.cli import main
from wsi_mil.eval.shortcuts import label_association, nuisances, prediction_dependence

#: what every slide's stores carry beside its patch count (wsi_mil.tiling.tissue.stain_statistics)
SLIDE_FACTS = ["tissue area mm²", "tissue colour: a* (green-red)", "tissue colour: b* (blue-yellow)",
               "tissue colour: eosin", "tissue colour: haematoxylin", "tissue colour: lightness"]


def _road(root: Path, preset: str) -> tuple[Path, str]:
    """synth -> tile -> extract-features -> train-mil, as a user runs them; (run, what
    train-mil printed)."""
    common = ["--no-progress", "-q"]
    assert main(["synth", "--preset", preset, "--n-slides", "24", "--size", "1536", "--out", str(root / "slides"),
                 *common]) == 0
    assert main(["tile", str(root / "slides" / "manifest.csv"), "--out", str(root / "tiles"), "--workers", "1",
                 *common]) == 0
    assert main(["extract-features", str(root / "tiles"), "--out", str(root / "tiles"), *common]) == 0
    res = subprocess.run(WSI_MIL + ["train-mil", str(root / "slides" / "manifest.csv"), "--features",
                                    str(root / "tiles" / "features"), "--out", str(root / "run"), "--epochs", "10",
                                    "--folds", "3", "--bootstrap", "50", "--no-progress"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    return root / "run", res.stdout + res.stderr


@pytest.fixture(scope="module")
def confounded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _road(tmp_path_factory.mktemp("confounded"), "confounded")


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _road(tmp_path_factory.mktemp("balanced"), "balanced")


def test_a_confounded_cohort_is_warned_about_before_and_after_training(confounded) -> None:
    run, output = confounded
    shortcuts = json.loads((run / "metrics.json").read_text())["audit"]["shortcuts"]
    site = next(r for r in shortcuts["before"] if r["nuisance"] == "site")
    assert site["warn"] and site["auc"] == pytest.approx(0.833, abs=1e-3) and site["p"] < 0.01
    assert site["table"] == {"site-A": {"negative": 10, "positive": 2}, "site-B": {"negative": 2, "positive": 10}}
    assert "WARNING: the label is associated with 'site'" in output  # logged before training, and in the summary
    report = (run / "report.md").read_text()
    assert "## Shortcut checks" in report and "**WARNING: the label is associated with 'site'" in report
    after = next(r for r in shortcuts["after"] if r["nuisance"] == "site")
    assert after["level_auc_within_class"] is not None and shortcuts["set"]
    # site-B's stain, seen from the thumbnails alone (a cohort without the site column has this): a note, since
    # large lesions in their own colours show there too
    colour = next(r for r in shortcuts["before"] if r["nuisance"] == "tissue colour: b* (blue-yellow)")
    assert colour["note"] and not colour["warn"] and colour["auc"] >= 0.7 and colour["p"] < 0.01
    assert "- Note: the b* (blue-yellow) of the tissue differs between the classes" in report
    assert "note: the b* (blue-yellow) of the tissue differs" in output
    assert {r["nuisance"] for r in shortcuts["before"]} == {"patch count", "site", *SLIDE_FACTS}
    loc = shortcuts["localisation"]  # the generated slides' lesion masks are found through the stores
    assert loc["n"] >= 5 and 0 <= loc["min"] <= loc["mean"] <= 1


def test_a_balanced_cohort_raises_no_shortcut_warning(balanced) -> None:
    run, output = balanced
    shortcuts = json.loads((run / "metrics.json").read_text())["audit"]["shortcuts"]
    assert shortcuts["checked"] == ["patch count", *SLIDE_FACTS]  # the nuisances a slide cohort always carries
    assert not any(r["warn"] or r["note"] for r in shortcuts["before"] + shortcuts["after"])
    assert not shortcuts.get("localisation_warning")
    report = (run / "report.md").read_text()
    for shortcut in ("is associated with", "the predictions depend on", "its attention is not on the lesions"):
        assert shortcut not in output and shortcut not in report
    # every normal source is shown by as many positive as negative slides (+-1)
    rows = re.findall(r"^\| normal source \| (\S+) \| (\d+) \| (\d+) \|$", (run.parent / "slides" / "README.md").read_text(),
                      re.MULTILINE)
    assert len(rows) == 7 and all(abs(int(neg) - int(pos)) <= 1 for _, neg, pos in rows)


def test_a_balanced_column_is_not_associated_and_a_planted_one_is() -> None:
    """Each level's positive share, not a leave-one-out share (which ranks a perfectly
    balanced column at AUC 1.0, inverted)."""
    ids = [f"s{i}" for i in range(40)]
    y = np.array([i % 2 for i in range(40)])
    columns = {i: {"scanner": "X" if k % 4 < 2 else "Y",  # balanced: 10 + 10 per scanner
                   "site": "B" if (k < 32 and y[k]) or (k >= 36 and not y[k]) else "A",  # 16 / 20 vs 2 / 20
                   "slide_id": i, "patient_id": f"p{k}"} for k, i in enumerate(ids)}
    found = nuisances(ids, columns)
    assert set(found) == {"scanner", "site"}  # ids and patients are never nuisances
    by = {r["nuisance"]: r for r in label_association(ids, y, found)}
    assert by["scanner"]["auc"] == pytest.approx(0.5) and not by["scanner"]["warn"]
    assert by["site"]["warn"] and by["site"]["test"] == "Fisher's exact"
    # predictions made of the site alone: the within-site AUC collapses and the within-class separation is perfect
    p = np.array([0.9 if columns[i]["site"] == "B" else 0.1 for i in ids])
    dep = {r["nuisance"]: r for r in prediction_dependence(ids, y, p, found)}
    assert dep["site"]["warn"] and dep["site"]["within_level_auc"] == pytest.approx(0.5)
    assert not dep["scanner"]["warn"]
    # a handful of slides: a column that splits them perfectly within each class is chance, not a warning
    few = ids[:8]
    tray = {i: {"tray": "t1" if (k // 2) % 2 else "t2"} for k, i in enumerate(few)}
    p8 = np.array([0.9 if tray[i]["tray"] == "t1" else 0.1 for i in few]) + y[:8] * 0.01
    row = prediction_dependence(few, y[:8], p8, nuisances(few, tray))[0]
    assert row["level_auc_within_class"] == pytest.approx(1.0) and row["p_level"] > 0.01 and not row["warn"]
    # a note written for positives only is a nuisance too ("blank or not"); NA is blank, not a level
    notes = {i: {"comment": "re-cut" if y[k] else "", "stain": "NA" if k % 5 == 0 else ["x", "y"][k % 2]}
             for k, i in enumerate(ids)}
    found = nuisances(ids, notes)
    assert found["comment (blank or not)"]["kind"] == "categorical" and "NA" not in found["stain"]["values"].values()
    by = {r["nuisance"]: r for r in label_association(ids, y, found)}
    assert by["comment (blank or not)"]["warn"]


def test_a_colour_nuisance_is_a_note_not_a_warning() -> None:
    """The tissue's colour separates the classes both when a stain comes with the label and
    when large lesions have their own colour: it is reported as a note to check."""
    from wsi_mil.eval.shortcuts import COLOUR, notes_of, warnings_of

    ids = [f"s{i}" for i in range(30)]
    y = np.array([i % 2 for i in range(30)])
    facts = {i: {COLOUR + "b* (blue-yellow)": 8.0 + 3.0 * y[k] + 0.1 * k, "patch count": 100 + 40 * y[k] + k}
             for k, i in enumerate(ids)}
    before = {r["nuisance"]: r for r in label_association(ids, y, nuisances(ids, {}, facts))}
    assert before["patch count"]["warn"] and not before["patch count"]["note"]
    colour = before[COLOUR + "b* (blue-yellow)"]
    assert colour["note"] and not colour["warn"] and colour["auc"] == pytest.approx(1.0)
    audit = {"before": list(before.values())}
    assert [w for w in warnings_of(audit) if "b*" in w] == []
    (note,) = notes_of(audit)
    assert note.startswith("the b* (blue-yellow) of the tissue differs between the classes (AUC 1.00")


def test_the_audit_reruns_the_checks_with_a_column_added_after_training(confounded, tmp_path) -> None:
    """`wsi-mil audit` checks again with the manifest it is given: a column the training
    manifest lacked (the site, found out later, here called scanner) is warned about, before
    (its association with the label) and after (the predictions' dependence on it); with
    --features the stores' facts (tissue colour) are checked too."""
    run, _ = confounded
    slides = run.parent / "slides"
    with open(slides / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "later.csv", "w", newline="") as fh:  # the site's column under another name
        w = csv.DictWriter(fh, fieldnames=["slide_id", "patient_id", "path", "label", "scanner"])
        w.writeheader()
        for r in rows:
            w.writerow({"slide_id": r["slide_id"], "patient_id": r["patient_id"], "path": str(slides / r["path"]),
                        "label": r["label"], "scanner": {"site-A": "S1", "site-B": "S2"}[r["site"]]})
    done = subprocess.run(WSI_MIL + ["audit", str(run), "--manifest", str(tmp_path / "later.csv"), "--features",
                                     str(run.parent / "tiles" / "features"), "--out", str(tmp_path / "audit"),
                                     "--bootstrap", "50"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    shortcuts = json.loads((tmp_path / "audit" / "audit.json").read_text())["shortcuts"]
    scanner = next(r for r in shortcuts["before"] if r["nuisance"] == "scanner")
    assert scanner["warn"] and scanner["table"] == {"S1": {"negative": 10, "positive": 2}, "S2": {"negative": 2, "positive": 10}}
    assert "WARNING: the label is associated with 'scanner'" in done.stdout
    assert {"patch count", *SLIDE_FACTS} <= set(shortcuts["checked"])
    assert any(r["nuisance"] == "scanner" for r in shortcuts["after"]) and shortcuts["localisation"]["n"] >= 5
    assert "## Shortcut checks" in (tmp_path / "audit" / "report.md").read_text()
