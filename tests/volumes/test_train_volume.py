"""train-volume / predict-volume on real CT (AdrenalMNIST3D) given as NIfTI files and DICOM
series: the 3D augmentation never mirrors, ACS / inflated convolutions reproduce their 2D
kernels, a 3D CNN and 2.5D slice-MIL find lesions planted at known places, and the
heatmaps land on them and are aligned with the input (shape and affine)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import shared
from wsi_mil.config import VolumeTrainConfig
from wsi_mil.data.augment import VOLUME_PRESETS
from wsi_mil.synth.volumes import plant_sphere, write_dicom_series, write_nifti


def _real(n: int, level: float = 1.0) -> list[np.ndarray]:
    """AdrenalMNIST3D's real adrenal shapes (binary masks of CT segmentations), at ``level``."""
    d = np.load(shared("vol3d", "adrenalmnist3d.npz"))
    return [d["train_images"][i].astype(np.float32) / 255.0 * level for i in range(n)]


def test_default_3d_augmentation_never_mirrors_left_and_right() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = VOLUME_PRESETS["volume"].matrices(20000, gen)
    assert (torch.linalg.det(theta[:, :, :3]) > 0).all()  # rotations and scaling only
    assert (torch.linalg.det(VOLUME_PRESETS["volume-flip"].matrices(2000, gen)[:, :, :3]) < 0).any()
    vol = _real(1)[0] * 0.5
    vol[8:20, 8:20, 1:6] = 1.0  # a bright marker on the patient's left (low W; W runs towards the right)

    def side(a: np.ndarray) -> float:
        return float(a[6:22, 6:22, :9].mean() - a[6:22, 6:22, -9:].mean())

    assert side(vol) > 0.2
    x = torch.from_numpy(vol)[None, None].repeat(300, 1, 1, 1, 1)
    for name, flips in (("volume", False), ("volume-elastic", False), ("volume-flip", True)):
        sides = np.asarray([side(a) for a in VOLUME_PRESETS[name](x, gen)[:, 0].numpy()])
        assert (sides < 0).any() == flips, name


def test_acs_and_inflated_convolutions_reproduce_the_2d_kernel() -> None:
    from wsi_mil.encoders.volume import Conv3dFrom2d

    torch.manual_seed(0)
    for groups, cin, cout in ((1, 4, 9), (6, 6, 6)):  # dense and depthwise (EfficientNet's)
        conv = nn.Conv2d(cin, cout, 3, 1, 1, groups=groups)
        x = torch.rand(1, cin, 7, 8, 9)
        acs = Conv3dFrom2d(conv, "acs")
        y = acs(x)
        (a0, a1), (c0, c1), (s0, s1) = acs.splits
        with torch.no_grad():  # each third of the channels is the 2D kernel in one plane
            axial = torch.stack([conv(x[:, :, d]) for d in range(7)], 2)[:, a0:a1]
            coronal = torch.stack([conv(x[:, :, :, h]) for h in range(8)], 3)[:, c0:c1]
            sagittal = torch.stack([conv(x[..., w]) for w in range(9)], 4)[:, s0:s1]
        torch.testing.assert_close(y[:, a0:a1], axial)
        torch.testing.assert_close(y[:, c0:c1], coronal)
        torch.testing.assert_close(y[:, s0:s1], sagittal)
        flat = x[:, :, :1].repeat(1, 1, 7, 1, 1)  # constant along depth: inflated = 2D inside
        with torch.no_grad():
            torch.testing.assert_close(Conv3dFrom2d(conv, "inflate")(flat)[:, :, 3], conv(flat[:, :, 0]))


def test_pretrained_2d_backbone_runs_as_3d_and_keeps_its_weights() -> None:
    from wsi_mil.encoders.image import build_classifier
    from wsi_mil.encoders.volume import build_volume_classifier

    two_d, _ = build_classifier("efficientnet_lite0", 1)
    for how in ("acs", "inflate"):
        model, info = build_volume_classifier(how, 2)
        assert info["converted"] == how and info["weights_sha256"]
        sd2, sd3 = two_d.backbone.state_dict(), model.backbone.state_dict()
        assert set(sd2) == set(sd3) and all(torch.equal(sd2[k], sd3[k]) for k in sd2)
        assert all(p.requires_grad for p in model.parameters())  # fine-tuned whole, not a frozen encoder
        with torch.no_grad():
            out = model(torch.rand(2, 1, 32, 32, 32))
        assert out.shape == (2, 2) and torch.isfinite(out).all()


