"""What train-mil and predict do with bad inputs a real user feeds them: non-finite
features, stray label values, misspelt slide ids and missing stores. None of these may
turn into a number or a smaller cohort without failing loudly (regressions of issue 11)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import WSI_MIL, shared
from wsi_mil.data.mil_import import import_classic

QUICK = ["--folds", "2", "--test-fraction", "0.25", "--epochs", "3", "--patience", "2", "--bags-per-batch", "8",
         "--bootstrap", "20", "--no-progress"]


@pytest.fixture(scope="module")
def musk(tmp_path_factory) -> Path:
    """MUSK1 (92 real bags) imported into feature stores; returns the manifest."""
    return import_classic("musk1", shared("mil"), tmp_path_factory.mktemp("musk1"))


def _rows(manifest: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(manifest)))


def _write(path: Path, rows: list[dict[str, str]], header: str = "", drop: tuple[str, ...] = ()) -> Path:
    fields = [k for k in rows[0] if k not in drop]
    with open(path, "w", newline="") as fh:
        fh.write(header)
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _train(manifest: Path, features: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(WSI_MIL + ["train-mil", str(manifest), "--features", str(features), "--out", str(out),
                                     *QUICK, *extra], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def nan_features(musk, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the MUSK1 stores in which one bag has NaN rows."""
    feats = tmp_path_factory.mktemp("nan") / "features"
    shutil.copytree(musk.parent / "features", feats)
    victim = _rows(musk)[0]["slide_id"]
    with h5py.File(feats / f"{victim}.h5", "r+") as f:
        x = f["features"][...]
        x[[0, 2]] = np.nan
        f["features"][...] = x
    return feats, victim


def test_nan_features_stop_training_naming_the_store_and_rows(musk, nan_features, tmp_path) -> None:
    feats, victim = nan_features
    out = tmp_path / "run"
    res = _train(musk, feats, out)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"{victim}.h5" in res.stderr and "rows 0, 2" in res.stderr and "not finite" in res.stderr
    assert "Input contains NaN" not in res.stderr
    assert not out.exists()  # nothing written for a run that did not start


def test_allow_missing_trains_without_the_nan_slide_and_lists_it(musk, nan_features, tmp_path) -> None:
    feats, victim = nan_features
    out = tmp_path / "run"
    res = _train(musk, feats, out, "--allow-missing")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert [x["slide_id"] for x in m["skipped"]] == [victim] and m["n_slides"] == 91
    assert victim in (out / "report.md").read_text() and "LEFT OUT" in res.stdout
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert victim not in {r["slide_id"] for r in rows}
    assert all(np.isfinite(float(r["prob_1"])) for r in rows)


