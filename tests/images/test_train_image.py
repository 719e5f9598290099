"""train-image / predict-image on real radiographs: blank labels masked, patient leaks in
the NIH sample caught and re-split, resume, weights-only models, the augmentation never
mirrors, and Grad-CAM maps that land on lesions planted at known places."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_mil.config import ImageTrainConfig
from wsi_mil.data.augment import PRESETS
from wsi_mil.data.images import read_image, resize_grey
from wsi_mil.errors import ManifestError

NIH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr" / "nih1000"


def _nih_rows() -> list[dict[str, str]]:
    with open(NIH / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_default_augmentation_never_mirrors_a_radiograph() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = PRESETS["xray"].matrices(20000, gen)
    assert (torch.linalg.det(theta[:, :, :2]) > 0).all()  # rotations and zooms only, never a reflection
    assert (torch.linalg.det(PRESETS["histology"].matrices(2000, gen)[:, :, :2]) < 0).any()  # flips stay available
    # on a real chest film with an asymmetric marker (the heart sits left of the image centre line)
    img = resize_grey(read_image(sorted((NIH / "NIH1000" / "train" / "0_normal").glob("*.png"))[3]), 64)
    img[6:22, 2:12] = 1.0  # a side marker ("L") in the top-left corner

    def side(a: np.ndarray) -> float:  # the marker's band: left quarter minus right quarter
        return float(a[4:26, :16].mean() - a[4:26, -16:].mean())

    assert side(img) > 0.1 and side(img[:, ::-1]) < -0.1
    x = torch.from_numpy(img)[None, None].repeat(500, 1, 1, 1)
    for name, flips in (("xray", False), ("histology", True)):
        sides = np.asarray([side(a) for a in PRESETS[name](x, gen)[:, 0].numpy()])
        assert (sides < 0).any() == flips, name  # the default never puts the marker on the right


def test_blank_labels_are_masked_not_negative() -> None:
    from wsi_mil.train.losses import BagLoss, label_weights

    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    logits = torch.tensor([[2.0, -5.0], [-1.0, 0.5], [9.0, -0.3]])
    loss = BagLoss("multilabel", "none")(logits, y)
    known = ~torch.isnan(y)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known])
    assert float(loss) == pytest.approx(float(ref))
    w = label_weights(y.numpy(), "multilabel")  # positive share over labelled cells only: 1/2 and 1/2
    assert torch.allclose(w, torch.ones(2, 2))


def _nih_manifest(tmp: Path, n: int | None = None, blank_every: int = 0) -> Path:
    rows = _nih_rows()[:n] if n else _nih_rows()
    path = tmp / "nih.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "split", "label_effusion", "label_infiltration", "sex"])
        for i, r in enumerate(rows):
            eff = "" if blank_every and i % blank_every == 0 else r["Effusion"]
            w.writerow([str(NIH / r["path"]), r["patient_id"], r["split"].replace("valid", "val"), eff, r["Infiltration"], r["sex"]])
    return path


def test_nih_split_leak_is_named_then_resplit_by_patient(tmp_path: Path) -> None:
    from wsi_mil.commands.train_image import prepare_image_inputs, run_train_image

    manifest = _nih_manifest(tmp_path, blank_every=10)
    config = ImageTrainConfig(mode="linear", image_size=32, folds=2, epochs=3, bootstrap=50)
    sets: dict[str, set[str]] = {}
    for r in _nih_rows():
        sets.setdefault(r["patient_id"], set()).add(r["split"])
    crossing = {p for p, s in sets.items() if len(s) > 1}  # 30: 8 of them between train and test
    given = {p for p, s in sets.items() if {"train", "test"} <= s}
    assert len(given) == 8
    with pytest.raises(ManifestError, match=rf"{len(crossing)} patient\(s\) in more than one set.*--resplit"):
        prepare_image_inputs(manifest, config)
    cfg = ImageTrainConfig(mode="linear", image_size=32, folds=2, epochs=3, bootstrap=50, resplit=True, test_fraction=0.2)
    report = run_train_image(manifest, out_dir=tmp_path / "run", config=cfg, progress=False)
    m = report.metrics
    assert set(m["patient_leak"]["patients"]) == crossing and m["splits"]["source"] == "generated"
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    patient = {r["path"].split("/")[-1][:-4]: r["patient_id"] for r in _nih_rows()}
    test_patients = {patient[i] for i in splits["test"]}
    dev_patients = {patient[i] for f in splits["folds"] for i in f["train"] + f["val"]}
    assert not test_patients & dev_patients
    # blank effusion cells: masked, counted, and not scored
    eff = m["ensemble_test"]["per_label"]["effusion"]
    assert eff["n_not_labelled"] > 0 and eff["n"] == len(splits["test"]) - eff["n_not_labelled"]
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "more than one set" in report_md and "Blank label cells" in report_md and "ECE" in report_md
    assert (tmp_path / "run" / "reliability.png").stat().st_size > 0


def _planted(tmp: Path, n: int) -> tuple[Path, Path]:
    from PIL import Image

    from wsi_mil.synth.lesions import planted_cohort

    rows = _nih_rows()[:n]
    imgs = [resize_grey(read_image(NIH / r["path"]), 128) for r in rows]
    new, labels, boxes = planted_cohort(imgs, np.random.default_rng(0))
    (tmp / "img").mkdir()
    manifest, box_csv = tmp / "planted.csv", tmp / "boxes.csv"
    with open(manifest, "w", newline="") as f, open(box_csv, "w", newline="") as g:
        w, b = csv.writer(f), csv.writer(g)
        w.writerow(["path", "patient_id", "label"])
        b.writerow(["image_id", "label", "x", "y", "width", "height"])
        for im, lab, box, r in zip(new, labels, boxes, rows, strict=True):
            iid = Path(r["path"]).stem
            Image.fromarray((im * 255).round().astype(np.uint8)).save(tmp / "img" / f"{iid}.png")
            w.writerow([f"img/{iid}.png", r["patient_id"], ["clear", "lesion"][lab]])
            if box:
                b.writerow([iid, "lesion", box["x0"], box["y0"], box["x1"] - box["x0"], box["y1"] - box["y0"]])
    return manifest, box_csv


def test_grad_cam_lands_on_planted_lesions_and_boxes_score(tmp_path: Path) -> None:
    """A fine-tuned model finds lesions planted in real radiographs; its Grad-CAM maps
    concentrate on them and the boxes from the maps hit the planted boxes."""
    from wsi_mil.commands.predict_image import read_boxes, run_predict_image
    from wsi_mil.commands.train_image import run_train_image
    from wsi_mil.viz.gradcam import grad_cam

    manifest, box_csv = _planted(tmp_path, 360)
    cfg = ImageTrainConfig(mode="partial", image_size=128, folds=1, test_fraction=0.25, epochs=6, lr=1e-3, bootstrap=50)
    report = run_train_image(manifest, out_dir=tmp_path / "run", config=cfg, progress=False)
    assert report.metrics["ensemble_test"]["auc"] > 0.9
    # resume: the fold is found, not trained again (same metrics, model file untouched)
    stamp = (tmp_path / "run" / "models" / "fold0.safetensors").stat().st_mtime_ns
    again = run_train_image(manifest, out_dir=tmp_path / "run", config=cfg, progress=False)
    assert (tmp_path / "run" / "models" / "fold0.safetensors").stat().st_mtime_ns == stamp
    assert again.metrics["ensemble_test"]["auc"] == report.metrics["ensemble_test"]["auc"]
    truth = read_boxes(box_csv)["lesion"]
    test_ids = [i for i in json.loads((tmp_path / "run" / "splits.json").read_text())["test"] if i in truth][:20]
    sub = tmp_path / "test.csv"
    with open(sub, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for iid in test_ids:
            w.writerow([f"img/{iid}.png", iid, "lesion"])
    pred = run_predict_image(tmp_path / "run", sub, out_dir=tmp_path / "pred", cam="gradcam", boxes=box_csv, progress=False)
    loc = pred.localisation["lesion"]
    assert loc["n_images"] == len(test_ids)
    # a manifest with some labels blank: metrics over the labelled images, the blank ones counted (before: no
    # metrics.json at all when any label was blank)
    label_of = {Path(r["path"]).stem: r["label"] for r in csv.DictReader(open(manifest))}
    all_test = json.loads((tmp_path / "run" / "splits.json").read_text())["test"]
    part = tmp_path / "part.csv"
    with open(part, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for k, iid in enumerate(all_test):
            w.writerow([f"img/{iid}.png", iid, "" if k % 3 == 0 else label_of[iid]])
    some = run_predict_image(tmp_path / "run", part, out_dir=tmp_path / "part", progress=False)
    n_blank = len(range(0, len(all_test), 3))
    saved = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert saved["n_images_unlabelled"] == n_blank and saved["n"] == len(all_test) - n_blank
    assert some.metrics["auc"] > 0.85
    assert loc["accuracy"]["0.1"] >= 0.6  # ChestX-ray8's T(IoU)=0.1 (its own figures: 0.2-0.7 per finding)
    gj = json.loads((tmp_path / "pred" / "cam" / f"{test_ids[0]}.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"][0]["geometry"]["type"] == "Polygon"
    assert (tmp_path / "pred" / "cam" / f"{test_ids[0]}.png").stat().st_size > 0
    # the maps concentrate on the evidence: mean activation inside the lesion box at least twice that outside
    from wsi_mil.commands.predict_image import load_run
    from wsi_mil.viz.gradcam import cam_layer

    models, _, _ = load_run(tmp_path / "run")
    layer = cam_layer(models[0])
    ratios = []
    for iid in test_ids:
        img = read_image(tmp_path / "img" / f"{iid}.png")
        cam = grad_cam(models[0], torch.from_numpy(img)[None, None], 0, "gradcam", layer)
        b = truth[iid][0]
        box = np.zeros(cam.shape, bool)
        box[int(b["y0"]):int(np.ceil(b["y1"])), int(b["x0"]):int(np.ceil(b["x1"]))] = True
        ratios.append(cam[box].mean() / max(cam[~box].mean(), 1e-6))
    assert np.mean(np.asarray(ratios) > 2) >= 0.8, ratios
    # a model checkpoint is weights only (safetensors + JSON), loadable without pickle
    spec = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert spec["kind"] == "image" and spec["mode"] == "partial"


def test_every_recipe_in_pipelines_builds_its_config() -> None:
    import yaml

    from wsi_mil.config import ExtractConfig, TileConfig, TrainConfig, VolumeTrainConfig, build_config, load_recipe

    classes = {"tile": TileConfig, "extract_features": ExtractConfig, "extract": ExtractConfig,
               "train_mil": TrainConfig, "train_image": ImageTrainConfig, "train_volume": VolumeTrainConfig}
    recipes = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))
    assert {"train_image_cxr.yaml", "train_volume_ct.yaml"} <= {p.name for p in recipes}
    for path in recipes:
        for section in yaml.safe_load(path.read_text()):
            config = build_config(classes[section], recipe=load_recipe(path, section))  # unknown keys would raise
            if section == "train_volume":
                assert config.prep().window == (-1000.0, 400.0) and config.prep().spacing == (1.5, 1.5, 1.5)


def test_patch_grid_features_are_the_backbone_on_each_crop() -> None:
    from wsi_mil.encoders.image import build_classifier, patch_features, patch_grid
    from wsi_mil.errors import ConfigError

    corners, side, step = patch_grid(96, 3)
    assert (side, step, len(corners)) == (48, 24, 9)
    assert corners.max() + side == 96 and corners.tolist()[:4] == [[0, 0], [24, 0], [48, 0], [0, 24]]
    assert patch_grid(64, 1)[1:] == (64, 64)
    with pytest.raises(ConfigError, match="--image-size"):
        patch_grid(64, 4)  # 25-px patches: too small for a backbone
    model, _ = build_classifier("efficientnet_lite0", 1)
    img = resize_grey(read_image(NIH / _nih_rows()[0]["path"]), 96)
    x = torch.from_numpy(img)[None, None].repeat(2, 1, 1, 1)
    x[1] = 1 - x[1]
    feats = patch_features(model, x, 3, batch_size=9)  # one image per forward pass: batches cross images too
    assert feats.shape == (2, 9, 1280)
    with torch.no_grad():
        ref = model.pooled(model.feature_map(x[1:, :, 24:72, 48:96])).numpy()  # (x=48, y=24): patch 5
    np.testing.assert_allclose(feats[1, 5], ref[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats[0, 5], feats[1, 5])


def test_patch_mil_attends_to_planted_lesions(tmp_path: Path) -> None:
    """A radiograph as a bag of patches through the MIL stack: the model finds lesions
    planted in real radiographs, its attention peaks on the patch that holds the lesion, and
    predict-image draws and scores the attention with the Grad-CAM exporters."""
    import h5py

    from wsi_mil.commands.predict_image import read_boxes, run_predict_image
    from wsi_mil.commands.train_image import run_train_image
    from wsi_mil.encoders.image import patch_grid

    manifest, box_csv = _planted(tmp_path, 360)
    cfg = ImageTrainConfig(mode="mil", image_size=192, patch_grid=4, folds=1, test_fraction=0.25, epochs=30, lr=1e-3,
                           bootstrap=50)
    report = run_train_image(manifest, out_dir=tmp_path / "run", config=cfg, progress=False)
    assert report.metrics["ensemble_test"]["auc"] > 0.85
    spec = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert spec["mode"] == "mil" and spec["model"] == "abmil" and spec["encoder"]["patch_px"] == 76
    truth = read_boxes(box_csv)["lesion"]
    test_ids = [i for i in json.loads((tmp_path / "run" / "splits.json").read_text())["test"] if i in truth]
    corners, side, _ = patch_grid(192, 4)
    hits = []
    for iid in test_ids:
        with h5py.File(tmp_path / "run" / "attention" / "ensemble" / f"{iid}.h5", "r") as f:
            att, coords = f["attention"][:], f["coords"][:]
        assert np.array_equal(coords, corners) and att.sum() == pytest.approx(1, abs=1e-4)
        b = truth[iid][0]  # the planted box, in pixels of the 128-px image; attention corners at 192 px
        cx, cy = (b["x0"] + b["x1"]) / 2 * 1.5, (b["y0"] + b["y1"]) / 2 * 1.5
        x, y = coords[int(np.argmax(att))]
        hits.append(x <= cx < x + side and y <= cy < y + side)
    assert np.mean(hits) >= 0.8, hits
    sub = tmp_path / "test.csv"
    with open(sub, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for iid in test_ids[:20]:
            w.writerow([f"img/{iid}.png", iid, "lesion"])
    with pytest.raises(Exception, match="--cam attention"):
        run_predict_image(tmp_path / "run", sub, out_dir=tmp_path / "bad", cam="gradcam", progress=False)
    pred = run_predict_image(tmp_path / "run", sub, out_dir=tmp_path / "pred", cam="attention", boxes=box_csv,
                             progress=False)
    loc = pred.localisation["lesion"]
    assert loc["n_images"] == len(test_ids[:20]) and loc["accuracy"]["0.1"] >= 0.6
    assert pred.metrics["sensitivity"] >= 0.8  # all 20 carry a lesion
    gj = json.loads((tmp_path / "pred" / "cam" / f"{test_ids[0]}.geojson").read_text())
    assert gj["features"] and gj["features"][0]["geometry"]["type"] == "Polygon"
