"""2D medical images (chest X-rays) for the shared trainer: readers, manifests, samples.

Every reader returns one **grey image as float32 in [0, 1]** (H, W), 0 = black:

* PNG / JPEG / TIFF, 8-bit: value / 255. 16-bit: value / 65535, except that an image whose
  maximum is at most 4095 is taken as a 12-bit detector image in a 16-bit container and
  divided by 4095. An RGB file is converted to grey (ITU-R 601 luma); the NIH
  ChestX-ray14 PNGs, for instance, are grey pixels stored as RGB.
* DICOM (pydicom): greyscale only (``MONOCHROME1`` / ``MONOCHROME2``, one sample per
  pixel, one frame); anything else (RGB, YBR, palette colour, multi-frame) is refused by
  name. The modality LUT (rescale slope / intercept) is applied first; then a window:
  ``window=(centre, width)`` when given (that window's range maps onto [0, 1]), else the
  file's VOI LUT or window if it has one (``use_voi=True``), applied once by pydicom, whose
  output range (:func:`voi_output_range`) maps onto [0, 1], else the image's own minimum
  to maximum; ``MONOCHROME1`` (bright = low values) is inverted so that bone is bright
  in every output.
* NPZ in the MedMNIST layout (``<split>_images`` uint8, ``<split>_labels``): value / 255.

A grey image is fed to an ImageNet backbone as the same channel three times, normalised
with the backbone's own mean and std (see ``wsi_mil.encoders.image``).

A manifest lists one image per row: ``path`` (relative to the manifest) and optionally
``image_id`` (or ``volume_id`` or ``slide_id``; default: the file name without suffix), ``patient_id``, ``split`` and label
columns (``label``, ``label_<name>``, or any columns named with ``--labels``). A blank
label cell means *not labelled*: that label of that image is masked out of the loss and
the metrics, never counted as negative. Other columns (age, sex, view ...) are kept as
metadata.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import ConfigError, ManifestError, WsiMilError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._\-]+")


class ImageReadError(WsiMilError):
    """An image file that cannot be read as a grey medical image (the message says why)."""


# -- readers -----------------------------------------------------------------------------
def _scale_integer(a: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype in (np.uint16, np.int32, np.int64, np.uint32, np.int16):
        hi = 4095.0 if a.max() <= 4095 else 65535.0
        return np.clip(a.astype(np.float32) / hi, 0.0, 1.0)
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float32), 0.0, 1.0)
    if a.dtype == bool:
        return a.astype(np.float32)
    raise ImageReadError(f"pixel type {a.dtype} is not supported")


def read_picture(path: Path) -> npt.NDArray[np.float32]:
    """PNG / JPEG / TIFF / BMP -> grey float32 in [0, 1] (see the module docstring). The
    EXIF orientation is honoured; a multi-page file is refused."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            pages = int(getattr(opened, "n_frames", 1) or 1)
            if pages > 1:
                raise ImageReadError(f"{path}: a multi-page file ({pages} pages); only its first would be read. Give one "
                                     "radiograph per file (split the pages, e.g. with tiffsplit), or a volume to "
                                     "train-volume")
            opened.load()
            # EXIF orientation (phone photos of films, some scanner exports): the picture as it is meant to be seen
            im = ImageOps.exif_transpose(opened) or opened
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im)
                if a.dtype == np.int32 and a.min() >= 0:
                    a = a.astype(np.uint32 if a.max() > 65535 else np.uint16)
                return _scale_integer(a)
            if im.mode == "F":
                return np.clip(np.asarray(im, np.float32), 0.0, 1.0)
            if im.mode in ("L", "1", "P", "LA"):
                return np.asarray(im.convert("L"), np.float32) / 255.0
            return np.asarray(im.convert("RGB").convert("L"), np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def read_dicom(path: Path, *, window: tuple[float, float] | None = None, use_voi: bool = True) -> npt.NDArray[np.float32]:
    """A greyscale DICOM radiograph -> float32 in [0, 1] (see the module docstring)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{path}: PhotometricInterpretation {photometric or 'missing'} is not supported; "
                             "only greyscale radiographs (MONOCHROME1 / MONOCHROME2) are read. Convert colour "
                             "images (RGB, YBR, palette) to greyscale first, or leave them out")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ImageReadError(f"{path}: {ds.SamplesPerPixel} samples per pixel; a greyscale image has 1")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(f"{path}: a multi-frame DICOM ({ds.NumberOfFrames} frames); give one radiograph per file "
                             "(volumes are read by the 3D road)")
    try:  # the function, not ds.pixel_array: other DICOM packages (wsidicom) replace pydicom's dataset hooks
        from pydicom.pixels import pixel_array

        raw = pixel_array(ds)
    except Exception as exc:
        raise ImageReadError(f"{path}: its pixels cannot be decoded ({type(exc).__name__}: {exc})") from exc
    modality = np.asarray(apply_modality_lut(raw, ds))
    if window is not None:
        centre, width = window
        if width <= 0:
            raise ConfigError(f"--window {centre},{width}: the width must be positive")
        values, lo, hi = modality.astype(np.float64), centre - width / 2.0, centre + width / 2.0
    elif use_voi and ("VOILUTSequence" in ds or "WindowCenter" in ds):
        # the VOI transform (a LUT or the window function, LINEAR / LINEAR_EXACT / SIGMOID) maps
        # the modality values onto its own output range, which is what becomes [0, 1]: the
        # window is applied once, by pydicom (windowing its output again was a double window)
        lo, hi = voi_output_range(ds)
        values = np.asarray(apply_voi_lut(_voi_input(modality, ds), ds, index=0), dtype=np.float64)
    else:
        values = modality.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
    out = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def voi_output_range(ds: Any) -> tuple[float, float]:
    """The range a DICOM file's VOI transform maps onto, as pydicom applies it: for a VOI
    LUT sequence (which pydicom prefers over a window) 0 to 2^n - 1, n the bits per LUT
    entry (PS3.3 C.11.2.1.1); for a window, the values pydicom's window function takes
    far below and far above the window (its y_min and y_max: the stored bit depth, signed
    or not, through the rescale when there is one)."""
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ends = np.asarray(apply_voi_lut(np.asarray([-1e30, 1e30]), ds, index=0), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def _voi_input(values: npt.NDArray[Any], ds: Any) -> npt.NDArray[Any]:
    """Modality values as a VOI LUT indexes them: whole numbers as integers (pydicom warns,
    rightly, on a float array); a window takes them as they are."""
    if "VOILUTSequence" not in ds or np.issubdtype(values.dtype, np.integer):
        return values
    rounded = np.rint(values)
    if not np.allclose(values, rounded, atol=1e-6):
        logger.warning("a VOI LUT indexed by non-integer modality values (rescale slope %s): rounded to the nearest "
                       "entry", getattr(ds, "RescaleSlope", "?"))
    return rounded.astype(np.int64)


def read_image(path: str | Path, *, window: tuple[float, float] | None = None, use_voi: bool = True
               ) -> npt.NDArray[np.float32]:
    """Any supported file (by suffix, or by DICOM's ``DICM`` magic) -> grey float32 in [0, 1]."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and _is_dicom(p)):
        return read_dicom(p, window=window, use_voi=use_voi)
    if suffix in IMAGE_SUFFIXES:
        return read_picture(p)
    raise ImageReadError(f"{p}: unsupported file type {suffix or '(no suffix)'}; give PNG, JPEG, TIFF or DICOM images "
                         "(or a MedMNIST .npz)")


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def resize_grey(img: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """Antialiased resize of a grey image to (size, size) (aspect not kept: radiographs
    are near-square and the network sees the whole field)."""
    import torch

    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)[0, 0].clamp(0, 1).numpy()


# -- samples -----------------------------------------------------------------------------
@dataclass
class ImageSample:
    """One labelled image. ``slide_id`` is the image id (the key that splits, reports and
    predictions use for every modality); ``target`` holds NaN where a label is blank."""

    slide_id: str
    patient_id: str
    target: npt.NDArray[np.float32]
    split: str | None
    path: Path | None = None
    pixels: npt.NDArray[np.float32] | None = None  # held in memory (NPZ), float32 [0, 1]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def label_index(self) -> int:
        t = self.target
        if np.isnan(t).any():
            return -1
        if len(t) == 1:
            return int(t[0] > 0.5)
        return int(np.argmax(t)) if abs(t.sum() - 1) < 1e-6 else -1

    def load(self, *, window: tuple[float, float] | None = None, use_voi: bool = True) -> npt.NDArray[np.float32]:
        if self.pixels is not None:
            return self.pixels
        if self.path is None:
            raise ImageReadError(f"image {self.slide_id}: neither pixels nor a file to read them from")
        return read_image(self.path, window=window, use_voi=use_voi)


@dataclass
class ImageEntry:
    """A manifest row (the fields :func:`wsi_mil.data.bags.infer_task` reads)."""

    slide_id: str
    path: Path | None
    patient_id: str | None
    labels: dict[str, str]
    split: str | None
    meta: dict[str, str]
    pixels: npt.NDArray[np.float32] | None = None


#: columns that name a manifest's rows (one of them; without one, the file name without suffix)
ID_COLUMNS = ("image_id", "volume_id", "slide_id")


def _image_id(path: str) -> str:
    """The id of a file: its name without the suffix (both parts of ``.nii.gz``), made safe."""
    name = Path(path).name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    return _SAFE_ID.sub("_", stem) or "image"


def unique_file_ids(files: list[Path], what: str = "image") -> list[str]:
    """The ids of files given as a folder (their names without suffix); two files that
    would share one (``x.png`` and ``x.jpg``, ``v.nii`` and ``v.nii.gz``) are refused, as a
    manifest's duplicate ids are: one row's outputs would overwrite the other's."""
    ids = [_image_id(str(p)) for p in files]
    clash = {i: [p.name for p, j in zip(files, ids, strict=True) if j == i] for i, n in Counter(ids).items() if n > 1}
    if clash:
        listing = "; ".join(f"{i}: {', '.join(names)}" for i, names in list(clash.items())[:8])
        raise ManifestError(f"{len(clash)} {what} id(s) are shared by several files ({listing}); their predictions and "
                            "maps would overwrite each other. Rename the files, or list them in a manifest with an "
                            "image_id column")
    return ids


def read_image_manifest(path: str | Path, *, labels: list[str] | None = None, readers: list[str] | None = None,
                        folders: bool = False, labels_optional: bool = False) -> tuple[list[ImageEntry], dict[str, Any]]:
    """Rows of an image manifest CSV (see the module docstring).

    ``labels`` names the label columns (default: ``label`` / ``label_<name>``); with
    ``readers`` (several readers' label columns) the reference label is their majority
    vote (:func:`consensus`), reported with the readers' agreement. With ``folders`` a path
    may be a folder (a DICOM series: volumes). With ``labels_optional`` (prediction) the
    named label columns the manifest lacks are left out instead of refused. Returns the entries and a record of how the
    labels were made (``{}`` without readers)."""
    from wsi_mil.data.manifest import csv_rows

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        columns, numbered = csv_rows("\n".join(lines), path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the image manifest ({exc}); it must be a UTF-8 CSV") from exc
    rows = [row for _, row in numbered]
    where = f"manifest {path}"
    path_col = "path" if "path" in columns else "image" if "image" in columns else None
    if path_col is None:
        raise ManifestError(f"{where}: no 'path' column (the image file, relative to the manifest); found {columns[:12]}")
    if not rows:
        raise ManifestError(f"{where}: no images listed")
    record: dict[str, Any] = {}
    if readers:
        absent = [c for c in readers if c not in columns]
        if absent:
            raise ManifestError(f"{where}: --readers names column(s) {absent} that it does not have; found {columns[:20]}")
        if len(readers) < 2:
            raise ConfigError("--readers needs at least two readers' label columns")
        votes = [[row[c] for c in readers] for row in rows]
        consensus_labels, record = consensus(votes)
        for row, value in zip(rows, consensus_labels, strict=True):
            row["label"] = value
        columns = [*columns, "label"] if "label" not in columns else columns
        label_cols = ["label"]
    elif labels is not None and labels_optional:
        label_cols = [c for c in labels if c in columns]
        if len(label_cols) < len(labels):
            logger.info("%s: no label column(s) %s: %s predicted without a reference", where,
                        [c for c in labels if c not in columns], "these outputs are" if label_cols else "every row is")
    elif labels:
        absent = [c for c in labels if c not in columns]
        if absent:
            raise ManifestError(f"{where}: --labels names column(s) {absent} that it does not have; found {columns[:20]}")
        label_cols = list(labels)
    else:
        label_cols = [c for c in columns if c == "label" or c.startswith("label_")]
    misspelt = [c for c in columns if c.lower() in ID_COLUMNS and c not in ID_COLUMNS]
    if misspelt:
        raise ManifestError(f"{where}: column {misspelt[0]!r} looks like an id column; id columns are spelt "
                            f"{' / '.join(ID_COLUMNS)} (rename it)")
    id_cols = [c for c in ID_COLUMNS if c in columns]  # a volume manifest's volume_id was read as a covariate
    if len(id_cols) > 1:
        raise ManifestError(f"{where}: {len(id_cols)} id columns {id_cols}; which one names the rows cannot be "
                            "guessed: keep one")
    id_col = id_cols[0] if id_cols else "image_id"
    entries: list[ImageEntry] = []
    problems: list[str] = []
    skip = {path_col, id_col, "patient_id", "split", *label_cols, *(readers or [])}
    for line, row in enumerate(rows, start=2):
        rel = row.get(path_col, "")
        if not rel:
            problems.append(f"line {line}: empty {path_col}")
            continue
        p = Path(rel)
        p = p if p.is_absolute() else path.parent / p
        if id_col in columns and not (row.get(id_col) or "").strip():  # never a file stem among the given ids
            problems.append(f"line {line}: empty {id_col} (fill it, or remove the column to name rows by file)")
            continue
        iid = row.get(id_col) or _image_id(rel)
        entries.append(ImageEntry(iid, p, row.get("patient_id") or None, {c: row.get(c, "") for c in label_cols},
                                  (row.get("split") or "").lower() or None, {k: v for k, v in row.items() if k not in skip}))
    dup = [k for k, n in Counter(e.slide_id for e in entries).items() if n > 1]
    if dup:
        problems.append(f"duplicate ids {dup[:8]}: give the {id_col} column unique values")
    if problems:
        raise ManifestError(f"{where} has {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))
    absent_files = [str(e.path) for e in entries
                    if e.path is not None and not (e.path.is_file() or (folders and e.path.is_dir()))]
    if absent_files:
        raise ManifestError(f"{where}: {len(absent_files)} image file(s) not found ({', '.join(absent_files[:5])}); "
                            "paths are relative to the manifest's folder")
    return entries, record


def npz_entries(path: str | Path) -> list[ImageEntry]:
    """A MedMNIST-layout NPZ as manifest entries: every ``<split>_images`` array with its
    ``<split>_labels`` (the official splits kept in ``split``). MedMNIST has no patient
    ids, so each image is its own patient (the official splits are patient-disjoint)."""
    def prepare(split: str, imgs: np.ndarray) -> np.ndarray:
        if imgs.ndim == 4 and imgs.shape[-1] == 3:
            return (imgs.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)).astype(np.float32) / 255.0
        if imgs.ndim == 3:
            return _scale_integer(imgs) if imgs.dtype != np.float32 else imgs
        raise ManifestError(f"{path}: {split}_images has shape {imgs.shape}; expected (N, H, W) 2D images")

    return medmnist_entries(path, prepare, layout="the MedMNIST layout (train_images, train_labels, val_images, ...)",
                            unit="images")


def medmnist_entries(path: str | Path, prepare: Callable[[str, np.ndarray], np.ndarray], *, layout: str,
                     unit: str) -> list[ImageEntry]:
    """Entries of every ``<split>_images`` array of a MedMNIST NPZ (2D or 3D) with its
    ``<split>_labels``; ``prepare(split, array)`` checks and converts each split's array."""
    path = Path(path)
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a readable .npz ({exc})") from exc
    splits = [k[: -len("_images")] for k in data.files if k.endswith("_images")]
    if not splits:
        raise ManifestError(f"{path}: no '<split>_images' arrays; expected {layout}")
    entries: list[ImageEntry] = []
    for split in splits:
        if f"{split}_labels" not in data.files:
            raise ManifestError(f"{path}: {split}_images has no {split}_labels")
        if not len(data[f"{split}_images"]):  # an empty split (a file holding only some of them) adds nothing
            continue
        arrays, labels = prepare(split, data[f"{split}_images"]), np.asarray(data[f"{split}_labels"])
        labels = labels.reshape(len(arrays), -1) if len(arrays) and labels.size % len(arrays) == 0 else labels.reshape(len(labels), -1)
        if len(labels) != len(arrays):
            raise ManifestError(f"{path}: {len(arrays)} {split} {unit} but {len(labels)} labels")
        name = "val" if split in ("val", "valid", "validation") else split
        multi = labels.shape[1] > 1
        for i in range(len(arrays)):
            lab = ({f"label_{j}": str(int(v)) for j, v in enumerate(labels[i])} if multi else {"label": str(int(labels[i, 0]))})
            iid = f"{split}_{i:05d}"
            entries.append(ImageEntry(iid, None, iid, lab, name, {}, arrays[i]))
    return entries


# -- consensus ---------------------------------------------------------------------------
TIE_RULE = ("majority vote of the readers who gave a label; a tie (no strict majority) leaves the image not "
            "labelled: it is masked out of training and metrics and listed in the report")


def consensus(votes: list[list[str]]) -> tuple[list[str], dict[str, Any]]:
    """Reference labels by strict majority of the non-blank readers' labels (ties -> blank,
    see ``TIE_RULE``), with the readers' agreement: Cohen's kappa (two readers) or Fleiss'
    kappa (more), over the images every reader labelled, and the share of unanimous ones."""
    out: list[str] = []
    ties: list[int] = []
    for i, row in enumerate(votes):
        given = [v for v in row if v.strip()]
        if not given:
            out.append("")
            continue
        counts = Counter(given).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            out.append("")
            ties.append(i)
        else:
            out.append(counts[0][0])
    complete = [row for row in votes if all(v.strip() for v in row)]
    categories = sorted({v for row in complete for v in row})
    n_readers = len(votes[0]) if votes else 0
    kappa_name = "cohen" if n_readers == 2 else "fleiss"
    kappa = (cohen_kappa([r[0] for r in complete], [r[1] for r in complete]) if n_readers == 2
             else fleiss_kappa(complete, categories)) if complete else None
    record = {"readers": n_readers, "rule": TIE_RULE, "n_images": len(votes), "n_all_readers": len(complete),
              "kappa": kappa, "kappa_kind": f"{kappa_name} kappa",
              "unanimous_share": (sum(len(set(r)) == 1 for r in complete) / len(complete)) if complete else None,
              "ties": ties, "n_unlabelled": sum(1 for v in out if not v)}
    return out, record


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two readers (None when undefined: one category only)."""
    cats = sorted(set(a) | set(b))
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    return None if pe >= 1 else float((po - pe) / (1 - pe))


def fleiss_kappa(rows: list[list[str]], categories: list[str]) -> float | None:
    """Fleiss' kappa of a fixed number of readers per image."""
    if not rows:
        return None
    m = len(rows[0])
    counts = np.asarray([[row.count(c) for c in categories] for row in rows], dtype=float)  # (N, K)
    n = len(rows)
    p_j = counts.sum(axis=0) / (n * m)
    p_i = ((counts ** 2).sum(axis=1) - m) / (m * (m - 1))
    p_bar, pe = float(p_i.mean()), float((p_j ** 2).sum())
    return None if pe >= 1 else float((p_bar - pe) / (1 - pe))
