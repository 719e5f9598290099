"""Per-slide feature stores, written incrementally so a killed run resumes mid-slide.

Final layout (HDF5, readable by CLAM-style tools, or Zarr; same names)::

    features      (N, D) float32, chunked along patches
    coords        (N, 2) int64 level-0 (x, y), with the patch store's CLAM attributes
    patch_index   (N,) int64, row of each feature in the slide's patch store
    root attrs    provenance: encoder, weights hash, transform, mpp, patch size, source
                  store, coordinates hash, unreadable patches, package version, "complete"

While a slide is in progress its finished chunks live in ``<store>.parts/`` as one
``.npz`` per chunk (each written to a temporary name and renamed), plus ``meta.json``
naming the encoder and the coordinates they belong to. A re-run continues after the
last finished chunk; when all chunks are in, the final store is assembled into
``<store>.partial`` and renamed into place, and the parts are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import NonFiniteFeaturesError, StoreError
from wsi_mil.io.atomic import write_json
from wsi_mil.io.store import (
    PARTIAL,
    PatchStore,
    StoreFormat,
    _attr_value,
    _remove,
)

PARTS = ".parts"
_PART_RE = re.compile(r"^chunk-(\d{10})-(\d{10})\.npz$")


def nonfinite_rows(features: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.int64]:
    """Indices of the rows of a (N, D) array that hold NaN or infinity."""
    f = np.asarray(features)
    if f.size == 0 or np.isfinite(f).all():
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(f.reshape(len(f), -1)).all(axis=1)).astype(np.int64)


def _preview_rows(rows: npt.ArrayLike, n: int = 8) -> str:
    r = [int(v) for v in np.asarray(rows).ravel()]
    return ", ".join(map(str, r[:n])) + (f", ... ({len(r)} in all)" if len(r) > n else "")


def check_finite(store: Path | str, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``features``, or :class:`NonFiniteFeaturesError` naming the store and the rows."""
    rows = nonfinite_rows(features)
    if len(rows):
        raise NonFiniteFeaturesError(
            f"{store}: {len(rows)} of {len(features)} feature rows are not finite (NaN or inf): rows "
            f"{_preview_rows(rows)}. The store is damaged or its encoder failed; re-extract the slide "
            "(wsi-mil extract-features --overwrite) or leave it out")
    return features


def coords_sha256(coords: npt.NDArray[np.int64]) -> str:
    return hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int64).tobytes()).hexdigest()


