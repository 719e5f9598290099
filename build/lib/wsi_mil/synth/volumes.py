"""Real volumes written as the files users bring: NIfTI with a chosen affine, and DICOM CT
series (one file per slice, HU through RescaleSlope / RescaleIntercept, positions and
orientation in the patient frame). Used by the tests, the volume benchmark and the demo to
feed the readers inputs they did not make themselves, with known geometry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def write_nifti(path: Path, data: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, np.float64)), str(path))
    return path


def write_dicom_series(folder: Path, hu: npt.NDArray[Any], *, spacing: tuple[float, float, float] = (2.5, 0.8, 0.7),
                       row_cos: tuple[float, float, float] = (1.0, 0.0, 0.0),
                       col_cos: tuple[float, float, float] = (0.0, 1.0, 0.0),
                       origin: tuple[float, float, float] = (-100.0, -120.0, 40.0), series_uid: str | None = None,
                       intercept: float = -1024.0, shuffle: int | None = 0, skip: tuple[int, ...] = (),
                       prefix: str = "IM"
                       ) -> tuple[Path, npt.NDArray[np.float64]]:
    """``hu`` (k, r, c) as one CT series, slice k at ``origin + k * spacing[0] * normal``
    (LPS mm), rows ``spacing[1]`` and columns ``spacing[2]`` mm apart; files named in a
    shuffled order (``shuffle`` seed; None keeps the order); slices in ``skip`` left out.
    Returns the folder and the RAS affine of the (k, r, c) array."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rc, cc = np.asarray(row_cos, float), np.asarray(col_cos, float)
    normal = np.cross(rc, cc)
    uid = series_uid or generate_uid()
    study = generate_uid()
    stored = np.round(np.asarray(hu, np.float64) - intercept).astype(np.int16)
    names = np.arange(len(hu)) if shuffle is None else np.random.default_rng(shuffle).permutation(len(hu))
    for k in range(len(hu)):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{int(names[k]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "anon", study, uid
        ds.SeriesDescription = "synthetic series from a real volume"
        ds.InstanceNumber = int(names[k]) + 1
        ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.ImageOrientationPatient = [float(v) for v in (*rc, *cc)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[0] * normal]
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, float(intercept)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = normal * spacing[0], cc * spacing[1], rc * spacing[2], origin
    return folder, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def plant_sphere(vol: npt.NDArray[np.float32], rng: np.random.Generator, *, radius: tuple[float, float] = (2.5, 4.0),
                 level: float = 0.9, margin: int = 5) -> tuple[npt.NDArray[np.float32], dict[str, float]]:
    """A soft-edged hyperdense sphere (a synthetic lesion: the voxels take at least
    ``level``, textured ±5 %) in a volume in [0, 1], centred on a random voxel at least
    ``margin`` from the border; returns the new volume and the sphere (centre d, h, w and
    radius, in voxels of the array)."""
    d, h, w = vol.shape
    r = float(rng.uniform(*radius))
    c = [float(rng.uniform(margin, n - 1 - margin)) for n in (d, h, w)]
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    dist = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    blob = np.clip(r + 0.5 - dist, 0, 1)  # one-voxel soft edge
    texture = 1 + 0.05 * rng.standard_normal(vol.shape)
    out = np.clip(np.maximum(vol, level * blob * texture), 0, 1).astype(np.float32)
    return out, {"d": c[0], "h": c[1], "w": c[2], "radius": r}
