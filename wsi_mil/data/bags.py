"""Bags for MIL: slide labels from a manifest joined with the feature stores.

A bag is one slide: its instance features (N, D), their level-0 coordinates, and its
target. The task is inferred from the manifest's label columns unless given:

* one ``label`` column with two values -> **binary** (one logit; the positive class is
  ``1``/``true``/``yes``/``positive`` or, for other values, the second in sorted order);
* one ``label`` column with more values -> **multi-class** (softmax over the classes);
* several ``label_<name>`` columns of 0/1 -> **multi-label** (one sigmoid per label).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from wsi_mil.data.manifest import SlideEntry
from wsi_mil.errors import ConfigError, ManifestError, StoreError

TASKS = ("auto", "binary", "multiclass", "multilabel")
_POSITIVE = {"1", "true", "yes", "positive", "pos", "tumour", "tumor"}
_NEGATIVE = {"0", "false", "no", "negative", "neg", "normal"}


@dataclass(frozen=True)
class Task:
    """What is predicted: ``kind`` and the names of the outputs (one per logit)."""

    kind: str
    outputs: tuple[str, ...]
    label_columns: tuple[str, ...]
    classes: tuple[str, ...] = ()  # label values: (negative, positive) for binary, the classes for multi-class

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def target(self, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        """The float target vector of one slide (one-hot for multi-class)."""
        if self.kind == "multilabel":
            out = []
            for col in self.label_columns:
                v = labels.get(col, "").strip().lower()
                if v not in _POSITIVE | _NEGATIVE:
                    raise ManifestError(f"{where}: {col}={labels.get(col)!r}; multi-label columns take 0 or 1")
                out.append(1.0 if v in _POSITIVE else 0.0)
            return np.asarray(out, np.float32)
        value = labels.get(self.label_columns[0], "").strip()
        if value not in self.classes:
            raise ManifestError(f"{where}: label {value!r} is not one of {list(self.classes)}")
        if self.kind == "binary":
            return np.asarray([float(value == self.classes[1])], np.float32)
        onehot = np.zeros(len(self.classes), np.float32)
        onehot[self.classes.index(value)] = 1.0
        return onehot

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "outputs": list(self.outputs), "label_columns": list(self.label_columns),
                "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(d["kind"], tuple(d["outputs"]), tuple(d["label_columns"]), tuple(d.get("classes", ())))


def infer_task(entries: list[SlideEntry], kind: str = "auto", label: str | None = None) -> Task:
    """The task of a labelled manifest (see the module docstring)."""
    if kind not in TASKS:
        raise ConfigError(f"task {kind!r}: choose one of {list(TASKS)}")
    columns = sorted({c for e in entries for c in e.labels})
    if label:
        if label not in columns:
            raise ManifestError(f"label column {label!r} not in the manifest; it has {columns or 'no label columns'}")
        columns = [label]
    if not columns:
        raise ManifestError("the manifest has no label column; add 'label' (or 'label_<name>' columns) to train")
    unlabelled = [e.slide_id for e in entries if any(not e.labels.get(c, "").strip() for c in columns)]
    if unlabelled:
        raise ManifestError(f"{len(unlabelled)} slide(s) have no label ({', '.join(unlabelled[:5])}); "
                            "label them or leave them out of the manifest")
    if kind == "auto":
        kind = "multilabel" if len(columns) > 1 else ("binary" if len({e.labels[columns[0]] for e in entries}) <= 2 else "multiclass")
    if kind == "multilabel":
        names = tuple(c.removeprefix("label_") for c in columns)
        return Task("multilabel", names, tuple(columns))
    if len(columns) > 1:
        raise ManifestError(f"a {kind} task needs one label column; the manifest has {columns} (pick one with --label)")
    values = sorted({e.labels[columns[0]].strip() for e in entries})
    if kind == "binary":
        if len(values) > 2:
            raise ManifestError(f"binary task but label has {len(values)} values {values[:6]}")
        pos = [v for v in values if v.lower() in _POSITIVE]
        neg = [v for v in values if v != (pos[0] if pos else None)]
        if len(values) == 1:  # a cohort with one class cannot be trained, but say so clearly
            raise ManifestError(f"every slide has label {values[0]!r}; a classifier needs both classes")
        classes = (neg[0], pos[0]) if pos else (values[0], values[1])
        return Task("binary", (classes[1],), (columns[0],), classes)
    return Task("multiclass", tuple(values), (columns[0],), tuple(values))


@dataclass
class Bag:
    slide_id: str
    patient_id: str
    target: npt.NDArray[np.float32]
    store: Path | None
    split: str | None = None
    features: npt.NDArray[np.float32] | None = None
    coords: npt.NDArray[np.int64] | None = None
    step_px: float = 1.0  # tiling grid step, level-0 px (positions for coordinate-aware models)
    meta: dict[str, Any] = field(default_factory=dict)
    extent_px: float = 1.0  # patch side, level-0 px (what a heatmap draws)

    def load(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(features, level-0 coords); read from the store unless held in memory."""
        if self.features is not None and self.coords is not None:
            return self.features, self.coords
        if self.store is None:
            raise StoreError(f"{self.slide_id}: no feature store")
        from wsi_mil.io.features import FeatureStore

        with FeatureStore(self.store) as fs:
            return fs.features, fs.coords

    def cache(self) -> Bag:
        self.features, self.coords = self.load()
        return self

    @property
    def label_index(self) -> int:
        """Class index (multi-class) or the binary label; -1 for multi-label."""
        if len(self.target) == 1:
            return int(self.target[0] > 0.5)
        return int(np.argmax(self.target)) if abs(self.target.sum() - 1) < 1e-6 else -1


