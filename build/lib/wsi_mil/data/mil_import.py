"""Classic MIL benchmark sets -> the project's bag format.

MUSK1 and the UCSB breast-cancer bags come as CSV (column 0 bag label, column 1 bag id,
then the instance features); Fox and Elephant as NPZ (``X``, ``bag_id`` per instance,
``bag_ids``, ``bag_label``). ``load_classic`` returns in-memory bags; ``import_classic``
writes one feature store per bag (``features``, ``coords`` = instance index, attributes
marking the source) and a manifest, so ``wsi-mil train-mil`` runs on them unchanged.
Features are standardised with the statistics of the whole set only when asked (the
protocol of Ilse et al. uses them as given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_mil.data.bags import Bag
from wsi_mil.data.manifest import write_manifest
from wsi_mil.errors import ConfigError

CLASSIC = {"musk1": "musk1.csv", "ucsb_breast_cancer": "ucsb_breast_cancer.csv", "fox": "fox.npz", "elephant": "elephant.npz"}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(instance features, instance bag ids, bag id -> label)."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return (z["X"].astype(np.float32), z["bag_id"].astype(np.int64),
                    {int(b): int(lab) for b, lab in zip(z["bag_ids"], z["bag_label"], strict=True)})
    data = np.loadtxt(path, delimiter=",", dtype=np.float64)
    labels: dict[int, int] = {}
    for lab, bid in zip(data[:, 0].astype(int), data[:, 1].astype(int), strict=True):
        labels[int(bid)] = max(labels.get(int(bid), 0), int(lab > 0))
    return data[:, 2:].astype(np.float32), data[:, 1].astype(np.int64), labels


def load_classic(name: str, data_dir: Path) -> list[Bag]:
    if name not in CLASSIC:
        raise ConfigError(f"unknown MIL set {name!r}; choose one of {sorted(CLASSIC)}")
    x, bag_of, labels = _read(data_dir / CLASSIC[name])
    bags = []
    for bid in sorted(labels):
        idx = np.flatnonzero(bag_of == bid)
        coords = np.stack([np.arange(len(idx)), np.zeros(len(idx))], axis=1).astype(np.int64)
        sid = f"{name}-{bid:04d}"
        bags.append(Bag(sid, sid, np.asarray([float(labels[bid])], np.float32), None, features=x[idx], coords=coords))
    return bags


def import_classic(name: str, data_dir: Path, out_dir: Path, feature_space: str | None = None) -> Path:
    """Write ``out_dir/features/<bag>.h5`` and ``out_dir/manifest.csv``; returns the manifest.

    ``feature_space`` names the features' origin (recorded as the stores' encoder);
    sets sharing one (Fox and Elephant: the same 230-d Corel descriptors) can be mixed."""
    import h5py

    from wsi_mil.io.atomic import atomic_path

    feats_dir = out_dir / "features"
    feats_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for bag in load_classic(name, data_dir):
        path = feats_dir / f"{bag.slide_id}.h5"
        assert bag.features is not None and bag.coords is not None  # load_classic's bags are held in memory
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=bag.features)
            f.create_dataset("coords", data=bag.coords)
            f.create_dataset("patch_index", data=np.arange(len(bag.coords)))
            space = f"import:{feature_space or name}"
            f.attrs.update({"encoder": space, "weights_sha256": space, "complete": True,
                            "extent_level0_px": 1.0, "source": str(data_dir / CLASSIC[name])})
        rows.append({"slide_id": bag.slide_id, "path": str(path), "patient_id": bag.patient_id, "label": int(bag.target[0])})
    return write_manifest(out_dir / "manifest.csv", rows)
