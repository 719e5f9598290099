"""3D volumes (CT, MRI) for ``wsi-mil train-volume``: readers, canonical orientation,
spacing-aware resampling, intensity windowing, and the way back to the source grid.

Inputs:

* **NPZ** in the MedMNIST 3D layout (``train_images`` (N, D, H, W), ``train_labels`` ...;
  official splits kept). MedMNIST stores no geometry: 1 mm isotropic voxels and the
  identity orientation are assumed (recorded as such).
* **NIfTI** (``.nii`` / ``.nii.gz``) via nibabel: the header's scaling applied, the
  affine and voxel spacing honoured.
* **DICOM series**: a folder holding one series. Slices are sorted by their position
  along the slice normal (ImagePositionPatient projected on the cross product of the
  ImageOrientationPatient rows), rescaled to modality units (HU for CT) with
  RescaleSlope / RescaleIntercept. A folder with several series, slices of different
  orientation or size, duplicate positions, uneven gaps (a missing slice), multi-frame,
  colour or compressed data that cannot be decoded are refused by name.

Every volume is turned to the canonical frame (RAS+, nibabel's closest canonical) and
held as (D, H, W): D runs inferior → superior, H posterior → anterior, W from the
patient's left to right; axial slices lie along D. Preparation for a network
(:func:`prepare_volume`): optional resampling to ``spacing`` mm (trilinear), padding to a
cube with the volume's minimum (aspect kept), resizing to ``size``³, and intensities
mapped to [0, 1] by a window in modality units (``--window LOW,HIGH``, e.g. HU
-1000,400), per-volume z-score (MRI: mean ± 3 sd over the non-zero voxels to [0, 1]),
per-volume min-max (0.5th-99.5th percentile), or ``unit`` (values already in [0, 1] as
MedMNIST's uint8 / 255). :class:`Geometry` records all of it and maps a map computed on
the network grid back onto the source voxels (:meth:`Geometry.to_source`), so a NIfTI
heatmap has the input's shape and affine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from wsi_mil.data.images import ImageEntry, ImageReadError, _scale_integer
from wsi_mil.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
INTENSITY_MODES = ("auto", "window", "zscore", "minmax", "unit")
#: slice gaps that differ from the mean spacing by more than this share are warned about
#: (more than 10 % from the median is refused: a missing slice)
UNEVEN_GAP_WARN = 0.01


class VolumeReadError(ImageReadError):
    """A volume that cannot be read, or that is refused (mixed series, missing slices ...)."""


@dataclass
class Volume:
    """A volume in the canonical (D, H, W) frame, with what is needed to go back."""

    data: npt.NDArray[np.float32]  # (D, H, W), modality units (HU for CT) or as stored
    spacing: tuple[float, float, float]  # mm along D, H, W
    source_affine: npt.NDArray[np.float64]  # 4 x 4 voxel -> RAS mm of the source array
    source_shape: tuple[int, int, int]
    ornt: npt.NDArray[np.float64]  # nibabel orientation: source array axes -> RAS
    kind: str  # "npz", "nifti" or "dicom"
    modality: str = ""  # DICOM Modality (CT, MR ...) when known
    notes: list[str] = field(default_factory=list)

    def to_source(self, canonical: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """An array on the canonical (D, H, W) grid, put back in the source array's order."""
        from nibabel import orientations as no

        ras = np.ascontiguousarray(np.asarray(canonical).transpose(2, 1, 0))  # (R, A, S)
        back = no.ornt_transform(no.axcodes2ornt(("R", "A", "S")), self.ornt)
        return np.ascontiguousarray(no.apply_orientation(ras, back), dtype=np.float32)


def _canonical(data: npt.NDArray[Any], affine: npt.NDArray[np.float64], kind: str, modality: str = "") -> Volume:
    from nibabel import orientations as no

    if data.ndim != 3:
        raise VolumeReadError(f"a {data.ndim}-D array; a volume is 3-D (4-D series and multi-channel volumes are "
                              "not supported: split them into single volumes)")
    ornt = no.io_orientation(affine)
    ras = no.apply_orientation(np.asarray(data, np.float32), ornt)
    ras_affine = affine @ no.inv_ornt_aff(ornt, data.shape)
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))  # mm along R, A, S
    vol = np.ascontiguousarray(ras.transpose(2, 1, 0), dtype=np.float32)  # (S, A, R) = (D, H, W)
    if not np.isfinite(vol).all():
        raise VolumeReadError(f"{int((~np.isfinite(vol)).sum())} voxel(s) are NaN or infinite")
    return Volume(vol, (float(zooms[2]), float(zooms[1]), float(zooms[0])), np.asarray(affine, np.float64),
                  tuple(int(s) for s in data.shape), ornt, kind, modality)  # type: ignore[arg-type]


