"""Patch polygons as a GeoJSON FeatureCollection in QuPath's import format.

Coordinates are level-0 pixels with the origin at the slide's top-left (QuPath's
convention); each feature is a closed square ring. ``properties`` carry QuPath's
``objectType`` (``tile``: QuPath shows them as tiles and can colour them by any
measurement, Measure › Show measurement maps) and ``measurements`` as a name → number
map (QuPath ≥ 0.4). File › Import objects (or drag and drop) loads it onto the slide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.viz.scores import Scores


def patch_features(coords: npt.NDArray[np.int64], extent_px: float, scores: Scores, raw: npt.NDArray[np.floating],
                   *, probability: dict[str, float], index: npt.NDArray[np.int64] | None = None
                   ) -> list[dict[str, Any]]:
    """One GeoJSON Feature per patch (those in ``index``, all by default), highest score first."""
    order = np.argsort(-scores.unit, kind="stable") if index is None else np.asarray(index)
    rank = np.empty(len(scores.unit), np.int64)
    rank[np.argsort(-scores.unit, kind="stable")] = np.arange(1, len(scores.unit) + 1)
    e = float(extent_px)
    feats = []
    for i in order:
        x, y = float(coords[i][0]), float(coords[i][1])
        measurements = {f"attention ({scores.method})": _num(scores.value[i]), "attention (stored)": _num(raw[i]),
                        "attention rank": int(rank[i])}
        measurements.update({f"slide probability ({k})": _num(v) for k, v in probability.items()})
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + e, y], [x + e, y + e], [x, y + e], [x, y]]]},
            "properties": {"objectType": "tile", "isLocked": True, "name": f"patch {int(i)}",
                           "measurements": measurements},
        })
    return feats


def _num(v: Any) -> float:
    f = float(v)
    return f if math.isfinite(f) else 0.0


def write_geojson(path: Path, features: list[dict[str, Any]]) -> Path:
    """Write a FeatureCollection atomically (compact; large slides give large files)."""
    from wsi_mil.io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh, separators=(",", ":"))
    return path
