"""Volume inputs that used to be read as something else without a word: a NIfTI whose
header lies about its size (allocated before failing), a single-slice NIfTI (a radiograph
padded into a cube), and DICOM slice gaps that vary a little (placed at the median gap)."""

from __future__ import annotations

import gzip
import resource
import time
from pathlib import Path

import numpy as np
import pytest

from tests.volumes.test_volume_readers import _hu, _real
from wsi_mil.data import volumes
from wsi_mil.data.volumes import VolumeReadError, read_volume
from wsi_mil.synth.volumes import write_dicom_series, write_nifti


def _lying_nifti(path: Path, shape: tuple[int, ...], dtype: str = "int16") -> Path:
    """A real NIfTI header (nibabel's) claiming ``shape``, followed by 2 KB of voxels."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0\0\0\0" + np.arange(1024, dtype=np.int16).tobytes()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("name", ["liar.nii", "liar.nii.gz"])
@pytest.mark.parametrize(("shape", "expected"), [
    ((1024, 1024, 256), r"its header claims 1024x1024x256 voxels of int16 .*(cannot hold|but the file has [\d,]+ bytes)"),
    ((2048, 2048, 1024), r"its header claims 2048x2048x1024 = 4,294,967,296 voxels, more than"),  # the file
])
def test_a_header_claiming_more_than_the_file_holds_is_refused_before_reading(tmp_path: Path, name: str,
                                                                               shape: tuple[int, ...],
                                                                               expected: str) -> None:
    path = _lying_nifti(tmp_path / name, shape)
    assert path.stat().st_size < 4096
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(VolumeReadError, match=rf"{name}: {expected}"):
        read_volume(path)
    assert time.perf_counter() - t0 < 2  # nothing of 0.5-8.9 GB was allocated or zero-filled
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200


def test_a_header_claiming_more_voxels_than_the_cap_is_refused(tmp_path: Path) -> None:
    side = int(round(getattr(volumes, "MAX_VOXELS", 2 ** 29) ** (1 / 3))) + 8
    with pytest.raises(VolumeReadError, match=r"more than the 536,870,912 a volume may hold here; crop or resample"):
        read_volume(_lying_nifti(tmp_path / "huge.nii", (side, side, side), "uint8"))


def test_a_real_volume_still_reads_through_the_checks(tmp_path: Path) -> None:
    vol, _ = _real(2)
    for name in ("ok.nii", "ok.nii.gz"):
        v = read_volume(write_nifti(tmp_path / name, _hu(vol), np.eye(4)))
        assert v.data.shape == (28, 28, 28)


@pytest.mark.parametrize("shape", [(28, 28, 1), (28, 28)])
def test_a_single_slice_nifti_is_refused_as_a_2d_image(tmp_path: Path, shape: tuple[int, ...]) -> None:
    vol, _ = _real(4)
    img = _hu(vol)[:, :, :1].reshape(shape)
    with pytest.raises(VolumeReadError, match=r"a single slice .* not a volume: .*train-image"):
        read_volume(write_nifti(tmp_path / "xray.nii.gz", img, np.eye(4)))


def test_slightly_uneven_dicom_gaps_use_the_true_extent_and_are_warned(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    import pydicom

    vol, _ = _real(6)
    folder, _ = write_dicom_series(tmp_path / "series", _hu(vol)[:12], spacing=(2.5, 0.8, 0.7), shuffle=None)
    # gaps of 2.5 mm +- up to 5 % (under the 10 % that means a missing slice): a real export's rounding drift
    gaps = 2.5 * (1 + np.array([0.05, 0.04, 0.05, 0.03, 0.05, 0.04, 0.05, 0.02, 0.05, 0.04, 0.05]))
    z = np.concatenate([[40.0], 40.0 + np.cumsum(gaps)])
    for k, f in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [-100.0, -120.0, float(z[k])]
        ds.save_as(f)
    v = read_volume(folder)
    true_step = (z[-1] - z[0]) / 11  # what SimpleITK uses: the extent over the slices
    assert v.spacing[0] == pytest.approx(true_step, rel=1e-6)
    assert v.spacing[0] != pytest.approx(float(np.median(gaps)), rel=1e-3)  # not the median gap
    assert any("slice gaps vary" in n for n in v.notes)
    assert "slice gaps vary from" in caplog.text


def test_intensity_auto_is_resolved_once_at_training_and_recorded(tmp_path: Path) -> None:
    """Before, a model trained on a MedMNIST .npz with --intensity auto recorded "auto",
    which predict-volume then read as minmax for a NIfTI: another mapping than training's."""
    from wsi_mil.commands.train_volume import prep_of, resolve_intensity
    from wsi_mil.config import VolumeTrainConfig

    auto = VolumeTrainConfig()
    assert resolve_intensity(auto, Path("adrenal.npz")).intensity == "unit"
    assert resolve_intensity(auto, Path("cohort.csv")).intensity == "minmax"
    assert resolve_intensity(VolumeTrainConfig(window="-1000,400"), Path("a.npz")).intensity == "window"
    assert resolve_intensity(VolumeTrainConfig(intensity="zscore"), Path("a.npz")).intensity == "zscore"
    recorded = resolve_intensity(auto, Path("adrenal.npz")).prep().record()
    assert recorded["intensity"] == "unit"
    # what predict-volume rebuilds from the spec maps a NIfTI in HU the way training mapped the .npz: it says so
    from wsi_mil.data.volumes import prepare_volume

    vol, _ = _real(1)
    nifti = read_volume(write_nifti(tmp_path / "hu.nii.gz", _hu(vol), np.eye(4)))
    with pytest.raises(VolumeReadError, match="--intensity unit expects values in"):
        prepare_volume(nifti, prep_of({"prep": recorded}))