#: the most voxels a volume may hold (2 GiB as float32): a whole-body CT at 512 x 512 x 2,000
#: fits; a header claiming more is refused before anything is allocated
MAX_VOXELS = 2 ** 29
#: deflate cannot shrink data by more than about 1032:1, so a .nii.gz smaller than its
#: claimed voxels / 1032 cannot hold them
_MAX_DEFLATE_RATIO = 1032


def check_nifti_header(path: Path, img: Any) -> None:
    """Refuse a NIfTI whose header claims more than the file holds, or more than
    :data:`MAX_VOXELS`, before any voxel is read (a 2 KB file claiming 2048 x 2048 x 1024
    int16 would allocate 8.9 GB first)."""
    header = img.header
    shape = tuple(int(v) for v in header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    claimed = voxels * itemsize
    described = "x".join(map(str, shape))
    if voxels > MAX_VOXELS:
        raise VolumeReadError(f"{path}: its header claims {described} = {voxels:,} voxels, more than the {MAX_VOXELS:,} "
                              "a volume may hold here; crop or resample it (e.g. to 1-2 mm) first")
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if claimed > size * _MAX_DEFLATE_RATIO:
            raise VolumeReadError(f"{path}: its header claims {described} voxels of {header.get_data_dtype()} "
                                  f"({claimed / 1e6:,.1f} MB), which a {size:,}-byte gzip file cannot hold: the header "
                                  "is wrong or the file is truncated")
    else:
        offset = int(header.get_data_offset()) if hasattr(header, "get_data_offset") else 0
        if offset + claimed > size:
            raise VolumeReadError(f"{path}: its header claims {described} voxels of {header.get_data_dtype()} "
                                  f"({claimed:,} bytes after offset {offset}), but the file has {size:,} bytes: the "
                                  "header is wrong or the file is truncated")


def read_nifti(path: Path) -> Volume:
    try:
        import nibabel as nib

        # load's declared type is the FileBasedImage base; what it gives here is a spatial
        # image (NIfTI), and anything else fails get_fdata / affine below, reported
        img = cast("nib.spatialimages.SpatialImage", nib.load(str(path)))
    except Exception as exc:
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    check_nifti_header(path, img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, np.float64)
    except Exception as exc:
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2 or (data.ndim == 3 and 1 in data.shape):
        raise VolumeReadError(f"{path}: a single slice ({'x'.join(map(str, data.shape))}), not a volume: a 2D image "
                              "saved as NIfTI would be padded into a cube and trained as 3D. Give 2D images to "
                              "train-image (PNG / DICOM), or a volume of several slices here")
    try:
        return _canonical(data, affine, "nifti")
    except VolumeReadError as exc:
        raise VolumeReadError(f"{path}: {exc}") from exc


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_dicom_series(folder: Path) -> Volume:
    """One DICOM series (a folder) as a volume in modality units; see the module docstring
    for what is refused."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = _dicom_files(folder)
    headers = []
    for f in files:
        try:
            headers.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            continue  # not DICOM (a README, a thumbnail): ignored
    if not headers:
        raise VolumeReadError(f"{folder}: no DICOM files")
    series: dict[str, list[Any]] = {}
    for f, ds in headers:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "?")), []).append((f, ds))
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({len(v)} file(s), {getattr(v[0][1], 'SeriesDescription', '') or 'no description'})"
                            for uid, v in series.items())
        raise VolumeReadError(f"{folder}: holds {len(series)} DICOM series ({listing}); a volume is one series: "
                              "put each series in its own folder")
    items = next(iter(series.values()))
    first = items[0][1]
    notes: list[str] = []
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise VolumeReadError(f"{folder}: multi-frame (enhanced) DICOM is not supported; export the series as "
                              "single-frame slices")
    photometric = str(getattr(first, "PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        raise VolumeReadError(f"{folder}: PhotometricInterpretation {photometric}; volumes must be greyscale")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = [f.name for f, ds in items if key not in ds]
        if missing:
            raise VolumeReadError(f"{folder}: {len(missing)} slice(s) have no {key} ({', '.join(missing[:3])}); the "
                                  "slices cannot be placed")
    iop = np.asarray([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
    if np.abs(iop - iop[0]).max() > 1e-4:
        raise VolumeReadError(f"{folder}: the slices have different orientations (ImageOrientationPatient); a "
                              "volume needs parallel slices: this folder mixes acquisitions")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(shapes) > 1:
        raise VolumeReadError(f"{folder}: slices of different sizes {sorted(shapes)}; not one volume")
    row_cos, col_cos = iop[0][:3], iop[0][3:]
    normal = np.cross(row_cos, col_cos)
    pos = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    along = pos @ normal
    order = np.argsort(along)
    along = along[order]
    if len(items) > 1:
        gaps = np.diff(along)
        if (gaps < 1e-3).any():
            raise VolumeReadError(f"{folder}: {int((gaps < 1e-3).sum())} duplicate slice position(s); the folder "
                                  "holds repeated slices or several volumes of one series")
        median = float(np.median(gaps))
        if np.abs(gaps - median).max() > 0.1 * median + 1e-3:
            raise VolumeReadError(f"{folder}: uneven slice gaps ({gaps.min():.3g}-{gaps.max():.3g} mm, median "
                                  f"{median:.3g}): a slice is missing, or the series mixes spacings")
        # the true extent over the slices (as SimpleITK does), not the median gap: a series
        # whose gaps vary a little keeps its length in mm
        step = float((along[-1] - along[0]) / (len(along) - 1))
        if np.abs(gaps - step).max() > UNEVEN_GAP_WARN * step:
            uneven = (f"slice gaps vary from {gaps.min():.4g} to {gaps.max():.4g} mm (mean {step:.4g}); the volume is "
                      "placed at the mean spacing over its true extent, so slices sit up to "
                      f"{np.abs(np.cumsum(gaps) - step * np.arange(1, len(gaps) + 1)).max():.3g} mm from where a "
                      "regular grid puts them")
            logger.warning("%s: %s", folder, uneven)
            notes.append(uneven)
    else:
        step = float(getattr(first, "SliceThickness", 1.0) or 1.0)
    from pydicom.pixels import pixel_array

    slices = []
    for k in order:
        f = items[k][0]
        try:
            ds = pydicom.dcmread(f)
            raw = pixel_array(ds).astype(np.float32)
        except Exception as exc:
            raise VolumeReadError(f"{f}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        slices.append(raw * slope + intercept)
    data = np.stack(slices)  # (k, r, c)
    dr, dc = (float(v) for v in first.PixelSpacing)  # row spacing, column spacing
    lps = np.eye(4)
    lps[:3, 0] = normal * step  # index k: along the slice normal
    lps[:3, 1] = col_cos * dr  # index r: down the rows
    lps[:3, 2] = row_cos * dc  # index c: along a row
    lps[:3, 3] = pos[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> RAS
    try:
        vol = _canonical(data, affine, "dicom", str(getattr(first, "Modality", "")))
    except VolumeReadError as exc:
        raise VolumeReadError(f"{folder}: {exc}") from exc
    vol.notes.extend(notes)
    return vol


def read_volume(path: str | Path) -> Volume:
    """A NIfTI file or a DICOM series folder (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p)
    if p.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(p)
    if not p.exists():
        raise VolumeReadError(f"{p}: no such file or folder")
    raise VolumeReadError(f"{p}: not a volume; give a NIfTI file (.nii, .nii.gz), a folder holding one DICOM series, "
                          "or a MedMNIST 3D .npz as the source")


def array_volume(data: npt.NDArray[Any]) -> Volume:
    """A (D, H, W) array without geometry (MedMNIST): 1 mm voxels, identity orientation."""
    a = _scale_integer(data) if data.dtype != np.float32 else np.asarray(data, np.float32)
    affine = np.eye(4)[[2, 1, 0, 3]]  # array (D, H, W) = (S, A, R): index 0 is z
    vol = _canonical(a, affine, "npz")
    vol.notes.append("no geometry stored: 1 mm isotropic voxels and the identity orientation assumed")
    return vol


# -- preparation for a network --------------------------------------------------------------------
@dataclass(frozen=True)
class VolumePrep:
    """How a volume becomes a network input (recorded in the run's provenance)."""

    size: int = 64
    spacing: tuple[float, float, float] | None = None  # mm (D, H, W); None: keep the voxels
    intensity: str = "auto"
    window: tuple[float, float] | None = None  # LOW, HIGH in modality units

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"--intensity {self.intensity!r}: choose one of {INTENSITY_MODES}")
        if self.intensity == "window" and self.window is None:
            raise ConfigError("--intensity window needs --window LOW,HIGH (e.g. -1000,400 HU)")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ConfigError(f"--window {self.window[0]:g},{self.window[1]:g}: LOW must be below HIGH (e.g. -1000,400)")
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ConfigError("--spacing must be positive (mm)")
        if not 8 <= self.size <= 512:
            raise ConfigError("--volume-size must be in 8..512")

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "spacing": list(self.spacing) if self.spacing else None,
                "intensity": self.intensity, "window": list(self.window) if self.window else None}


