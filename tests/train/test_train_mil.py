"""train-mil and predict end to end on real MIL bags (MUSK1 imported into feature stores)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import WSI_MIL, shared
from wsi_mil.data.mil_import import import_classic, load_classic
from wsi_mil.train.losses import BagLoss, label_weights, sample_weights

FAST = ["--folds", "3", "--test-fraction", "0.25", "--epochs", "25", "--patience", "8", "--bags-per-batch", "4",
        "--lr", "5e-4", "--bootstrap", "200", "--no-progress", "-q"]


@pytest.fixture(scope="module")
def musk(tmp_path_factory) -> Path:
    return import_classic("musk1", shared("mil"), tmp_path_factory.mktemp("musk1"))


@pytest.fixture(scope="module")
def musk_run(musk, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("run")
    res = subprocess.run(WSI_MIL + ["train-mil", str(musk), "--features", str(musk.parent / "features"), "--out", str(out), *FAST],
                         capture_output=True, text=True, timeout=900)
    return out, res


def test_import_keeps_every_instance_and_bag_label() -> None:
    bags = load_classic("musk1", shared("mil"))
    assert len(bags) == 92 and sum(b.target[0] for b in bags) == 47
    assert sum(len(b.features) for b in bags) == 476 and bags[0].features.shape[1] == 166


def test_train_mil_learns_musk1_and_writes_every_output(musk_run) -> None:
    out, res = musk_run
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"]["kind"] == "binary" and len(m["folds"]) == 3
    ens = m["ensemble_test"]
    assert ens["auc"] > 0.75, ens  # MUSK1 is learnable; chance is 0.5
    assert ens["auc_ci95"][0] <= ens["auc"] <= ens["auc_ci95"][1]
    assert {"sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "balanced_accuracy", "confusion"} <= set(ens)
    splits = json.loads((out / "splits.json").read_text())
    for f in splits["folds"]:  # one bag per patient here: sets are disjoint
        assert not set(f["train"]) & set(f["val"]) and not set(f["train"]) & set(splits["test"])
    for name in ("report.md", "predictions.csv", "roc.png", "confusion.png", "training_curves.png", "train_config.yaml", "train.log"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    ens_rows = [r for r in rows if r["fold"] == "ensemble"]
    assert len(ens_rows) == len(splits["test"]) and {"prob_1", "prediction", "label"} <= set(rows[0])
    from wsi_mil.io.attention import read_attention

    coords, att, attrs = read_attention(out / "attention" / "ensemble" / f"{ens_rows[0]['slide_id']}.h5")
    assert len(coords) == len(att) and abs(att.sum() - 1) < 1e-4 and attrs["split"] == "test"
    assert "AUC" in res.stdout and "report:" in res.stdout


def test_audit_of_the_musk_run_alone_with_its_feature_stores(musk, musk_run, tmp_path) -> None:
    """`wsi-mil audit` on the run with --features: no two MUSK1 bags are duplicates, but one
    bag holds near-identical instances (conformations of one molecule) and is flagged; every
    error of the headline set is listed with a link to its slide's attention file."""
    out, res = musk_run
    assert res.returncode == 0, res.stderr[-2000:]
    done = subprocess.run(WSI_MIL + ["audit", str(out), "--manifest", str(musk), "--features", str(musk.parent / "features"),
                                     "--out", str(tmp_path / "audit"), "--bootstrap", "100"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    dup = audit["duplicates"]
    assert dup["pairs"] == [] and dup["leaks"] == [] and "musk1-0053" in dup["within_slide"]
    m = json.loads((out / "metrics.json").read_text())
    head = m[m["headline"]["set"]]
    errors = audit["evaluation"]["errors"]
    assert len(errors["false_negatives"]) == head["confusion"][1][0] and len(errors["false_positives"]) == head["confusion"][0][1]
    for case in errors["false_negatives"] + errors["false_positives"]:  # relative to the audit's own folder
        target = (tmp_path / "audit" / case["link"]).resolve()
        assert target.exists() and target.parent.parent == (out / "attention").resolve()
    in_run = m["audit"]["evaluation"]["errors"]
    assert [c["id"] for c in in_run["false_negatives"]] == [c["id"] for c in errors["false_negatives"]]


def test_models_are_weights_only_and_predict_reproduces_the_ensemble(musk, musk_run, tmp_path) -> None:
    out, _ = musk_run
    from safetensors.torch import load_file

    for k in range(3):
        assert (out / "models" / f"fold{k}.safetensors").exists()
        load_file(str(out / "models" / f"fold{k}.safetensors"))  # plain tensors
    assert not list((out / "models").glob("*.pt*"))
    splits = json.loads((out / "splits.json").read_text())
    stores = [musk.parent / "features" / f"{s}.h5" for s in splits["test"]]
    res = subprocess.run(WSI_MIL + ["predict", str(out), *map(str, stores), "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = {r["slide_id"]: float(r["prob_1"]) for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    want = {r["slide_id"]: float(r["prob_1"]) for r in csv.DictReader(open(out / "predictions.csv")) if r["fold"] == "ensemble"}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=1e-5)


def test_rerun_resumes_without_retraining(musk, musk_run) -> None:
    out, _ = musk_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    res = subprocess.run(WSI_MIL + ["train-mil", str(musk), "--features", str(musk.parent / "features"), "--out", str(out), *FAST],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == before
    # a finished run with the same settings and inputs: nothing trained, evaluated or written again
    assert "up to date (every fold trained, every output written" in (out / "train.log").read_text()
    # an output missing (as after a kill during evaluation): the trained folds are loaded, not trained again
    (out / "metrics.json").unlink()
    res = subprocess.run(WSI_MIL + ["train-mil", str(musk), "--features", str(musk.parent / "features"), "--out", str(out), *FAST],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and (out / "metrics.json").is_file(), res.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == before
    assert "trained model found, not training again" in (out / "train.log").read_text()


def test_manifest_split_leaking_a_patient_is_refused(musk, tmp_path) -> None:
    rows = list(csv.DictReader(open(musk)))
    for i, r in enumerate(rows):
        r["split"] = "test" if i < 10 else "train"
        r["patient_id"] = "shared-patient" if i in (0, 50) else r["patient_id"]
    bad = tmp_path / "leaky.csv"
    with open(bad, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = subprocess.run(WSI_MIL + ["train-mil", str(bad), "--features", str(musk.parent / "features"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "shared-patient in test/train" in res.stderr


def test_imbalance_weights_follow_the_class_shares() -> None:
    y = np.array([[1.0]] * 10 + [[0.0]] * 30, np.float32)
    w = label_weights(y, "binary")
    # positive weight = negatives/total = 0.75, negative weight = positives/total = 0.25 (x2)
    torch.testing.assert_close(w[:, 0], torch.tensor([0.5, 1.5]))
    p = sample_weights(y, "binary")
    assert p[:10].sum() == pytest.approx(0.5) and p[10:].sum() == pytest.approx(0.5)
    logits, target = torch.tensor([[4.0], [-4.0], [0.1]]), torch.tensor([[1.0], [0.0], [1.0]])
    plain = BagLoss("binary", "none")(logits, target)
    focal = BagLoss("binary", "focal", None)(logits, target)
    assert focal < plain  # easy examples are down-weighted


def test_a_max_model_saved_before_the_smooth_maximum_loads_as_the_hard_maximum(tmp_path) -> None:
    """Checkpoints keep meaning what they meant when trained: an old max-pooling fold (no
    training revision in its spec) is rebuilt as the hard maximum, a new one as the smooth."""
    import torch

    from wsi_mil.mil import build_model
    from wsi_mil.train.checkpoint import load_model, save_model

    model = build_model("max", 16, 1, smooth=0)
    base = {"model": "max", "in_dim": 16, "n_outputs": 1, "model_args": {"hidden": 256, "dropout": 0.25}}
    save_model(tmp_path / "old", model, dict(base))
    save_model(tmp_path / "new", model, {**base, "training_revision": 4})
    old, _ = load_model(tmp_path / "old")
    new, _ = load_model(tmp_path / "new")
    assert old.smooth == 0 and new.smooth == 5.0
    x, m = torch.randn(1, 9, 16), torch.ones(1, 9, dtype=torch.bool)
    torch.testing.assert_close(old(x, m).logits, model.eval()(x, m).logits)
    # an architecture this version no longer builds is refused with the fix, not loaded half
    save_model(tmp_path / "tx", build_model("abmil", 16, 1), {**base, "model": "transmil"})
    import pytest

    from wsi_mil.errors import ConfigError

    with pytest.raises(ConfigError, match="retrain it"):
        load_model(tmp_path / "tx")
