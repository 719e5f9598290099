"""Per-slide patch stores in HDF5 (CLAM-compatible layout) or Zarr, written atomically.

Layout (same names in both formats)::

    coords            (N, 2) int64, level-0 top-left (x, y) of each patch
        attrs: patch_size, patch_level, downsample, level_dim, downsampled_level_dim,
               name, target_patch_size          <- what CLAM-style tools read
    tissue_fraction   (N,) float32
    patch_jpeg        (B,) uint8, all JPEG-encoded patches concatenated   (--save-patches)
    patch_offsets     (N + 1,) int64; patch i is patch_jpeg[off[i]:off[i+1]]
    root attrs        provenance: slide id, file hash, mpp and its source, geometry,
                      tissue settings, package version, "complete"

A store is written to ``<name>.partial`` and renamed into place only once complete, so
an interrupted run never leaves a store that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import StoreError

StoreFormat = Literal["h5", "zarr"]
SUFFIX: dict[str, str] = {"h5": ".h5", "zarr": ".zarr"}
PARTIAL = ".partial"
_JPEG_CHUNK_BYTES = 1 << 20


def store_path(out_dir: Path, slide_id: str, fmt: StoreFormat) -> Path:
    return out_dir / f"{slide_id}{SUFFIX[fmt]}"


def _attr_value(value: Any) -> Any:
    """Attributes are scalars/arrays/strings; nested structures are stored as JSON."""
    if isinstance(value, (dict, list)) and not (isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return "none"
    return value


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class StoreWriter:
    """Write one slide's store to a temporary path and publish it atomically on ``commit``."""

    def __init__(self, final_path: Path, fmt: StoreFormat) -> None:
        self.final_path = final_path
        self.fmt = fmt
        self.tmp_path = final_path.with_name(final_path.name + PARTIAL)
        _remove(self.tmp_path)
        if fmt == "h5":
            import h5py

            self._h5 = h5py.File(self.tmp_path, "w")
        else:
            import zarr

            self._zarr = zarr.open_group(str(self.tmp_path), mode="w")
        self._n_jpeg_bytes = 0
        self._n_patches = 0

    # -- datasets ---------------------------------------------------------------
    def _create(self, name: str, data: npt.NDArray[Any], *, chunks: tuple[int, ...], growable: bool = False) -> Any:
        if self.fmt == "h5":
            if growable:  # JPEG bytes do not compress further; chunked so they can grow
                return self._h5.create_dataset(name, data=data, chunks=chunks, maxshape=(None,) + data.shape[1:])
            return self._h5.create_dataset(name, data=data, chunks=chunks if data.size else None, compression="gzip" if data.size else None)
        arr = self._zarr.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
        if data.size:
            arr[...] = data
        return arr

    def write_coords(self, coords_px: npt.NDArray[np.int64], tissue_fraction: npt.NDArray[np.float32], clam_attrs: Mapping[str, Any]) -> None:
        n = len(coords_px)
        coords = self._create("coords", np.asarray(coords_px, dtype=np.int64).reshape(n, 2), chunks=(max(1, min(n, 65536)), 2))
        for key, value in clam_attrs.items():
            coords.attrs[key] = _attr_value(value)
        self._create("tissue_fraction", np.asarray(tissue_fraction, dtype=np.float32), chunks=(max(1, min(n, 65536)),))

    def write_annotation_overlap(self, overlap: npt.NDArray[np.float32]) -> None:
        """Each patch's share covered by each annotation class (columns: the ``annotations`` attribute's classes)."""
        n = len(overlap)
        self._create("annotation_overlap", np.asarray(overlap, np.float32), chunks=(max(1, min(n, 65536)), max(1, overlap.shape[1])))

    def begin_patches(self) -> None:
        self._jpeg = self._create("patch_jpeg", np.zeros(0, dtype=np.uint8), chunks=(_JPEG_CHUNK_BYTES,), growable=True)
        self._offsets = [np.zeros(1, dtype=np.int64)]

    def append_patches(self, flat_jpeg: npt.NDArray[np.uint8], lengths: npt.NDArray[np.int64]) -> None:
        from wsi_mil.io.atomic import check_space

        check_space(self.tmp_path.parent, 2 * len(flat_jpeg) + 8 * len(lengths), f"{len(lengths)} more patches")
        start = self._n_jpeg_bytes
        end = start + len(flat_jpeg)
        self._jpeg.resize((end,))
        self._jpeg[start:end] = flat_jpeg
        self._offsets.append(start + np.cumsum(lengths))
        self._n_jpeg_bytes = end
        self._n_patches += len(lengths)

    def end_patches(self) -> None:
        offsets = np.concatenate(self._offsets)
        self._create("patch_offsets", offsets, chunks=(max(1, min(len(offsets), 65536)),))

    # -- attributes and commit -----------------------------------------------------
    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        target = self._h5.attrs if self.fmt == "h5" else self._zarr.attrs
        for key, value in attrs.items():
            target[key] = _attr_value(value)

    def commit(self) -> Path:
        """Mark complete, close and atomically move into place."""
        self.set_attrs({"complete": True})
        self.close()
        _remove(self.final_path)
        os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def close(self) -> None:
        if self.fmt == "h5" and self._h5.id.valid:
            self._h5.close()

    def abort(self, keep_partial: bool = False) -> None:
        """Close without publishing; the ``.partial`` file is removed unless kept (a re-run
        discards it and redoes the slide). Never raises: a store whose last write failed
        (full disk) cannot always be flushed."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - what matters is that nothing looks finished
            pass
        if not keep_partial:
            try:
                _remove(self.tmp_path)
            except OSError:
                pass


class PatchStore:
    """Read access to a finished store (HDF5 or Zarr)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store. Run `wsi-mil tile` first.")
        if self.path.suffix == ".h5":
            self._root: Any = open_h5(self.path)
        elif self.path.suffix == ".zarr":
            import zarr

            self._root = zarr.open_group(str(self.path), mode="r")
        else:
            raise StoreError(f"{self.path}: unknown store type (expected .h5 or .zarr)")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if hasattr(self._root, "close"):
            self._root.close()

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _decode(v) for k, v in self._root.attrs.items()}

    @property
    def coords_attrs(self) -> dict[str, Any]:
        return {k: _decode(v) for k, v in self._root["coords"].attrs.items()}

    @property
    def coords(self) -> npt.NDArray[np.int64]:
        return np.asarray(self._root["coords"][...], dtype=np.int64)

    @property
    def tissue_fraction(self) -> npt.NDArray[np.float32]:
        return np.asarray(self._root["tissue_fraction"][...], dtype=np.float32)

    def annotation_overlap(self) -> tuple[list[str], npt.NDArray[np.float32]] | None:
        """(classes, each patch's share covered by each) of a slide tiled with --annotations; None otherwise."""
        if "annotation_overlap" not in self._root:
            return None
        record = _decode(self._root.attrs.get("annotations"))
        classes = list(record.get("classes", [])) if isinstance(record, dict) else []
        return classes, np.asarray(self._root["annotation_overlap"][...], np.float32)

    @property
    def has_patches(self) -> bool:
        return "patch_offsets" in self._root

    def __len__(self) -> int:
        return int(self._root["coords"].shape[0])

    def patch_jpeg(self, i: int) -> bytes:
        if not self.has_patches:
            raise StoreError(f"{self.path}: no stored pixels; tile with --save-patches")
        off = self._root["patch_offsets"]
        a, b = int(off[i]), int(off[i + 1])
        return bytes(np.asarray(self._root["patch_jpeg"][a:b], dtype=np.uint8).tobytes())

    def patch_jpegs(self, start: int, end: int) -> list[bytes]:
        """The JPEG bytes of patches ``[start, end)`` in one read."""
        if not self.has_patches:
            raise StoreError(f"{self.path}: no stored pixels; tile with --save-patches")
        off = np.asarray(self._root["patch_offsets"][start:end + 1], dtype=np.int64)
        flat = np.asarray(self._root["patch_jpeg"][int(off[0]):int(off[-1])], dtype=np.uint8).tobytes()
        rel = off - off[0]
        return [flat[int(rel[k]):int(rel[k + 1])] for k in range(len(rel) - 1)]

    def patch(self, i: int) -> npt.NDArray[np.uint8]:
        from wsi_mil.tiling.patches import decode_jpeg

        return decode_jpeg(self.patch_jpeg(i))


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def open_h5(path: Path, mode: str = "r") -> Any:
    """An HDF5 file, with HDF5's raw "unable to lock file" turned into what it means and
    what to do."""
    import h5py

    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if "unable to lock file" not in str(exc):
            raise
        raise StoreError(f"{path}: HDF5 could not lock the file ({exc.strerror or exc}): another program has it open "
                         "for writing (a run still going: wait for it to finish), or the file system does not support "
                         "locks (network storage: set HDF5_USE_FILE_LOCKING=FALSE in the environment)") from exc


def read_complete_attrs(path: Path) -> dict[str, Any] | None:
    """Root attributes of a finished store, or None if absent/incomplete/unreadable."""
    if not path.exists():
        return None
    try:
        with PatchStore(path) as store:
            attrs = store.attrs
    except Exception:  # noqa: BLE001 - a damaged store (any error of any backend) is treated as absent and rebuilt
        return None
    return attrs if attrs.get("complete") is True else None