def test_a_volume_manifest_names_its_rows_by_its_volume_id_column(tmp_path: Path) -> None:
    """Per-patient folders each holding ``ct.nii.gz``, named by a ``volume_id`` column: the
    column was read as a covariate and the rows named by the file stem (all ``ct``: refused
    as duplicates; with other stems, outputs named after files instead of the user's ids)."""
    from wsi_mil.data.images import read_image_manifest
    from wsi_mil.errors import ManifestError

    vol = _hu(_real(1)[0])
    rows = ["path,volume_id,patient_id,label"]
    for i in range(3):
        write_nifti(tmp_path / f"patient{i}" / "ct.nii.gz", vol.astype(np.float32), np.eye(4))
        rows.append(f"patient{i}/ct.nii.gz,P{i}-CT-2019,p{i},{i % 2}")
    manifest = tmp_path / "volumes.csv"
    manifest.write_text("\n".join(rows) + "\n")
    entries, _ = read_image_manifest(manifest, labels=["label"], folders=True)
    assert [e.slide_id for e in entries] == ["P0-CT-2019", "P1-CT-2019", "P2-CT-2019"]
    assert all("volume_id" not in e.meta for e in entries)
    manifest.write_text("\n".join([rows[0] + ",image_id"] + [r + f",x{i}" for i, r in enumerate(rows[1:])]) + "\n")
    with pytest.raises(ManifestError, match=r"2 id columns \['image_id', 'volume_id'\].*keep one"):
        read_image_manifest(manifest, labels=["label"], folders=True)
    manifest.write_text("\n".join([rows[0], rows[1], rows[2].replace("P1-CT-2019", ""), rows[3]]) + "\n")
    with pytest.raises(ManifestError, match=r"line 3: empty volume_id"):  # not the file stem among the ids
        read_image_manifest(manifest, labels=["label"], folders=True)
    manifest.write_text("\n".join([rows[0].replace("volume_id", "Volume_ID")] + rows[1:]) + "\n")
    with pytest.raises(ManifestError, match=r"column 'Volume_ID' looks like an id column"):
        read_image_manifest(manifest, labels=["label"], folders=True)
