"""Per-slide attention stores written by ``train-mil`` and ``predict`` (read by heatmaps).

``<slide_id>.h5``: ``coords`` (N, 2) level-0 px, ``attention`` (N,) the model's instance
scores (normalised attention for attention models); attributes: slide_id, probability
per output, prediction, model, fold, split, source feature store and the patch side in
level-0 pixels (``patch_extent_level0_px``). Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def write_attention(path: Path, *, coords: npt.NDArray[np.int64], attention: npt.NDArray[np.float32],
                    attrs: dict[str, Any], contribution: npt.NDArray[np.float32] | None = None,
                    contribution_unit: str = "logit") -> Path:
    """One slide's attention store; ``contribution`` (N, C): each patch's share of each output (models
    with an additive readout), in ``contribution_unit``."""
    import h5py

    from wsi_mil.io.atomic import atomic_path

    check_finite_attention(path.stem, attention, attrs.get("probability"))
    if contribution is not None:
        check_finite_attention(path.stem, contribution, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        f.create_dataset("attention", data=np.asarray(attention, dtype=np.float32))
        if contribution is not None:
            f.create_dataset("contribution", data=np.asarray(contribution, dtype=np.float32).reshape(len(attention), -1))
            f.attrs["contribution_unit"] = contribution_unit
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) or v is None else v
    return path


def check_finite_attention(name: str, attention: npt.ArrayLike, probability: Any) -> None:
    """No NaN or infinite attention or probability is ever written or drawn."""
    from wsi_mil.errors import NonFiniteFeaturesError

    att = np.asarray(attention, dtype=float)
    prob = np.asarray(probability if probability is not None else [], dtype=float)
    if not np.isfinite(att).all() or not np.isfinite(prob).all():
        raise NonFiniteFeaturesError(
            f"{name}: non-finite attention ({int((~np.isfinite(att)).sum())} of {att.size} values) or probability "
            f"{prob.tolist()}; nothing is drawn from it. Check the slide's features and re-run train-mil or predict")


def read_attention(path: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], dict[str, Any]]:
    from wsi_mil.io.store import open_h5

    with open_h5(path) as f:
        return f["coords"][...], f["attention"][...], {k: _attr(v) for k, v in f.attrs.items()}


def out_of_fold_stores(run_dir: Path) -> dict[str, Path]:
    """slide_id → the attention store of a train-mil run whose model did not train on that
    slide: the fold ensemble's for held-out test slides, otherwise the fold in which the
    slide was validation. Empty when the run has no ``attention/`` folder."""
    root = run_dir / "attention"
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for h5 in sorted((root / "ensemble").glob("*.h5")):
        found[h5.stem] = h5
    for fold in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "ensemble"):
        for h5 in sorted(fold.glob("*.h5")):
            if h5.stem not in found and read_attention_attrs(h5).get("split") == "val":
                found[h5.stem] = h5
    return found


def read_contribution(path: Path) -> npt.NDArray[np.float32] | None:
    """Each patch's share of each output (N, C), or None when the store has none (a model without an additive
    readout, or a store written before wsi-mil kept them)."""
    from wsi_mil.io.store import open_h5

    with open_h5(path) as f:
        return f["contribution"][...] if "contribution" in f else None


def read_attention_attrs(path: Path) -> dict[str, Any]:
    """Only the attributes of an attention store (cheap: no arrays read)."""
    from wsi_mil.io.store import open_h5

    with open_h5(path) as f:
        return {k: _attr(v) for k, v in f.attrs.items()}


def _attr(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v
