"""Patch features written by other tools (CLAM, TRIDENT) -> wsi-mil feature stores.

The layouts, as the tools' own code writes them:

* **CLAM** (``extract_features_fp.py``, ``h5_files/<slide>.h5``): ``features`` (N, D)
  float32 and ``coords`` (N, 2) int32, level-0 top-left corners, and no attributes at all:
  the encoder is not recorded (the user names it), nor the patch size (read from CLAM's
  patch file ``patches/<slide>.h5``, whose ``coords`` carry ``patch_size`` at
  ``patch_level`` and ``downsample``, or given by the user).
* **TRIDENT** (``<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``):
  ``features`` (N, D) in the encoder's precision (float16 for some) and ``coords`` (N, 2)
  level-0 top-left corners whose attributes carry ``patch_size_level0``,
  ``target_magnification``, ``level0_magnification`` and ``overlap``; the encoder is an
  attribute of ``features`` in recent versions and always the folder's name.

Each file is checked (rows of features and coordinates agree, features finite, the
coordinates lie on the grid the patch size says) and written as a wsi-mil feature store
(float32 features, int64 coordinates) whose attributes record where it came from and
whether the encoder was read from the file or named by the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import ConfigError, StoreError

FORMATS = ("clam", "trident")
_TRIDENT_DIR = re.compile(r"^features_(?P<encoder>.+)$")


@dataclass
class Foreign:
    """One foreign feature file, read and checked."""

    slide_id: str
    features: npt.NDArray[np.float32]
    coords: npt.NDArray[np.int64]
    encoder: str
    encoder_source: str  # "file attribute", "folder name" or "named by the user"
    patch_level0_px: float
    geometry_source: str
    attrs: dict[str, Any]


def _value(v: Any) -> Any:
    """An HDF5 attribute as Python: bytes decoded, a one-element array as its element."""
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        return v.decode()
    return v.item() if isinstance(v, np.generic) else v


def _attrs(obj: Any) -> dict[str, Any]:
    return {k: _value(v) for k, v in obj.attrs.items()}


@dataclass
class Survey:
    """What a foreign file says before its features are read: format, encoder, shape."""

    path: Path
    fmt: str
    encoder: str
    encoder_source: str
    n: int
    dim: int


def resolve_encoder(path: Path, fmt: str, fattrs: dict[str, Any], given: str | None) -> tuple[str, str]:
    """(encoder, where it came from). A name the file records is authoritative: TRIDENT's
    folder name or ``--encoder`` that contradicts it is refused, and so is ``--encoder``
    against the folder name when the file records none."""
    attr = fattrs.get("encoder")
    attr = str(attr) if attr not in (None, "None", "") else None
    m = _TRIDENT_DIR.match(path.parent.name)
    folder = m.group("encoder") if m else None
    if attr and folder and attr != folder:
        raise ConfigError(f"{path}: the file says its features were made by {attr!r}, its folder "
                          f"{path.parent.name!r} says {folder!r}; which one is right cannot be told: fix one of them")
    for where, value in (("file attribute", attr), ("folder name", folder)):
        if value:
            if given and given != value:
                raise ConfigError(f"{path}: its {where} says the features were made by {value!r}, but --encoder says "
                                  f"{given!r}; give the encoder that made them")
            return value, where
    if given:
        return given, "named by the user"
    raise ConfigError(f"{path}: a {fmt.upper()} feature file does not say which encoder made its features; "
                      "give --encoder NAME (the model you extracted with, e.g. the --model_name of CLAM's "
                      "extract_features_fp.py): a model is only valid on features of its own encoder")


def survey(path: Path, fmt: str, encoder: str | None) -> Survey:
    """Format, encoder and shape of a file, its features not read (checked across a folder
    before anything is written)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "features" not in f or "coords" not in f:
            raise StoreError(f"{path}: no 'features' and 'coords' datasets (found {sorted(f)}); not a CLAM or "
                             "TRIDENT feature file")
        if f.attrs.get("created_by") is not None:
            raise StoreError(f"{path} is a wsi-mil store already; give its folder to train-mil as it is")
        kind = fmt if fmt != "auto" else ("trident" if "patch_size_level0" in f["coords"].attrs else "clam")
        shape = f["features"].shape
        fattrs = _attrs(f["features"])
    shape = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    if len(shape) != 2:
        raise StoreError(f"{path}: features of shape {shape}; expected (N, D)")
    enc, source = resolve_encoder(path, kind, fattrs, encoder)
    return Survey(path, kind, enc, source, int(shape[0]), int(shape[1]))