@dataclass
class Geometry:
    """From the canonical grid to the network grid and back."""

    canonical_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    cube: int
    offset: tuple[int, int, int]  # where the resampled volume sits in the padded cube
    size: int

    def to_canonical(self, m: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """A (size³) map on the network grid, on the canonical grid (trilinear)."""
        cube = _resize(np.asarray(m, np.float32), (self.cube,) * 3)
        o, s = self.offset, self.resampled_shape
        inner = cube[o[0]:o[0] + s[0], o[1]:o[1] + s[1], o[2]:o[2] + s[2]]
        return _resize(inner, self.canonical_shape)


def _resize(a: npt.NDArray[np.float32], shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    if tuple(a.shape) == tuple(shape):
        return np.asarray(a, np.float32)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(int(v) for v in shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _intensity(a: npt.NDArray[np.float32], prep: VolumePrep, vol: Volume) -> npt.NDArray[np.float32]:
    mode = prep.intensity
    if mode == "auto":
        mode = "window" if prep.window else "unit" if vol.kind == "npz" else "minmax"
    if mode == "window":
        lo, hi = prep.window  # type: ignore[misc]
        return np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)
    if mode == "zscore":
        fg = a[a != 0] if (a != 0).sum() > 0.01 * a.size else a.ravel()
        mu, sd = float(fg.mean()), float(fg.std())
        if sd <= 0:
            raise VolumeReadError("a constant volume: z-score normalisation is undefined")
        return np.clip(((a - mu) / sd + 3) / 6, 0, 1).astype(np.float32)
    if mode == "minmax":
        lo, hi = np.percentile(a, [0.5, 99.5])
        if hi <= lo:
            raise VolumeReadError("a constant volume: min-max normalisation is undefined")
        return np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)
    if a.min() < -1e-6 or a.max() > 1 + 1e-6:
        raise VolumeReadError(f"--intensity unit expects values in [0, 1], found {a.min():g}..{a.max():g}; choose "
                              "window (CT in HU), zscore (MRI) or minmax")
    return np.asarray(a, np.float32)


def prepare_volume(vol: Volume, prep: VolumePrep) -> tuple[npt.NDArray[np.float32], Geometry]:
    """The network input (size³, [0, 1]) and the geometry that leads back (module docstring)."""
    a = _intensity(vol.data, prep, vol)
    if prep.spacing is not None:
        target = tuple(max(1, round(n * s / t)) for n, s, t in zip(a.shape, vol.spacing, prep.spacing, strict=True))
        a = _resize(a, target)
    shape = tuple(int(v) for v in a.shape)
    cube = max(shape)
    offset = tuple((cube - n) // 2 for n in shape)
    padded = np.full((cube,) * 3, float(a.min()), np.float32)
    padded[offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1], offset[2]:offset[2] + shape[2]] = a
    out = np.clip(_resize(padded, (prep.size,) * 3), 0, 1)
    return out.astype(np.float32), Geometry(vol.data.shape, shape, cube, offset, prep.size)  # type: ignore[arg-type]


# -- manifests ------------------------------------------------------------------------------------
def npz_volume_entries(path: str | Path) -> list[ImageEntry]:
    """A MedMNIST 3D NPZ as entries whose ``pixels`` are (D, H, W) arrays (official splits)."""
    from wsi_mil.data.images import medmnist_entries

    def prepare(split: str, vols: np.ndarray) -> np.ndarray:
        if vols.ndim != 4:
            raise ManifestError(f"{path}: {split}_images has shape {vols.shape}; expected (N, D, H, W) volumes "
                                "(a 2D MedMNIST set goes to train-image)")
        return vols

    return medmnist_entries(path, prepare, unit="volumes",
                            layout="the MedMNIST 3D layout (train_images (N, D, H, W), train_labels, val_images, ...)")


def load_volume(entry: ImageEntry) -> Volume:
    """The entry's volume: its in-memory array (NPZ) or its file / series folder."""
    if entry.pixels is not None:
        return array_volume(entry.pixels)
    if entry.path is None:
        raise VolumeReadError(f"{entry.slide_id}: no volume file")
    return read_volume(entry.path)