def test_predict_fails_a_nan_store_and_writes_no_nan(musk, nan_features, tmp_path) -> None:
    feats, victim = nan_features
    run = tmp_path / "run"
    assert _train(musk, musk.parent / "features", run).returncode == 0
    others = [p for p in sorted(feats.glob("*.h5")) if p.stem != victim][:3]
    res = subprocess.run(WSI_MIL + ["predict", str(run), str(feats / f"{victim}.h5"), *map(str, others),
                                    "--out", str(tmp_path / "pred")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "1 failed" in res.stdout and "not finite" in res.stderr
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert victim not in {r["slide_id"] for r in rows} and len(rows) == 3
    assert all(np.isfinite(float(r["prob_1"])) for r in rows)
    assert not (tmp_path / "pred" / "attention" / f"{victim}.h5").exists()
    report = json.loads((tmp_path / "pred" / "predict_report.json").read_text())
    assert [f["slide_id"] for f in report["failed"]] == [victim]


def test_feature_writer_refuses_a_non_finite_chunk(tmp_path) -> None:
    from wsi_mil.errors import NonFiniteFeaturesError
    from wsi_mil.io.features import FeatureWriter

    w = FeatureWriter(tmp_path / "s.h5", "h5", {"fingerprint": "x", "dim": 4}, n_total=3)
    w.start()
    feats = np.ones((3, 4), np.float32)
    feats[1, 2] = np.inf
    with pytest.raises(NonFiniteFeaturesError, match="1 of 3 patches"):
        w.write_chunk(0, 3, feats, np.arange(3), [])
    assert not list(w.parts_dir.glob("chunk-*"))


@pytest.mark.parametrize("stray", ["maybe", "NaN"])
def test_a_stray_label_value_is_an_error_naming_the_slide(musk, tmp_path, stray) -> None:
    rows = _rows(musk)
    rows[5]["label"] = stray
    res = _train(_write(tmp_path / "m.csv", rows), musk.parent / "features", tmp_path / "run")
    assert res.returncode == 2, res.stdout[-2000:]
    assert rows[5]["slide_id"] in res.stderr and stray in res.stderr
    assert not (tmp_path / "run").exists()


def test_task_binary_refuses_a_third_value_and_small_classes_are_named(musk, tmp_path) -> None:
    from wsi_mil.data.bags import infer_task
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.errors import ManifestError

    rows = _rows(musk)
    for i in range(3):
        rows[i]["label"] = "2"
    entries = read_manifest(_write(tmp_path / "m.csv", rows))
    for kind in ("binary", "auto"):
        with pytest.raises(ManifestError, match=r"codes classes as \['0', '1'\] but also holds \['2'\]: musk1-0001"):
            infer_task(entries, kind)
    named = [{**r, "label": {"0": "benign", "1": "malignant", "2": "other"}[r["label"]]} for r in rows]
    with pytest.raises(ManifestError, match="a binary task takes exactly two"):
        infer_task(read_manifest(_write(tmp_path / "n.csv", named)), "binary")
    with pytest.raises(ManifestError, match=f"fewer than 5 slides in class '2': {rows[0]['slide_id']}"):
        infer_task(entries, "multiclass")
    assert infer_task(entries, "multiclass", min_per_class=3).classes == ("0", "1", "2")


def test_classes_name_the_labels_in_every_output(musk, tmp_path) -> None:
    rows = _rows(musk)
    m = _write(tmp_path / "m.csv", rows, header="# classes: normal,tumour\n", drop=("path",))  # no path column
    out = tmp_path / "run"
    res = _train(m, musk.parent / "features", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "normal (label 0): 45 slide(s)" in res.stderr and "tumour (label 1): 47 slide(s)" in res.stderr
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    assert "prob_tumour" in preds[0] and {r["label"] for r in preds} == {"normal", "tumour"}
    assert {r["prediction"] for r in preds} <= {"normal", "tumour"}
    from wsi_mil.io.attention import read_attention_attrs

    attrs = read_attention_attrs(next((out / "attention" / "ensemble").glob("*.h5")))
    assert attrs["outputs"] == ["tumour"] and attrs["prediction"] in ("normal", "tumour")
    report = (out / "report.md").read_text()
    assert "tumour" in report and "split from the" not in report
    # the same names from the command line; a value outside them is refused
    rows[3]["label"] = "tumor"
    res = _train(_write(tmp_path / "m2.csv", rows), musk.parent / "features", tmp_path / "run2",
                 "--classes", "normal,tumour")
    assert res.returncode == 2 and rows[3]["slide_id"] in res.stderr and "'tumor'" in res.stderr


def test_a_misspelt_slide_id_stops_the_run_unless_allowed(musk, tmp_path) -> None:
    rows = _rows(musk)
    rows[7]["slide_id"] = rows[7]["slide_id"] + "x"
    m = _write(tmp_path / "m.csv", rows)
    res = _train(m, musk.parent / "features", tmp_path / "run")
    assert res.returncode == 1 and rows[7]["slide_id"] in res.stderr and "--allow-missing" in res.stderr
    assert "will be reported as failed" not in res.stderr and not (tmp_path / "run").exists()
    res = _train(m, musk.parent / "features", tmp_path / "run", "--allow-missing")
    assert res.returncode == 0, res.stderr[-2000:]
    assert rows[7]["slide_id"] in (tmp_path / "run" / "report.md").read_text()


def test_a_corrupt_weights_file_is_named(tmp_path) -> None:
    from wsi_mil.errors import ConfigError
    from wsi_mil.mil import build_model
    from wsi_mil.train.checkpoint import load_model, save_model

    stem = tmp_path / "models" / "fold0"
    save_model(stem, build_model("abmil", 8, 1, hidden=16, dropout=0.0),
               {"model": "abmil", "in_dim": 8, "n_outputs": 1, "model_args": {"hidden": 16, "dropout": 0.0}})
    load_model(stem)
    weights = stem.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:40])  # cut short, as a full disk or a bad copy leaves it
    with pytest.raises(ConfigError, match="fold0.safetensors: the weights file is damaged"):
        load_model(stem)