def find_feature_store(features: Path, slide_id: str) -> Path | None:
    for suffix in (".h5", ".zarr"):
        p = features / f"{slide_id}{suffix}"
        if p.exists():
            return p
    return None


def feature_store_attrs(store: Path) -> dict[str, Any] | None:
    """Root attributes of a finished feature store (one open), or None when the store is
    incomplete, unreadable or holds no features."""
    from wsi_mil.io.features import FeatureStore

    try:
        with FeatureStore(store) as fs:
            attrs = fs.attrs
            has_features = "features" in fs._root
    except Exception:  # noqa: BLE001 - a damaged store is reported as missing
        return None
    return attrs if attrs.get("complete") is True and has_features else None


def source_patch_store_attrs(feature_attrs: dict[str, Any]) -> dict[str, Any]:
    """Root attributes of the patch store a feature store was made from ({} when it is gone
    or unreadable)."""
    from wsi_mil.io.store import PatchStore

    source = Path(str(feature_attrs.get("source_store") or ""))
    if not feature_attrs.get("source_store") or not source.exists():
        return {}
    try:
        with PatchStore(source) as ps:
            return ps.attrs
    except Exception:  # noqa: BLE001 - callers treat a damaged store as missing
        return {}


def patch_geometry(attrs: dict[str, Any]) -> tuple[float, float]:
    """(patch extent, grid step) in level-0 px of a feature store. Stores written before
    these were recorded are resolved through their source patch store; bags without
    geometry (imported classic MIL sets) get 1.0."""
    extent, step = attrs.get("extent_level0_px"), attrs.get("step_level0_px")
    if extent is None:
        from wsi_mil.tiling.grid import PatchGeometry

        pattrs = source_patch_store_attrs(attrs)
        if pattrs.get("extent_level0_px") is not None:
            geometry = PatchGeometry.from_store_attrs(pattrs)
            extent, step = geometry.extent_level0_px, geometry.step_level0_px
    extent_f = float(extent) if extent else 1.0
    return extent_f, float(step) if step else extent_f


def attention_patch_extent(attrs: dict[str, Any]) -> float:
    """The patch side (level-0 px) of an attention store; stores from before it was
    recorded correctly (1.0) are resolved through their feature and patch stores."""
    extent = float(attrs.get("patch_extent_level0_px") or 0.0)
    if extent > 1.0:
        return extent
    store = Path(str(attrs.get("feature_store", "")))
    fattrs = feature_store_attrs(store) if store.exists() else None
    if fattrs:
        extent = patch_geometry(fattrs)[0]
        if extent > 1.0:
            return extent
    raise StoreError(f"the attention store of {attrs.get('slide_id')} does not say how large its patches are, and "
                      f"its feature store {store} cannot tell either; re-run train-mil or predict")


def bags_from_manifest(entries: list[SlideEntry], features_dirs: list[Path], task: Task,
                       split_column: dict[str, str] | None = None) -> tuple[list[Bag], list[dict[str, str]]]:
    """Bags of every manifest slide whose feature store exists (its attributes kept in
    ``Bag.meta``); the others are returned as problems (slide_id, reason) so the run can
    report them instead of dying."""
    bags: list[Bag] = []
    missing: list[dict[str, str]] = []
    for e in entries:
        store = next((s for d in features_dirs if (s := find_feature_store(d, e.slide_id))), None)
        if store is None:
            missing.append({"slide_id": e.slide_id, "reason": f"no feature store {e.slide_id}.h5/.zarr in "
                            f"{', '.join(map(str, features_dirs))}; run wsi-mil extract-features"})
            continue
        attrs = feature_store_attrs(store)
        if attrs is None:
            missing.append({"slide_id": e.slide_id, "reason": f"{store} is incomplete or not a feature store; re-run extract-features"})
            continue
        extent, step = patch_geometry(attrs)
        bags.append(Bag(e.slide_id, e.patient_id or e.slide_id, task.target(e.labels, f"slide {e.slide_id}"), store,
                        (split_column or {}).get(e.slide_id), step_px=step, meta=attrs, extent_px=extent))
    return bags, missing


def collate(items: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(features (n, D), coords (n, 2) in patch units, target (C,))] -> padded
    x (B, N, D), mask (B, N), coords (B, N, 2), targets (B, C)."""
    n = max(1, max(len(f) for f, _, _ in items))
    d = items[0][0].shape[1]
    x = torch.zeros(len(items), n, d)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    coords = torch.zeros(len(items), n, 2)
    for i, (f, c, _) in enumerate(items):
        x[i, :len(f)] = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
        coords[i, :len(f)] = torch.from_numpy(np.asarray(c, np.float32))
        mask[i, :len(f)] = True
    y = torch.from_numpy(np.stack([t for _, _, t in items]).astype(np.float32))
    return x, mask, coords, y


def bag_item(bag: Bag, max_instances: int | None, rng: np.random.Generator | None
             ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One bag as (features, coords in patch units, target); a random subset of at most
    ``max_instances`` instances when training."""
    feats, coords = bag.load()
    if max_instances and len(feats) > max_instances and rng is not None:
        keep = np.sort(rng.choice(len(feats), max_instances, replace=False))
        feats, coords = feats[keep], coords[keep]
    return feats, np.asarray(coords, np.float32) / bag.step_px, bag.target