def grid_step(coords: npt.NDArray[np.int64]) -> float | None:
    """The spacing of the coordinate grid (level-0 px): the most common positive gap between
    neighbouring x of one row (or y of one column); None with too few patches to tell."""
    gaps: list[int] = []
    for axis in (0, 1):
        other = 1 - axis
        order = np.lexsort((coords[:, axis], coords[:, other]))
        c = coords[order]
        same_line = c[1:, other] == c[:-1, other]
        d = (c[1:, axis] - c[:-1, axis])[same_line]
        gaps += d[d > 0].tolist()
    if not gaps:
        return None
    values, counts = np.unique(gaps, return_counts=True)
    return float(values[np.argmax(counts)])


def read_foreign(path: Path, fmt: str, *, encoder: str | None = None, patch_size_level0: float | None = None,
                 clam_patches: Path | None = None) -> Foreign:
    """Read and check one CLAM or TRIDENT feature file (see the module docstring)."""
    import h5py

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    with h5py.File(path, "r") as f:
        if "features" not in f or "coords" not in f:
            raise StoreError(f"{path}: no 'features' and 'coords' datasets (found {sorted(f)}); not a {fmt.upper()} "
                             "feature file")
        features = np.asarray(f["features"][:])
        coords = np.asarray(f["coords"][:])
        fattrs, cattrs = _attrs(f["features"]), _attrs(f["coords"])
    if features.ndim == 3 and features.shape[0] == 1:  # (1, N, D), as some tools save a batch of one
        features = features[0]
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreError(f"{path}: features {features.shape} and coords {coords.shape}: expected (N, D) and (N, 2)")
    if len(features) != len(coords):
        raise StoreError(f"{path}: {len(features)} feature rows but {len(coords)} coordinates; the file is damaged "
                         "or its rows do not belong together")
    if not len(features):
        raise StoreError(f"{path} holds no patches (0 rows); there is nothing to train or predict from: leave the "
                         "slide out or extract it again")
    if not np.issubdtype(coords.dtype, np.integer):
        whole = np.isfinite(coords).all() and np.array_equal(coords, np.round(coords))
        if not whole:
            raise StoreError(f"{path}: coordinates that are not whole pixels (e.g. {coords.reshape(-1)[0]!r}); CLAM and "
                             "TRIDENT write integer level-0 corners: this file was made otherwise")
    features = features.astype(np.float32)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise StoreError(f"{path}: {int(bad.sum())} of {len(features)} feature rows are not finite (NaN or inf); "
                         "extract this slide again with the tool that made it")
    coords = coords.astype(np.int64)
    enc, source = resolve_encoder(path, fmt, fattrs, encoder)
    size, geometry = _patch_size(path, fmt, cattrs, patch_size_level0, clam_patches)
    step = grid_step(coords)
    given_by_user = geometry == "--patch-size-level0"
    overlap = float(cattrs.get("overlap", 0) or 0)
    if step is not None and size is not None:
        expected = size - overlap * (size / float(cattrs.get("patch_size") or size)) if fmt == "trident" else size
        # overlapping patches (a grid finer than the patch) are taken only when the user states the size
        if not (abs(step - expected) <= max(1.0, 0.02 * expected) or (step < expected and given_by_user)):
            if fmt == "trident":
                raise StoreError(f"{path}: the coordinates lie on a {step:g} px grid, but the file records "
                                 f"{size:g} px patches (patch_size_level0) with an overlap of {overlap:g} px, which "
                                 f"makes a {expected:g} px grid; its attributes do not describe its coordinates")
            raise StoreError(f"{path}: the coordinates lie on a {step:g} px grid, but the patches are {size:g} level-0 "
                             f"px ({geometry}); the patch size is wrong (a patch file or --patch-size-level0 of "
                             "another resolution?). If the patches really overlap, state their size with "
                             "--patch-size-level0")
    if size is None:
        raise ConfigError(f"{path}: the patch size is not recorded in a CLAM feature file; give --clam-patches DIR "
                          "(CLAM's patches/ folder of coordinate files) or --patch-size-level0 PX")
    return Foreign(path.stem, features, coords, enc, source, size, geometry, {"features": fattrs, "coords": cattrs})


