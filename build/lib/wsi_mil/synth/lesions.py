"""Synthetic lesions planted in real radiographs at known places, for testing that
class-activation maps land on the evidence and for scoring weak localisation.

A lesion is a soft-edged round opacity (brighter, as denser tissue is on a radiograph):
a raised-cosine disc of radius ``r`` whose amplitude is a share of the image's dynamic
range, with a little texture so it is not a flat stamp. Its ground-truth box is the disc's
bounding box.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def plant_lesion(img: npt.NDArray[np.float32], rng: np.random.Generator, *, radius_frac: tuple[float, float] = (0.07, 0.11),
                 amplitude: tuple[float, float] = (0.35, 0.5), margin_frac: float = 0.18
                 ) -> tuple[npt.NDArray[np.float32], dict[str, float]]:
    """``img`` (H, W) in [0, 1] with one lesion; returns the image and its box (x0, y0, x1, y1)."""
    h, w = img.shape
    r = float(rng.uniform(*radius_frac)) * min(h, w)
    m = margin_frac * min(h, w)
    cx, cy = float(rng.uniform(m + r, w - m - r)), float(rng.uniform(m + r, h - m - r))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    profile = np.where(d < 1, 0.5 * (1 + np.cos(np.pi * d)), 0.0).astype(np.float32)
    texture = 1 + 0.15 * rng.standard_normal((h, w)).astype(np.float32)
    out = np.clip(img + float(rng.uniform(*amplitude)) * profile * texture, 0, 1).astype(np.float32)
    box = {"x0": max(0.0, cx - r), "y0": max(0.0, cy - r), "x1": min(float(w), cx + r), "y1": min(float(h), cy + r)}
    return out, box


def planted_cohort(images: list[npt.NDArray[np.float32]], rng: np.random.Generator, share: float = 0.5,
                   **kw: Any) -> tuple[list[npt.NDArray[np.float32]], list[int], list[dict[str, float] | None]]:
    """A lesion planted in a random ``share`` of the images: (images, labels, boxes)."""
    out: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    boxes: list[dict[str, float] | None] = []
    for img in images:
        if rng.random() < share:
            new, box = plant_lesion(img, rng, **kw)
            out.append(new)
            labels.append(1)
            boxes.append(box)
        else:
            out.append(img.astype(np.float32))
            labels.append(0)
            boxes.append(None)
    return out, labels, boxes
