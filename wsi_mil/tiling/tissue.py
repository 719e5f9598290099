"""Tissue detection on a low-resolution RGB image (thumbnail). Pure numpy/scikit-image.

The method, in order:

1. Background: near-white, unsaturated pixels (glass) are never tissue.
2. Artefacts: pen marks are rejected by colour (green/blue/black inks have hues that H&E
   and common IHC stains never reach at high saturation; red ink is far more saturated
   and brighter than eosin), and near-black pixels (ink, folds, dirt) are rejected.
3. Tissue: Otsu's threshold on HSV saturation over the remaining pixels, clamped to
   ``[saturation_min, saturation_max]`` so that an all-background image finds no tissue
   and an all-tissue image does not split its own stain intensities in two.
4. Clean-up: a morphological closing, removal of objects smaller than
   ``min_tissue_area_um2`` and filling of holes smaller than ``max_hole_area_um2``;
   artefact pixels are removed again after filling.

All areas and radii are physical (µm) and converted with the image's pixel size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

BoolMask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class TissueParams:
    """Tissue-detection settings. Defaults work on H&E at a mask resolution of 2–16 µm/px."""

    saturation_min: float = 0.06
    saturation_max: float = 0.15
    background_value: float = 0.88
    dark_value: float = 0.16
    reject_pen: bool = True
    closing_radius_um: float = 16.0
    min_tissue_area_um2: float = 20_000.0
    max_hole_area_um2: float = 100_000.0
    pen_halo_um: float = 100.0
    min_ink_area_um2: float = 5_000.0

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def _hsv(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float32], ...]:
    """Hue (degrees), saturation and value as float32 arrays (memory-light HSV)."""
    f = rgb.astype(np.float32) / 255.0
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    v = np.max(f, axis=-1)
    c = v - np.min(f, axis=-1)
    s = np.divide(c, v, out=np.zeros_like(v), where=v > 0)
    safe_c = np.where(c > 0, c, 1.0).astype(np.float32)
    h = np.where(
        v == r,
        np.mod((g - b) / safe_c, 6.0),
        np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0),
    ).astype(np.float32)
    h *= 60.0
    h[c == 0] = 0.0
    return h, s, v


def pen_mask(rgb: npt.NDArray[np.uint8]) -> BoolMask:
    """Pixels that look like marker ink (green, blue, red, black)."""
    return _ink(*_hsv(rgb))


def _ink(h: npt.NDArray[np.float32], s: npt.NDArray[np.float32], v: npt.NDArray[np.float32]) -> BoolMask:
    green_blue = (h >= 65) & (h <= 250) & (s > 0.25) & (v > 0.15)
    reddish = (h >= 320) | (h <= 15)
    red = ((h >= 345) | (h <= 15)) & (s > 0.65) & (v > 0.55)
    dark_red = reddish & (s > 0.5) & (v < 0.4)  # dried/overlapping red ink; nuclei are bluer
    return green_blue | red | dark_red


_STRIP_ROWS = 256  # per-pixel colour maths runs in strips so memory stays ~1 byte/pixel


def _classify(rgb: npt.NDArray[np.uint8], params: TissueParams) -> tuple[npt.NDArray[np.uint8], BoolMask, BoolMask]:
    """Saturation (uint8, 0-255), artefact (ink / near-black) and glass masks, strip by strip."""
    h = rgb.shape[0]
    sat = np.empty(rgb.shape[:2], dtype=np.uint8)
    artefact = np.empty(rgb.shape[:2], dtype=bool)
    background = np.empty(rgb.shape[:2], dtype=bool)
    for y0 in range(0, h, _STRIP_ROWS):
        strip = rgb[y0 : y0 + _STRIP_ROWS]
        hue, s, v = _hsv(strip)
        sat[y0 : y0 + _STRIP_ROWS] = np.round(s * 255).astype(np.uint8)
        art = v < params.dark_value
        if params.reject_pen:
            art |= _ink(hue, s, v)
        artefact[y0 : y0 + _STRIP_ROWS] = art
        background[y0 : y0 + _STRIP_ROWS] = (v > params.background_value) & (s < params.saturation_min)
    return sat, artefact, background


def _otsu_clamped(sat_u8: npt.NDArray[np.uint8], params: TissueParams) -> float:
    """Otsu threshold of saturation (from its 256-bin histogram), clamped to the configured range."""
    from skimage.filters import threshold_otsu

    counts = np.bincount(sat_u8, minlength=256)
    if np.count_nonzero(counts) < 2:
        return params.saturation_max
    t = float(threshold_otsu(hist=(counts, np.arange(256)))) / 255.0
    return float(np.clip(t, params.saturation_min, params.saturation_max))


def _enclosed_small_holes(mask: BoolMask, *, max_px: int) -> BoolMask:
    """Background components fully enclosed by tissue and no larger than ``max_px``."""
    from skimage import morphology
    from skimage.segmentation import clear_border

    enclosed = clear_border(~mask)  # background touching the image edge is not a hole
    return enclosed & ~morphology.remove_small_objects(enclosed, max_size=max_px)


def tissue_mask(
    rgb: npt.NDArray[np.uint8], *, pixel_um: float, params: TissueParams | None = None
) -> BoolMask:
    """Boolean tissue mask of an RGB image.

    Args:
        rgb: (H, W, 3) uint8 image, e.g. a slide thumbnail.
        pixel_um: Size of one pixel of ``rgb`` in µm (sets the morphology scale).
        params: Detection settings.

    Returns:
        (H, W) bool mask, True on tissue.
    """
    from skimage import morphology

    params = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    sat, artefact, background = _classify(rgb, params)
    candidates = ~(artefact | background)
    threshold = _otsu_clamped(sat[candidates], params)
    mask = candidates & (sat > round(threshold * 255))

    px_area = pixel_um * pixel_um
    radius = int(round(params.closing_radius_um / pixel_um))
    if radius >= 1:
        mask = morphology.closing(mask, morphology.disk(radius))
    min_px = int(params.min_tissue_area_um2 / px_area)
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px)
    hole_px = int(params.max_hole_area_um2 / px_area)
    if hole_px > 1:
        mask |= _enclosed_small_holes(mask, max_px=hole_px)
    mask &= ~artefact
    if params.reject_pen and params.pen_halo_um > 0:
        ink = morphology.remove_small_objects(artefact, max_size=int(params.min_ink_area_um2 / px_area))
        mask = _drop_ink_halo(mask, ink, radius_px=params.pen_halo_um / pixel_um)
    return mask


def _drop_ink_halo(mask: BoolMask, ink: BoolMask, *, radius_px: float) -> BoolMask:
    """Remove tissue components lying mostly in the blurred fringe around ink strokes.

    Out-of-focus marker ink fades into pink/red pixels that look like eosin. A component
    whose pixels are mostly within ``radius_px`` of ink is that fringe; real tissue next
    to ink is kept because most of it lies farther away.
    """
    from scipy import ndimage
    from skimage import measure

    if not ink.any() or not mask.any():
        return mask
    near_ink = ndimage.distance_transform_edt(~ink) <= radius_px
    labels = measure.label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    near = np.bincount(labels.ravel(), weights=near_ink.ravel(), minlength=sizes.size)
    fringe = near >= 0.5 * np.maximum(sizes, 1)
    fringe[0] = False
    return mask & ~fringe[labels]