def _patch_size(path: Path, fmt: str, cattrs: dict[str, Any], given: float | None,
                clam_patches: Path | None) -> tuple[float | None, str]:
    """(patch side in level-0 px, where it was read)."""
    import h5py

    if fmt == "trident" and cattrs.get("patch_size_level0") is not None:
        size = float(cattrs["patch_size_level0"])
        if given is not None and abs(given - size) > 0.5:
            raise ConfigError(f"{path}: the file records {size:g} px patches at level 0, --patch-size-level0 says "
                              f"{given:g}; leave the option out")
        return size, "the file's patch_size_level0"
    if clam_patches is not None:
        patch_file = clam_patches / path.name
        if not patch_file.is_file():
            raise StoreError(f"{path}: no CLAM patch file {patch_file} beside it in --clam-patches")
        with h5py.File(patch_file, "r") as f:
            pattrs = _attrs(f["coords"]) if "coords" in f else {}
            if "coords" in f:
                theirs = np.asarray(f["coords"][:], dtype=np.int64)
        if "patch_size" not in pattrs:
            raise StoreError(f"{patch_file}: its coords carry no patch_size attribute; not a CLAM patch file")
        down = np.atleast_1d(np.asarray(pattrs.get("downsample", 1.0), dtype=float))
        size = float(pattrs["patch_size"]) * float(down[0])
        with h5py.File(path, "r") as f:
            mine = np.asarray(f["coords"][:], dtype=np.int64)
        if len(theirs) != len(mine) or not np.array_equal(theirs[np.lexsort(theirs.T)], mine[np.lexsort(mine.T)]):
            raise StoreError(f"{path}: its coordinates are not those of the patch file {patch_file} "
                             f"({len(mine)} against {len(theirs)}); the two files are of different slides or runs")
        return size, (f"{patch_file.name}: patch_size {pattrs['patch_size']} at level {pattrs.get('patch_level', 0)}, "
                      f"downsample {down[0]:g}")
    if given is not None:
        return float(given), "--patch-size-level0"
    return None, "not recorded"


def write_store(foreign: Foreign, source: Path, out_dir: Path, fmt: str, mpp: float | None = None,
                settings: str = "") -> Path:
    """The wsi-mil feature store of one foreign file (atomic)."""
    import h5py

    from wsi_mil.io.atomic import atomic_path
    from wsi_mil.io.features import coords_sha256
    from wsi_mil.io.run_folder import file_digest

    path = out_dir / f"{foreign.slide_id}.h5"
    step = grid_step(foreign.coords) or foreign.patch_level0_px
    space = f"{fmt}:{foreign.encoder}"
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=foreign.features)
        c = f.create_dataset("coords", data=foreign.coords)
        c.attrs.update({"patch_level": 0, "patch_size": int(round(foreign.patch_level0_px)), "downsample": [1.0, 1.0]})
        f.create_dataset("patch_index", data=np.arange(len(foreign.coords)))
        attrs: dict[str, Any] = {
            "complete": True, "created_by": f"wsi-mil import-features ({fmt})", "encoder": foreign.encoder,
            "encoder_source": foreign.encoder_source, "weights_sha256": space, "imported_from": fmt,
            "source_file": str(source.resolve()), "source_sha256": file_digest(source),
            "extent_level0_px": float(foreign.patch_level0_px), "step_level0_px": float(step),
            "geometry_source": foreign.geometry_source, "slide_id": foreign.slide_id,
            "n_features": int(len(foreign.features)), "dim": int(foreign.features.shape[1]),
            "coords_sha256": coords_sha256(foreign.coords), "import_settings": settings}
        if mpp is not None:
            attrs["effective_mpp"] = float(mpp)
        for k in ("target_magnification", "level0_magnification", "overlap"):
            v = foreign.attrs["coords"].get(k)
            if v is not None:
                attrs[f"source_{k}"] = v
        f.attrs.update(attrs)
    return path