def _cohort(tmp: Path, n: int) -> tuple[Path, dict[str, dict[str, float]], dict[str, Path]]:
    """Real adrenal shapes as soft tissue (0.45 of the window), half with a planted
    hyperdense sphere, stored as NIfTI (LPS storage, axes transposed) or as DICOM series,
    one per patient."""
    rng = np.random.default_rng(0)
    vols = _real(n, 0.45)
    spheres, paths = {}, {}
    manifest = tmp / "volumes.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "patient_id", "label"])
        for i, v in enumerate(vols):
            vid, label = f"case{i:03d}", i % 2
            if label:
                v, spheres[vid] = plant_sphere(v, rng)
            hu = v * 1400.0 - 1000.0
            if i % 3 == 0:
                rel = f"dicom/{vid}"
                write_dicom_series(tmp / rel, hu, spacing=(1.0, 1.0, 1.0), shuffle=i)
            else:
                rel = f"nifti/{vid}.nii.gz"
                affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS storage: the reader turns it to RAS
                write_nifti(tmp / rel, hu.transpose(2, 1, 0).astype(np.float32), affine)
            paths[vid] = tmp / rel
            w.writerow([rel, vid, f"p{i:03d}", ["clear", "lesion"][label]])
    return manifest, spheres, paths


def _source_peak_inside(heatmap: np.ndarray, vid: str, spheres: dict[str, dict[str, float]], path: Path) -> bool:
    """Whether the heatmap's peak (on the source array) lies within 2 radii of the sphere."""
    s = spheres[vid]
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if path.is_dir():  # DICOM (k, r, c) = the planted (d, h, w)
        centre = (s["d"], s["h"], s["w"])
    else:  # NIfTI stored as (w, h, d) transposed
        centre = (s["w"], s["h"], s["d"])
    return float(np.linalg.norm(np.subtract(peak, centre))) <= 2 * s["radius"] + 1


