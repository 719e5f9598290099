"""Volume readers on real CT (AdrenalMNIST3D) written as the files users bring: NIfTI with
non-canonical affines and DICOM series in shuffled file order; canonical orientation, the
way back to the source grid, spacing-aware preparation, windowing, and the series the
reader must refuse by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.data.volumes import (
    VolumePrep,
    VolumeReadError,
    npz_volume_entries,
    prepare_volume,
    read_volume,
)
from wsi_mil.errors import ConfigError
from wsi_mil.synth.volumes import write_dicom_series, write_nifti


def _real(i: int = 0) -> tuple[np.ndarray, int]:
    d = np.load(shared("vol3d", "adrenalmnist3d.npz"))
    return d["train_images"][i], int(d["train_labels"][i, 0])


def _hu(v: np.ndarray) -> np.ndarray:
    """uint8 MedMNIST intensities as plausible HU (-1000 .. 1040)."""
    return v.astype(np.float64) * 8.0 - 1000.0


def test_medmnist_3d_npz_keeps_official_splits() -> None:
    entries = npz_volume_entries(shared("vol3d", "adrenalmnist3d.npz"))
    counts = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
    assert counts == {"train": 1188, "val": 98, "test": 298}
    assert entries[0].pixels.shape == (28, 28, 28)
    assert sum(e.labels["label"] == "1" for e in entries if e.split == "train") == 259


def test_nifti_any_orientation_reads_to_one_canonical_volume_and_back(tmp_path: Path) -> None:
    vol, _ = _real(3)
    a = _hu(vol)[:, :, :20]  # not a cube: axes are told apart by their lengths
    ras = np.diag([0.7, 0.8, 2.5, 1.0])  # array axes = R, A, S with 0.7 / 0.8 / 2.5 mm voxels
    ref = read_volume(write_nifti(tmp_path / "ras.nii.gz", a, ras))
    assert ref.spacing == pytest.approx((2.5, 0.8, 0.7)) and ref.data.shape == (20, 28, 28)
    np.testing.assert_array_equal(ref.data, a.transpose(2, 1, 0).astype(np.float32))
    # the same scan stored as LPI with the axes permuted (S, L, P order): same canonical volume
    perm = a.transpose(2, 0, 1)[::-1, ::-1, ::-1]  # (S reversed = I, R reversed = L, A reversed = P)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = -2.5, -0.7, -0.8, 1.0
    affine[:3, 3] = [0.7 * 27, 0.8 * 27, 2.5 * 19]
    other = read_volume(write_nifti(tmp_path / "lpi.nii", perm, affine))
    np.testing.assert_array_equal(other.data, ref.data)
    assert other.spacing == pytest.approx(ref.spacing)
    back = other.to_source(other.data)
    assert back.shape == perm.shape and np.array_equal(back, perm.astype(np.float32))


def test_dicom_series_sorted_by_position_rescaled_to_hu_and_equal_to_nifti(tmp_path: Path) -> None:
    vol, _ = _real(5)
    hu = _hu(vol)
    folder, affine = write_dicom_series(tmp_path / "series", hu, spacing=(2.5, 0.8, 0.7), shuffle=1)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 28
    v = read_volume(folder)
    assert v.kind == "dicom" and v.modality == "CT"
    assert v.spacing == pytest.approx((2.5, 0.8, 0.7))
    nifti = read_volume(write_nifti(tmp_path / "same.nii.gz", hu, affine))
    np.testing.assert_allclose(v.data, nifti.data)
    assert v.data.min() == pytest.approx(hu.min()) and v.data.max() == pytest.approx(hu.max())  # HU, not stored values
    # the heatmap's way back lands on the DICOM (k, r, c) array
    assert np.array_equal(v.to_source(v.data), hu.astype(np.float32))


def test_bad_series_are_refused_by_name(tmp_path: Path) -> None:
    vol, _ = _real(7)
    hu = _hu(vol)
    write_dicom_series(tmp_path / "mixed", hu[:10], series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "mixed", hu[10:20], series_uid="1.2.3.2", origin=(0, 0, 200), prefix="B")
    with pytest.raises(VolumeReadError, match=r"2 DICOM series.*1\.2\.3\.1.*own folder"):
        read_volume(tmp_path / "mixed")
    write_dicom_series(tmp_path / "gap", hu, skip=(13,))
    with pytest.raises(VolumeReadError, match="slice is missing"):
        read_volume(tmp_path / "gap")
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(VolumeReadError, match="not a volume"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(VolumeReadError, match="no DICOM files"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "README").write_text("nothing here")
        read_volume(tmp_path / "empty")
    good = write_nifti(tmp_path / "good.nii.gz", hu, np.eye(4))
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a truncated download
    (tmp_path / "junk.nii").write_bytes(b"not a nifti header" * 40)
    for name in ("cut.nii.gz", "junk.nii"):
        with pytest.raises(VolumeReadError, match=f"{name}: not a readable NIfTI"):
            read_volume(tmp_path / name)
    nan = hu.copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(VolumeReadError, match="NaN"):
        read_volume(write_nifti(tmp_path / "nan.nii.gz", nan.astype(np.float32), np.eye(4)))


def test_preparation_resamples_to_spacing_windows_hu_and_maps_back(tmp_path: Path) -> None:
    vol, _ = _real(9)
    hu = _hu(vol)
    folder, _ = write_dicom_series(tmp_path / "s", hu, spacing=(2.5, 0.8, 0.7))
    v = read_volume(folder)
    prep = VolumePrep(size=32, spacing=(1.0, 1.0, 1.0), intensity="window", window=(-1000.0, 400.0))
    x, geo = prepare_volume(v, prep)
    assert x.shape == (32, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert geo.resampled_shape == (70, 22, 20)  # 28 x 2.5 mm, 28 x 0.8, 28 x 0.7 at 1 mm
    # HU above the window's top are 1, at its bottom 0
    assert (x == 1).any() and (x == 0).any()
    # a map on the network grid goes back to the source array's shape
    back = v.to_source(geo.to_canonical(x))
    assert back.shape == hu.shape
    # without resampling the round trip gives back the windowed source voxel for voxel; with
    # it (in-plane 0.8 / 0.7 mm -> 1 mm loses detail) still the source, not a mirrored or
    # transposed one
    src = np.clip((hu + 1000) / 1400, 0, 1)
    x, geo = prepare_volume(v, VolumePrep(size=28, intensity="window", window=(-1000.0, 400.0)))
    np.testing.assert_allclose(v.to_source(geo.to_canonical(x)), src, atol=1e-5)
    x, geo = prepare_volume(v, VolumePrep(size=70, spacing=(1.0, 1.0, 1.0), intensity="window", window=(-1000.0, 400.0)))
    back = v.to_source(geo.to_canonical(x))
    r = np.corrcoef(back.ravel(), src.ravel())[0, 1]
    assert r > 0.9, r
    for wrong in (src[:, :, ::-1], src[::-1], src.transpose(0, 2, 1)):
        assert np.corrcoef(back.ravel(), wrong.ravel())[0, 1] < r - 0.1
    with pytest.raises(ConfigError, match="LOW must be below HIGH"):
        VolumePrep(window=(400.0, -1000.0))
    with pytest.raises(ConfigError, match="needs --window"):
        VolumePrep(intensity="window")
    with pytest.raises(VolumeReadError, match="expects values in"):
        prepare_volume(v, VolumePrep(intensity="unit"))