class FeatureWriter:
    """Chunked, resumable writer of one slide's feature store.

    Args:
        final_path: where the finished store goes (``.h5`` or ``.zarr``).
        meta: provenance; must contain ``fingerprint`` (encoder + coordinates), which
            decides whether existing parts may be continued.
        n_total: number of patches in the slide's patch store.
    """

    def __init__(self, final_path: Path, fmt: StoreFormat, meta: Mapping[str, Any], n_total: int) -> None:
        self.final_path = final_path
        self.fmt = fmt
        self.meta = dict(meta)
        self.n_total = n_total
        self.parts_dir = final_path.with_name(final_path.name + PARTS)

    # -- resume -------------------------------------------------------------------------
    def existing_fingerprint(self) -> str | None:
        meta = self.parts_dir / "meta.json"
        if not meta.exists():
            return None
        try:
            return str(json.loads(meta.read_text())["fingerprint"])
        except (OSError, ValueError, KeyError):
            return "unreadable"

    def start(self) -> int:
        """Prepare the parts folder and return the patch index to continue from.

        Raises:
            StoreError: parts from another encoder or other coordinates are present
                (``--overwrite`` removes them before this is called).
        """
        found = self.existing_fingerprint()
        if found is not None and found != self.meta["fingerprint"]:
            raise StoreError(
                f"{self.parts_dir} holds unfinished features from another encoder or other coordinates "
                f"(fingerprint {found}, this run {self.meta['fingerprint']}); features of two encoders are "
                "never mixed in one store. Use --overwrite to discard them, or another --out"
            )
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.parts_dir / "meta.json", self.meta)
        for tmp in self.parts_dir.glob("*.tmp*"):
            tmp.unlink()
        return self._done_until()

    def _parts(self) -> list[tuple[int, int, Path]]:
        parts = []
        for p in self.parts_dir.iterdir():
            m = _PART_RE.match(p.name)
            if m:
                parts.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(parts)

    def _done_until(self) -> int:
        done = 0
        for a, b, p in self._parts():
            if a != done:  # a gap: keep only the contiguous prefix
                p.unlink()
                continue
            done = b
        return done

    # -- chunks ---------------------------------------------------------------------------
    def write_chunk(self, start: int, end: int, features: npt.NDArray[np.float32],
                    patch_index: npt.NDArray[np.int64], bad: list[dict[str, Any]]) -> None:
        """Persist the features of input patches ``[start, end)`` (unreadable ones left out)."""
        if len(features) != len(patch_index):
            raise ValueError("features and patch_index differ in length")
        bad_rows = nonfinite_rows(features)
        if len(bad_rows):
            raise NonFiniteFeaturesError(
                f"{self.final_path.name}: the encoder returned non-finite values (NaN or inf) for {len(bad_rows)} of "
                f"{len(features)} patches in patches {start}-{end} (patch rows {_preview_rows(patch_index[bad_rows])}); "
                "the chunk was not written. Check the encoder weights and --precision (fp16 overflows on some "
                "models; use bf16 or fp32)")
        from wsi_mil.io.atomic import check_space

        check_space(self.parts_dir, 2 * features.nbytes + 16 * len(patch_index), f"features of patches {start}-{end}")
        final = self.parts_dir / f"chunk-{start:010d}-{end:010d}.npz"
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, features=features.astype(np.float32, copy=False), patch_index=patch_index.astype(np.int64),
                     bad=np.frombuffer(json.dumps(bad).encode(), dtype=np.uint8))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    # -- assembly ---------------------------------------------------------------------------
    def finish(self, coords: npt.NDArray[np.int64], clam_attrs: Mapping[str, Any],
               attrs: Mapping[str, Any]) -> tuple[Path, int, list[dict[str, Any]]]:
        """Assemble all chunks into the final store (atomically).

        Returns:
            The store, its number of feature rows, and the unreadable patches.
        """
        done = self._done_until()
        if done != self.n_total:
            raise StoreError(f"{self.final_path}: chunks cover {done} of {self.n_total} patches")
        parts, indices, bad = [], [], []
        for _, _, p in self._parts():
            with np.load(p) as z:
                indices.append(z["patch_index"])
                bad += json.loads(z["bad"].tobytes().decode() or "[]")
            parts.append(p)
        all_index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        n_rows, dim = len(all_index), int(self.meta["dim"])
        tmp = self.final_path.with_name(self.final_path.name + PARTIAL)
        _remove(tmp)
        chunk_rows = max(1, min(n_rows, (1 << 22) // (4 * dim)))  # about 4 MB per chunk
        if self.fmt == "h5":
            import h5py

            root: Any = h5py.File(tmp, "w")
            feats = root.create_dataset("features", shape=(n_rows, dim), dtype=np.float32,
                                        chunks=(chunk_rows, dim) if n_rows else None)
            index = root.create_dataset("patch_index", shape=(n_rows,), dtype=np.int64)
        else:
            import zarr

            root = zarr.open_group(str(tmp), mode="w")
            feats = root.create_array("features", shape=(n_rows, dim), dtype=np.float32, chunks=(chunk_rows, dim))
            index = root.create_array("patch_index", shape=(n_rows,), dtype=np.int64, chunks=(max(1, n_rows),))
        try:
            row = 0
            for p, idx in zip(parts, indices, strict=True):
                if len(idx):
                    with np.load(p) as z:
                        feats[row:row + len(idx)] = z["features"]
                    row += len(idx)
            if n_rows:
                index[...] = all_index
            kept = np.asarray(coords, dtype=np.int64)[all_index].reshape(n_rows, 2)
            if self.fmt == "h5":
                c = root.create_dataset("coords", data=kept)
            else:
                c = root.create_array("coords", shape=kept.shape, dtype=np.int64, chunks=(max(1, n_rows), 2))
                if n_rows:
                    c[...] = kept
            for key, value in clam_attrs.items():
                c.attrs[key] = _attr_value(value)
            for key, value in {**self.meta, **attrs, "n_features": n_rows, "n_unreadable": len(bad),
                               "unreadable_patches": bad, "complete": True}.items():
                root.attrs[key] = _attr_value(value)
        finally:
            if self.fmt == "h5":
                root.close()
        _remove(self.final_path)
        os.replace(tmp, self.final_path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.final_path, n_rows, bad


class FeatureStore(PatchStore):
    """Read access to a finished feature store."""

    @property
    def features(self) -> npt.NDArray[np.float32]:
        return np.asarray(self._root["features"][...], dtype=np.float32)

    @property
    def patch_index(self) -> npt.NDArray[np.int64]:
        return np.asarray(self._root["patch_index"][...], dtype=np.int64)

    @property
    def dim(self) -> int:
        return int(self._root["features"].shape[1])

    def __len__(self) -> int:
        return int(self._root["features"].shape[0])