def test_3d_cnn_finds_planted_lesions_and_its_heatmap_aligns_with_the_input(tmp_path: Path) -> None:
    import nibabel as nib

    from wsi_mil.commands.predict_volume import run_predict_volume
    from wsi_mil.commands.train_volume import run_train_volume

    manifest, spheres, paths = _cohort(tmp_path, 160)
    cfg = VolumeTrainConfig(mode="cnn", arch="resnet18_3d", width=8, volume_size=28, window="-1000,400", folds=1,
                            test_fraction=0.25, epochs=12, lr=3e-3, batch_size=16, bootstrap=50)
    report = run_train_volume(manifest, out_dir=tmp_path / "run", config=cfg, progress=False)
    assert report.metrics["ensemble_test"]["auc"] > 0.9
    # the shared audit ran on the volumes (DICOM series and NIfTI read once, by the trainer): distinct
    # generated cases are no duplicates, and every error is listed with the middle slice in the gallery
    audit = report.metrics["audit"]
    assert "mean projections" in audit["duplicates"]["method"] and audit["duplicates"]["pairs"] == []
    errors = audit["evaluation"]["errors"]
    conf = report.metrics[report.metrics["headline"]["set"]]["confusion"]
    assert len(errors["false_negatives"]) == conf[1][0] and len(errors["false_positives"]) == conf[0][1]
    assert (tmp_path / "run" / "gallery.png").exists() and (tmp_path / "run" / "errors.csv").exists()
    spec = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert spec["kind"] == "volume" and spec["prep"]["window"] == [-1000.0, 400.0]
    test_ids = json.loads((tmp_path / "run" / "splits.json").read_text())["test"]
    sub = tmp_path / "test.csv"
    with open(sub, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for vid in test_ids:
            w.writerow([str(paths[vid]), vid, "lesion" if vid in spheres else "clear"])
    pred = run_predict_volume(tmp_path / "run", sub, out_dir=tmp_path / "pred", maps=True, progress=False)
    assert pred.metrics["auc"] > 0.9 and pred.n_images == len(test_ids)
    hits = []
    for vid in test_ids:
        heat = nib.load(str(tmp_path / "pred" / "maps" / f"{vid}.nii.gz"))
        src = nib.load(str(paths[vid])) if paths[vid].is_file() else None
        if src is not None:  # the heatmap sits on the input's voxel grid, with its affine
            assert heat.shape == src.shape and np.allclose(heat.affine, src.affine)
        else:
            from wsi_mil.data.volumes import read_volume

            v = read_volume(paths[vid])
            assert heat.shape == v.source_shape and np.allclose(heat.affine, v.source_affine)
        if vid in spheres:
            hits.append(_source_peak_inside(np.asarray(heat.dataobj), vid, spheres, paths[vid]))
    assert np.mean(hits) >= 0.7, hits
    assert (tmp_path / "pred" / "maps" / f"{test_ids[0]}.png").stat().st_size > 0
    # new scans without a label column are predicted (before: "--labels names column(s) ['label']"), and a
    # NIfTI's id drops both parts of .nii.gz (before: maps/<id>.nii.nii.gz)
    nifti_ids = [v for v in test_ids if paths[v].is_file()]
    new_scans = tmp_path / "new.csv"
    new_scans.write_text("path\n" + "".join(f"{paths[v]}\n" for v in nifti_ids))
    unlabelled = run_predict_volume(tmp_path / "run", new_scans, out_dir=tmp_path / "new", maps=True, limit_maps=2,
                                    progress=False)
    assert unlabelled.n_images == len(nifti_ids) and unlabelled.metrics is None
    assert not (tmp_path / "new" / "metrics.json").exists()
    assert sorted(p.name for p in (tmp_path / "new" / "maps").glob("*.nii.gz")) == sorted(f"{v}.nii.gz" for v in nifti_ids[:2])
    # some labels blank: metrics over the labelled volumes, the blank ones counted
    part = tmp_path / "part.csv"
    with open(part, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for k, vid in enumerate(test_ids):
            w.writerow([str(paths[vid]), vid, "" if k % 4 == 0 else "lesion" if vid in spheres else "clear"])
    some = run_predict_volume(tmp_path / "run", part, out_dir=tmp_path / "part", progress=False)
    n_blank = len(range(0, len(test_ids), 4))
    saved = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert saved["n_volumes_unlabelled"] == n_blank and saved["n_volumes_labelled"] == len(test_ids) - n_blank
    assert some.metrics["n"] == len(test_ids) - n_blank and some.metrics["auc"] > 0.85
    # a DICOM series folder or a NIfTI file given directly
    for vid in (next(v for v in test_ids if paths[v].is_dir()), next(v for v in test_ids if paths[v].is_file())):
        one = run_predict_volume(tmp_path / "run", paths[vid], out_dir=tmp_path / f"one_{vid}", maps=True, progress=False)
        assert one.n_images == 1 and not one.failed
        assert len(list((tmp_path / f"one_{vid}" / "maps").glob("*.nii.gz"))) == 1


def test_slice_mil_attention_peaks_at_the_lesion_slices_and_mean_pooling_trains(tmp_path: Path) -> None:
    from wsi_mil.commands.predict_volume import run_predict_volume
    from wsi_mil.commands.train_volume import run_train_volume

    manifest, spheres, paths = _cohort(tmp_path, 120)
    common = {"mode": "slices", "volume_size": 28, "slice_size": 32, "window": "-1000,400", "folds": 1,
              "test_fraction": 0.25, "epochs": 25, "lr": 2e-3, "bootstrap": 50,
              "feature_cache": str(tmp_path / "cache")}
    att = run_train_volume(manifest, out_dir=tmp_path / "att", config=VolumeTrainConfig(mil_model="abmil", **common),
                           progress=False)
    mean = run_train_volume(manifest, out_dir=tmp_path / "mean", config=VolumeTrainConfig(mil_model="mean", **common),
                            progress=False)
    assert att.metrics["ensemble_test"]["auc"] > 0.8 and mean.metrics["ensemble_test"]["auc"] > 0.7
    test_pos = [v for v in json.loads((tmp_path / "att" / "splits.json").read_text())["test"] if v in spheres]
    sub = tmp_path / "pos.csv"
    with open(sub, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "image_id", "label"])
        for vid in test_pos:
            w.writerow([str(paths[vid]), vid, "lesion"])
    run_predict_volume(tmp_path / "att", sub, out_dir=tmp_path / "pred", maps=True, progress=False)
    with open(tmp_path / "pred" / "attention.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    hits = []
    for vid in test_pos:
        a = np.asarray([float(r["attention"]) for r in rows if r["volume_id"] == vid])
        assert len(a) == 28 and a.sum() == pytest.approx(1, abs=1e-3)
        # slices run inferior -> superior; the sphere's depth axis: DICOM slices (d) are
        # stored along +S; the NIfTI copies store d along their third axis, also +S
        hits.append(abs(int(np.argmax(a)) - spheres[vid]["d"]) <= spheres[vid]["radius"] + 1)
    assert np.mean(hits) >= 0.7, hits


def test_unreadable_series_in_the_manifest_stop_the_run_naming_it(tmp_path: Path) -> None:
    import shutil

    from wsi_mil.commands.train_volume import run_train_volume
    from wsi_mil.errors import MissingDataError

    manifest, _, paths = _cohort(tmp_path, 12)
    broken = next(p for p in paths.values() if p.is_dir())
    shutil.rmtree(broken)
    write_dicom_series(broken, np.zeros((28, 28, 28)) - 1000, skip=(10,))  # a slice missing from the series
    with pytest.raises(MissingDataError, match=rf"{broken.name}.*slice is missing"):
        run_train_volume(manifest, out_dir=tmp_path / "run", config=VolumeTrainConfig(epochs=1, min_class_slides=2),
                         progress=False)


def test_bad_volume_options_exit_2_before_anything_is_written(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import WSI_MIL

    npz = shared("vol3d", "adrenalmnist3d.npz")
    for bad, message in ((["--window", "400,-1000"], "LOW must be below HIGH"), (["--spacing", "1,2"], "--spacing"),
                         (["--intensity", "window"], "needs --window")):
        out = tmp_path / "out"
        res = subprocess.run(WSI_MIL + ["train-volume", str(npz), "--out", str(out), *bad], capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 2 and message in res.stderr and not out.exists(), (bad, res.stderr[-500:])
