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

Pen rejection never takes the slide's own stain for ink: when blue/violet "ink" colours
hold most of the stained pixels (Giemsa, hematoxylin-rich IHC), blue is the stain, and
only blue pixels clearly more saturated than it are treated as ink. :func:`inspect_tissue`
returns the mask with what the caller needs to explain it: how much candidate tissue pen
rejection removed, whether the background is dark (fluorescence / dark field) or not
white glass, and the share of the image the mask covers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


def _blue_ink(h: npt.NDArray[np.float32], s: npt.NDArray[np.float32], v: npt.NDArray[np.float32]) -> BoolMask:
    """The blue part of :func:`_ink` (its hue range is apart from every other ink's)."""
    return (h >= 180) & (h <= 250) & (s > 0.25) & (v > 0.15)


#: blue counts as the slide's stain when blue "ink" pixels are at least this share of the stained pixels
BLUE_STAIN_SHARE = 0.5


@dataclass
class TissueReport:
    """What :func:`inspect_tissue` saw, for messages and provenance."""

    mask_fraction: float = 0.0  # share of the image the final mask covers
    ink_removed_share: float = 0.0  # share of the stained candidate pixels that pen rejection removed
    blue_is_stain: bool = False
    blue_ink_min_saturation: float = 0.25
    background_value: float = 1.0  # median brightness of the image's edge (glass on a slide)
    background_saturation: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def dark_background(self) -> bool:
        return self.background_value < 0.35

    @property
    def background_not_glass(self) -> bool:
        return not self.dark_background and (self.background_value < 0.8 or self.background_saturation > 0.15)


_STRIP_ROWS = 256  # per-pixel colour maths runs in strips so memory stays ~1 byte/pixel


def _classify(rgb: npt.NDArray[np.uint8], params: TissueParams,
              report: TissueReport) -> tuple[npt.NDArray[np.uint8], BoolMask, BoolMask, BoolMask]:
    """Saturation (uint8, 0-255), artefact (ink / near-black), glass and ink masks, strip
    by strip (one HSV pass); blue that is the slide's stain is taken back out of the ink."""
    h = rgb.shape[0]
    sat = np.empty(rgb.shape[:2], dtype=np.uint8)
    dark = np.empty(rgb.shape[:2], dtype=bool)
    background = np.empty(rgb.shape[:2], dtype=bool)
    ink = np.zeros(rgb.shape[:2], dtype=bool)
    blue = np.zeros(rgb.shape[:2], dtype=bool)
    stained = 0
    for y0 in range(0, h, _STRIP_ROWS):
        rows = slice(y0, y0 + _STRIP_ROWS)
        hue, s, v = _hsv(rgb[rows])
        sat[rows] = np.round(s * 255).astype(np.uint8)
        dark[rows] = v < params.dark_value
        background[rows] = (v > params.background_value) & (s < params.saturation_min)
        stained += int(((s > params.saturation_min) & ~background[rows] & ~dark[rows]).sum())
        if params.reject_pen:
            ink[rows] = _ink(hue, s, v)
            blue[rows] = _blue_ink(hue, s, v)
    if params.reject_pen and stained and blue.sum() >= BLUE_STAIN_SHARE * stained:
        # blue is the stain (Giemsa, hematoxylin-rich IHC): only blue far more saturated than it is ink
        typical = float(np.median(sat[blue])) / 255  # the stain's (a pen stroke is a minority)
        report.blue_is_stain = True
        report.blue_ink_min_saturation = max(0.6, typical + 0.2)
        report.notes.append("blue/violet is this slide's stain: only blue far more saturated than the stain "
                            f"(saturation > {report.blue_ink_min_saturation:.2f}) is rejected as pen ink")
        ink &= ~(blue & (sat <= round(report.blue_ink_min_saturation * 255)))
    return sat, dark | ink, background, ink


def _edge_colour(rgb: npt.NDArray[np.uint8]) -> tuple[float, float]:
    """Median brightness and saturation of the image's outer ring (the glass of a slide)."""
    ring = max(1, min(rgb.shape[0], rgb.shape[1]) // 50)
    edge = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                           rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    _, s, v = _hsv(edge[None])
    return float(np.median(v)), float(np.median(s))


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
    return inspect_tissue(rgb, pixel_um=pixel_um, params=params)[0]


def inspect_tissue(
    rgb: npt.NDArray[np.uint8], *, pixel_um: float, params: TissueParams | None = None
) -> tuple[BoolMask, TissueReport]:
    """:func:`tissue_mask` and a :class:`TissueReport` of how it was reached."""
    from skimage import morphology

    params = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    report = TissueReport()
    report.background_value, report.background_saturation = _edge_colour(rgb)
    sat, artefact, background, ink = _classify(rgb, params, report)
    candidates = ~(artefact | background)
    threshold = _otsu_clamped(sat[candidates], params)
    mask = candidates & (sat > round(threshold * 255))
    stained = ~background & (sat > round(threshold * 255))
    if stained.any():
        report.ink_removed_share = float((stained & ink).sum() / stained.sum())

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
    report.mask_fraction = float(mask.mean())
    return mask, report


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
