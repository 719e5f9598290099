"""Tissue detection on a low-resolution RGB image (thumbnail): numpy, with OpenCV for labelling.

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

import importlib
import sys
import threading
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

BoolMask = npt.NDArray[np.bool_]

#: Version of the tissue-detection method, recorded in every store. 2: the mask is a pyramid
#: level reduced by a whole factor (a 100k px slide at 0.5 µm/px: 16 µm/px, was 12.2), ink hue
#: bounds compared exactly. Stores from an earlier method stay valid caches, with a notice.
TISSUE_METHOD_VERSION = 2


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
    v = np.maximum(np.maximum(r, g), b)  # (channel-wise: a reduction over the last axis is several times slower)
    c = v - np.minimum(np.minimum(r, g), b)
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
    """Pixels that look like marker ink (green, blue, red, black): :func:`_ink`'s rules."""
    px = rgb.reshape(-1, 3)
    return _ink_and_blue(px, _ink_pair_table()[_pair_index(px)])[0].reshape(rgb.shape[:-1])


def _ink(h: npt.NDArray[np.float32], s: npt.NDArray[np.float32], v: npt.NDArray[np.float32]) -> BoolMask:
    green_blue = (h >= 65) & (h <= 250) & (s > 0.25) & (v > 0.15)
    reddish = (h >= 320) | (h <= 15)
    red = ((h >= 345) | (h <= 15)) & (s > 0.65) & (v > 0.55)
    dark_red = reddish & (s > 0.5) & (v < 0.4)  # dried/overlapping red ink; nuclei are bluer
    return green_blue | red | dark_red


def _blue_ink(h: npt.NDArray[np.float32], s: npt.NDArray[np.float32], v: npt.NDArray[np.float32]) -> BoolMask:
    """The blue part of :func:`_ink` (its hue range is apart from every other ink's)."""
    return (h >= 180) & (h <= 250) & (s > 0.25) & (v > 0.15)


#: the edge is tissue, not glass, when the interquartile range of both its brightness and its
#: saturation exceed these: glass, white or tinted, is flat (the CMU slide: 0.012 / 0.012;
#: its colours decoded wrongly: 0.008 / 0.006, and 0.24 / 0.016 with tissue on one edge);
#: its tissue cropped to the edges: 0.24-0.29 / 0.23-0.44 (0.11 / 0.21 decoded wrongly)
EDGE_TISSUE_V_SPREAD = 0.1
EDGE_TISSUE_S_SPREAD = 0.1

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
    # interquartile range of the edge's brightness and saturation: glass (white or
    # tinted by a decoding error) is flat, tissue that runs to the image's edges is not
    background_value_spread: float = 0.0
    background_saturation_spread: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def dark_background(self) -> bool:
        return self.background_value < 0.35

    @property
    def edge_is_tissue(self) -> bool:
        """The image's edge is textured like stained tissue (a crop, or a DICOM region
        exported tissue to its edges), so there is no glass there to judge colours by."""
        return (not self.dark_background and self.background_value_spread > EDGE_TISSUE_V_SPREAD
                and self.background_saturation_spread > EDGE_TISSUE_S_SPREAD)

    @property
    def background_not_glass(self) -> bool:
        return not self.dark_background and not self.edge_is_tissue and (
            self.background_value < 0.8 or self.background_saturation > 0.15)


_PRELOAD = ("h5py", "numpy.ma", "skimage.color.colorconv")  # the store's library (~0.1 s); numpy.ma, which np.unique imports
# on first use (~10-20 ms); scikit-image's colour conversions for the stain statistics (~0.2 s)


@lru_cache(maxsize=1)
def preload_imports() -> None:
    """Import what the tiler needs after the slide read (h5py for the store, numpy.ma) on a
    background thread, once per process, so the imports overlap the read (OpenSlide's
    decoding releases the GIL)."""
    missing = [name for name in _PRELOAD if name not in sys.modules]
    if missing:
        threading.Thread(target=lambda: [importlib.import_module(name) for name in missing], daemon=True,
                         name="wsi-mil-preload").start()


_STRIP_ROWS = 256  # per-pixel colour maths runs in strips so memory stays ~1 byte/pixel

# Flags of a (max, min) channel pair, from the same float32 arithmetic as :func:`_hsv`
_F_BACKGROUND, _F_STAINED, _F_DARK, _F_HUE = 1, 2, 4, 8


@lru_cache(maxsize=1)
def _pair_sv() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """HSV value and saturation of every (max, min) channel pair, indexed by ``max << 8 | min``
    (:func:`_pair_index`), in exactly :func:`_hsv`'s float32 arithmetic."""
    vals = np.arange(256, dtype=np.float32) / np.float32(255.0)
    v = np.repeat(vals, 256)  # index = max * 256 + min
    mn = np.tile(vals, 256)
    s = np.divide(v - mn, v, out=np.zeros_like(v), where=v > 0)
    s[mn > v] = 0.0  # impossible pairs (min above max) never occur
    return v, s


@lru_cache(maxsize=8)
def _pair_tables(params: TissueParams) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Saturation (uint8) and flags for every (max, min) pair of a pixel's channels.

    HSV saturation and value depend only on a pixel's largest and smallest channel, so
    two 65,536-entry tables indexed by ``max << 8 | min`` replace the per-pixel float
    maths; the table entries use exactly :func:`_hsv`'s float32 arithmetic. Hue is needed
    only where some ink rule can fire (saturation > 0.25), flagged for :func:`_classify`.
    """
    v, s = _pair_sv()
    sat = np.round(s * 255).astype(np.uint8)
    background = (v > params.background_value) & (s < params.saturation_min)
    dark = v < params.dark_value
    stained = (s > params.saturation_min) & ~background & ~dark
    hue_needed = s > 0.25  # every ink rule needs saturation above 0.25
    flags = (background * _F_BACKGROUND | stained * _F_STAINED | dark * _F_DARK | hue_needed * _F_HUE).astype(np.uint8)
    return sat, flags


# Flags of a (max, min) channel pair for the ink rules of :func:`_ink` (same float32 arithmetic)
_I_SAT25_V15, _I_SAT50_V40, _I_SAT65_V55 = 1, 2, 4


@lru_cache(maxsize=1)
def _ink_pair_table() -> npt.NDArray[np.uint8]:
    """The saturation / value conditions of the ink rules for every (max, min) pair."""
    v, s = _pair_sv()
    return (((s > 0.25) & (v > 0.15)) * _I_SAT25_V15 | ((s > 0.5) & (v < 0.4)) * _I_SAT50_V40
            | ((s > 0.65) & (v > 0.55)) * _I_SAT65_V55).astype(np.uint8)


def _pair_index(px: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint16]:
    """``max << 8 | min`` of each pixel's channels (the index of the pair tables)."""
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    idx = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    idx <<= 8
    idx |= np.minimum(np.minimum(r, g), b)
    return idx


def _ink_and_blue(px: npt.NDArray[np.uint8], pair_flags: npt.NDArray[np.uint8]) -> tuple[BoolMask, BoolMask]:
    """:func:`_ink` and :func:`_blue_ink` of (N, 3) pixels without computing hue in floats.

    Hue is a sector base ± 60° x (mid - min) / (max - min), the sector set by which channel
    is largest (ties as :func:`_hsv`: red, then green) and whether the middle one is the
    next or the previous; each hue bound of the ink rules (15, 65, 250, 320, 345°) is then a
    comparison of small integers, and the saturation / value bounds come from
    :func:`_ink_pair_table`. Equal to the float rules except exactly on a hue bound.
    """
    r, g, b = (px[:, i].astype(np.int16) for i in range(3))
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    c = mx - mn
    d = r + g + b - mx - mn - mn  # middle channel minus the smallest
    red_max = r == mx
    green_max = ~red_max & (g == mx)
    blue_max = ~red_max & ~green_max
    blue_low = blue_max & ((r < g) | (6 * d <= c))  # hue 180-250 with blue largest
    green_blue = (green_max & ((b >= r) | (12 * d <= 11 * c))) | blue_low  # hue 65-250
    blue_hue = (green_max & (b >= r) & (d >= c)) | blue_low  # hue 180-250
    near_red = red_max & (4 * d <= c)  # hue <= 15 or >= 345
    reddish = red_max & np.where(g >= b, 4 * d <= c, 3 * d <= 2 * c)  # hue <= 15 or >= 320
    sv = pair_flags & _I_SAT25_V15 > 0
    ink = (green_blue & sv) | (near_red & (pair_flags & _I_SAT65_V55 > 0)) | (reddish & (pair_flags & _I_SAT50_V40 > 0))
    return ink, blue_hue & sv


def classify_rows(rgb: npt.NDArray[np.uint8], params: TissueParams
                  ) -> tuple[npt.NDArray[np.uint8], BoolMask, BoolMask, BoolMask, BoolMask, int]:
    """Saturation (uint8) and the dark / background / ink / blue-ink masks of some image rows,
    plus the count of stained pixels, by table look-up (see :func:`_pair_tables`)."""
    sat_t, flag_t = _pair_tables(params)
    idx = _pair_index(rgb)
    sat = sat_t[idx]
    flags = flag_t[idx]
    dark = (flags & _F_DARK).astype(bool)
    background = (flags & _F_BACKGROUND).astype(bool)
    stained = int(np.count_nonzero(flags & _F_STAINED))
    ink = np.zeros(rgb.shape[:2], dtype=bool)
    blue = np.zeros(rgb.shape[:2], dtype=bool)
    if params.reject_pen:
        where = np.flatnonzero(flags & _F_HUE)
        if where.size:
            ink.ravel()[where], blue.ravel()[where] = _ink_and_blue(
                rgb.reshape(-1, 3)[where], _ink_pair_table()[idx.ravel()[where]])
    del idx
    return sat, dark, background, ink, blue, stained


class ColourClasses:
    """Per-pixel colour classes of an image (saturation and the dark / glass / ink / blue-ink
    masks, see :func:`classify_rows`), filled band by band from any thread in any order:
    the slide reader hands each band over as soon as it is decoded (``add``), so the colour
    work overlaps the decoding of the other bands."""

    def __init__(self, shape: tuple[int, int], params: TissueParams) -> None:
        self.params = params
        self.sat = np.empty(shape, dtype=np.uint8)
        self.dark = np.empty(shape, dtype=bool)
        self.background = np.empty(shape, dtype=bool)
        self.ink = np.empty(shape, dtype=bool)
        self.blue = np.empty(shape, dtype=bool)
        self._strips: list[tuple[int, int]] = []  # (rows, stained pixels) per strip: list.append is atomic
        self._edge = np.zeros(1 << 16, dtype=np.int64)  # pixel counts by (max, min) pair on the outer ring
        self._edge_lock = threading.Lock()

    def add(self, rgb: npt.NDArray[np.uint8], y0: int) -> None:
        """Classify image rows ``y0 .. y0 + len(rgb)`` (in strips: memory ~1 byte/pixel)."""
        edge = _edge_counts(rgb, y0, self.sat.shape[0])
        with self._edge_lock:
            self._edge += edge
        for a in range(0, rgb.shape[0], _STRIP_ROWS):
            rows = slice(y0 + a, y0 + min(a + _STRIP_ROWS, rgb.shape[0]))
            (self.sat[rows], self.dark[rows], self.background[rows], self.ink[rows], self.blue[rows],
             n) = classify_rows(rgb[a:a + _STRIP_ROWS], self.params)
            self._strips.append((rows.stop - rows.start, n))

    def finish(self, report: TissueReport) -> tuple[npt.NDArray[np.uint8], BoolMask, BoolMask, BoolMask]:
        """Saturation, artefact (ink / near-black), glass and ink masks; blue that is the
        slide's stain is taken back out of the ink."""
        rows_done = sum(r for r, _ in self._strips)
        if rows_done != self.sat.shape[0]:
            raise RuntimeError(f"colour classes cover {rows_done} of {self.sat.shape[0]} rows")
        params, sat, ink, blue = self.params, self.sat, self.ink, self.blue
        report.background_value, report.background_saturation = _edge_colour_from_counts(self._edge)
        report.background_value_spread, report.background_saturation_spread = _edge_spread_from_counts(self._edge)
        stained = sum(n for _, n in self._strips)
        if params.reject_pen and stained and np.count_nonzero(blue) >= BLUE_STAIN_SHARE * stained:
            # blue is the stain (Giemsa, hematoxylin-rich IHC): only blue far more saturated than it is ink
            typical = float(np.median(sat[blue])) / 255  # the stain's (a pen stroke is a minority)
            report.blue_is_stain = True
            report.blue_ink_min_saturation = max(0.6, typical + 0.2)
            report.notes.append("blue/violet is this slide's stain: only blue far more saturated than the stain "
                                f"(saturation > {report.blue_ink_min_saturation:.2f}) is rejected as pen ink")
            ink &= ~(blue & (sat <= round(report.blue_ink_min_saturation * 255)))
        del self.blue
        self.dark |= ink
        return sat, self.dark, self.background, ink


def _classify(rgb: npt.NDArray[np.uint8], params: TissueParams, pool: Executor | None = None) -> ColourClasses:
    """:class:`ColourClasses` of a whole image, strip by strip (on ``pool``'s threads when given)."""
    classes = ColourClasses(rgb.shape[:2], params)
    starts = range(0, rgb.shape[0], _STRIP_ROWS)
    if pool is not None:
        list(pool.map(lambda y: classes.add(rgb[y:y + _STRIP_ROWS], y), starts))  # list: wait, re-raise
    else:
        for y in starts:
            classes.add(rgb[y:y + _STRIP_ROWS], y)
    return classes


def _edge_counts(rgb: npt.NDArray[np.uint8], y0: int, height: int) -> npt.NDArray[np.int64]:
    """Pixel counts per (max, min) pair (:func:`_pair_index`) on the outer ring of an image
    ``height`` rows tall, from its rows ``y0 .. y0 + len(rgb)``: the top and bottom ``ring``
    rows and the left and right ``ring`` columns (corners in both, as the ring is defined;
    ``ring`` is 1/50 of the image's short side: the glass around a slide's tissue)."""
    h, w = rgb.shape[:2]
    ring = max(1, min(height, w) // 50)
    parts = [rgb[:, :ring], rgb[:, w - ring:]]
    top = min(h, max(0, ring - y0))
    bottom = max(0, y0 + h - (height - ring))
    if top:
        parts.append(rgb[:top])
    if bottom:
        parts.append(rgb[h - min(h, bottom):])
    counts = np.zeros(1 << 16, dtype=np.int64)
    for part in parts:
        counts += np.bincount(_pair_index(part).ravel(), minlength=1 << 16)
    return counts


@lru_cache(maxsize=1)
def _pair_sv_orders() -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The ascending orders of :func:`_pair_sv`'s value and saturation tables."""
    v, s = _pair_sv()
    return np.argsort(v, kind="stable"), np.argsort(s, kind="stable")


def _edge_spread_from_counts(counts: npt.NDArray[np.int64]) -> tuple[float, float]:
    """The interquartile range of brightness and saturation of the pixels counted."""
    (v, s), (v_order, s_order) = _pair_sv(), _pair_sv_orders()

    def spread(table: npt.NDArray[np.float32], order: npt.NDArray[np.intp]) -> float:
        cum = np.cumsum(counts[order])
        if cum[-1] == 0:
            return 0.0
        lo, hi = (table[order[int(np.searchsorted(cum, int(q * cum[-1]) + 1))]] for q in (0.25, 0.75))
        return float(hi - lo)

    return spread(v, v_order), spread(s, s_order)


def _median_of_table(table: npt.NDArray[np.float32], order: npt.NDArray[np.intp],
                     counts: npt.NDArray[np.int64]) -> float:
    """``np.median(table[idx])`` over pixels whose pair indices ``idx`` have ``counts``
    (``order``: ``table``'s ascending order): the middle value, or for an even count the
    mean of the two middle ones in float32, as numpy computes it."""
    cum = np.cumsum(counts[order])
    n = int(cum[-1])

    def kth(k: int) -> np.float32:  # the k-th smallest (from 0)
        return table[order[int(np.searchsorted(cum, k + 1))]]

    if n % 2:
        return float(kth(n // 2))
    return float((kth(n // 2 - 1) + kth(n // 2)) / np.float32(2))


def _edge_colour_from_counts(counts: npt.NDArray[np.int64]) -> tuple[float, float]:
    """Median brightness and saturation of the pixels counted by (max, min) pair."""
    (v, s), (v_order, s_order) = _pair_sv(), _pair_sv_orders()
    return _median_of_table(v, v_order, counts), _median_of_table(s, s_order, counts)


def otsu_threshold(counts: npt.NDArray[np.int64]) -> int:
    """Otsu's threshold of a 256-bin histogram: the bin that maximises the between-class
    variance of the two classes it splits (the same rule and ties as scikit-image's
    ``threshold_otsu(hist=...)``, without importing scikit-image's filters)."""
    counts = counts.astype(np.float64)
    centres = np.arange(counts.size, dtype=np.float64)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(counts * centres) / weight1
        mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return int(np.nanargmax(variance12))


def _otsu_clamped(sat_u8: npt.NDArray[np.uint8], where: BoolMask, params: TissueParams) -> float:
    """Otsu threshold of saturation (from its 256-bin histogram over the pixels ``where`` is
    true: OpenCV's masked histogram, no copy of the pixels), clamped to the configured range."""
    cv2 = _cv2()
    counts = cv2.calcHist([np.ascontiguousarray(sat_u8)], [0], np.ascontiguousarray(where).view(np.uint8),
                          [256], [0, 256]).ravel().astype(np.int64)
    if np.count_nonzero(counts) < 2:
        return params.saturation_max
    t = otsu_threshold(counts) / 255.0
    return float(np.clip(t, params.saturation_min, params.saturation_max))


def disk(radius: int) -> BoolMask:
    """A disk footprint: offsets (y, x) with y² + x² <= radius² (as scikit-image's ``disk``)."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2


def inner_boundary(mask: BoolMask) -> BoolMask:
    """Mask pixels with a 4-neighbour outside the mask (the image edge counts as inside),
    as scikit-image's ``find_boundaries(mask, mode="inner")``."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _cv2() -> Any:
    """OpenCV (imported on first use: the tiler needs it, most commands do not)."""
    import cv2

    return cv2


def binary_closing_disk(mask: BoolMask, radius: int) -> BoolMask:
    """Morphological closing of ``mask`` by a disk, equal to ``skimage.morphology.closing(mask,
    disk(radius))`` (borders reflected, as scipy's "reflect" mode) but several times faster:
    OpenCV's dilation and erosion of the 0/1 bytes with the same disk footprint."""
    cv2 = _cv2()
    footprint = disk(radius).astype(np.uint8)
    grown = cv2.dilate(np.ascontiguousarray(mask).view(np.uint8), footprint, borderType=cv2.BORDER_REFLECT)
    return cv2.erode(grown, footprint, borderType=cv2.BORDER_REFLECT).view(bool)


def use_threads(n: int) -> None:
    """Let OpenCV's own parallel loops (labelling, distance transform) use ``n`` threads: the
    tiler's width (1 in each single-threaded Dask worker process, where more would oversubscribe)."""
    cv2 = _cv2()
    if cv2.getNumThreads() != max(1, n):
        cv2.setNumThreads(max(1, n))


_EXACT_FLOAT32 = 1 << 24  # float32 holds every whole number up to here


@cache
def _raises_on_16_bit_overflow(version: str) -> bool:
    """Whether this OpenCV refuses a labelling that overflows 16-bit labels (4.13 and later).
    Before 4.13 its provisional labels wrap silently: a mask of 62,742 pieces came back as
    1,043 wrong ones from OpenCV 4.10 to 4.12, so those take the 32-bit labelling."""
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) >= (4, 13)


def _component_areas(mask: BoolMask, *, exact_to: int) -> tuple[npt.NDArray[np.integer[Any]], npt.NDArray[np.int64]]:
    """4-connected labels of ``mask`` (0 outside it) and each label's pixel count, exact up
    to ``exact_to`` pixels (larger counts may be off by a few, never below ``exact_to``).
    OpenCV's labelling into 16-bit labels with its (float32) histogram for the areas takes
    about half the time of its labelling with statistics, which serves masks of 65,535
    pieces or more and ``exact_to`` beyond float32's whole numbers."""
    cv2 = _cv2()
    u8 = np.ascontiguousarray(mask).view(np.uint8)
    if exact_to < _EXACT_FLOAT32 and _raises_on_16_bit_overflow(cv2.__version__):
        try:
            n, labels = cv2.connectedComponents(u8, connectivity=4, ltype=cv2.CV_16U)
        except cv2.error:  # too many pieces for 16-bit labels
            pass
        else:
            areas = cv2.calcHist([labels], [0], None, [n], [0, n]).ravel()
            return labels, np.rint(areas).astype(np.int64)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(u8, connectivity=4, ltype=cv2.CV_32S)
    return labels, stats[:, cv2.CC_STAT_AREA].astype(np.int64)


def _small_components(mask: BoolMask, max_px: int, *, exclude_border: bool = False) -> BoolMask:
    """True on the pixels of ``mask``'s 4-connected components of at most ``max_px`` pixels
    (with ``exclude_border``, only those not touching the image edge)."""
    if not mask.any():
        return np.zeros_like(mask)
    labels, areas = _component_areas(mask, exact_to=max_px + 1)
    flag = areas <= max_px
    flag[0] = False  # (label 0: the pixels outside the mask)
    if exclude_border:
        flag[labels[0]] = flag[labels[-1]] = flag[labels[:, 0]] = flag[labels[:, -1]] = False
    if not flag.any():
        return np.zeros_like(mask)
    return flag[labels]


def _mask_box(mask: BoolMask) -> tuple[slice, slice] | None:
    """The bounding box of ``mask``'s pixels (None when it has none)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _drop_small(mask: BoolMask, *, max_px: int) -> BoolMask:
    """``mask`` without its 4-connected components of ``max_px`` pixels or fewer (as
    scikit-image's ``remove_small_objects``), labelled inside the bounding box of ``mask``."""
    out = np.zeros_like(mask)
    box = _mask_box(mask)
    if box is not None:
        region = mask[box]
        out[box] = region & ~_small_components(region, max_px)
    return out


def _enclosed_small_holes(mask: BoolMask, *, max_px: int) -> BoolMask:
    """Background components (4-connected) that do not touch the image edge and have at
    most ``max_px`` pixels, labelled inside the bounding box of ``mask``: background outside
    it reaches the image edge along its row or column, so a piece touching the box's edge
    touches the image's."""
    out = np.zeros_like(mask)
    box = _mask_box(mask)
    if box is not None:
        out[box] = _small_components(~mask[box], max_px, exclude_border=True)
    return out


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
    rgb: npt.NDArray[np.uint8], *, pixel_um: float, params: TissueParams | None = None,
    pool: Executor | None = None, classes: ColourClasses | None = None, helper: Executor | None = None,
) -> tuple[BoolMask, TissueReport]:
    """:func:`tissue_mask` and a :class:`TissueReport` of how it was reached (the per-pixel
    colour work on ``pool``'s threads when one is given). ``classes``: the image's
    :class:`ColourClasses` when they were made already (while the image was read);
    ``helper``: a thread pool with a free thread, which finds the pen strokes' surroundings
    while this thread cleans up the tissue mask."""
    params = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    report = TissueReport()
    if classes is None:
        classes = _classify(rgb, params, pool)
    elif classes.params != params or classes.sat.shape != rgb.shape[:2]:
        raise ValueError("the colour classes given were made with other settings or for another image")
    sat, artefact, background, ink = classes.finish(report)
    del classes
    candidates = ~(artefact | background)
    threshold = _otsu_clamped(sat, candidates, params)
    above = sat > round(threshold * 255)
    del sat  # (arrays are dropped as soon as they are used: peak memory stays flat at ~1 byte/pixel each)
    mask = candidates & above
    del candidates
    above &= ~background  # stained: above the threshold and not glass
    del background
    n_stained = np.count_nonzero(above)
    if n_stained:
        above &= ink
        report.ink_removed_share = float(np.count_nonzero(above) / n_stained)
    del above, ink

    px_area = pixel_um * pixel_um
    near_ink: Future[BoolMask | None] | BoolMask | None = None
    if params.reject_pen and params.pen_halo_um > 0 and artefact.any():
        args = (artefact, int(params.min_ink_area_um2 / px_area), params.pen_halo_um / pixel_um)
        near_ink = helper.submit(_near_ink, *args) if helper is not None else None
        if near_ink is None:
            near_ink = _near_ink(*args)
    radius = int(round(params.closing_radius_um / pixel_um))
    if radius >= 1:
        mask = binary_closing_disk(mask, radius)
    min_px = int(params.min_tissue_area_um2 / px_area)
    if min_px > 1:
        mask = _drop_small(mask, max_px=min_px)
    hole_px = int(params.max_hole_area_um2 / px_area)
    if hole_px > 1:
        mask |= _enclosed_small_holes(mask, max_px=hole_px)
    mask &= ~artefact
    if isinstance(near_ink, Future):
        near_ink = near_ink.result()
    if near_ink is not None:
        mask = _drop_fringe(mask, near_ink)
    report.mask_fraction = float(np.count_nonzero(mask) / max(1, mask.size))
    return mask, report


def _near_ink(artefact: BoolMask, min_ink_px: int, radius_px: float) -> BoolMask | None:
    """Pixels within ``radius_px`` of a pen stroke (artefact pieces of more than
    ``min_ink_px`` pixels); None when there is no stroke."""
    ink = _drop_small(artefact, max_px=min_ink_px)
    if not ink.any():
        return None
    # exact Euclidean distance of every pixel to the nearest ink pixel
    cv2 = _cv2()
    return cv2.distanceTransform((~ink).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= radius_px


def _drop_fringe(mask: BoolMask, near_ink: BoolMask) -> BoolMask:
    """Remove tissue components lying mostly in the blurred fringe around ink strokes
    (``near_ink``: :func:`_near_ink`).

    Out-of-focus marker ink fades into pink/red pixels that look like eosin. An 8-connected
    component whose pixels are mostly near ink is that fringe; real tissue next to ink is
    kept because most of it lies farther away.
    """
    cv2 = _cv2()
    if not mask.any():
        return mask
    _, labels = cv2.connectedComponents(np.ascontiguousarray(mask).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    sizes = np.bincount(labels.ravel())
    near = np.bincount(labels.ravel(), weights=near_ink.ravel(), minlength=sizes.size)
    fringe = near >= 0.5 * np.maximum(sizes, 1)
    fringe[0] = False
    return mask & ~fringe[labels]


#: the most tissue pixels :func:`stain_statistics` reads (an even subsample beyond): the means
#: settle long before, and a 100k x 100k slide's thumbnail holds millions
STAIN_SAMPLE = 200_000


#: what :func:`stain_statistics` records (store attributes) -> the names the shortcut checks give them
STAIN_NAMES = {"stain_haematoxylin": "haematoxylin", "stain_eosin": "eosin", "tissue_lightness": "lightness",
               "tissue_a": "a* (green-red)", "tissue_b": "b* (blue-yellow)"}


def stain_statistics(rgb: npt.NDArray[np.uint8], mask: BoolMask) -> dict[str, float] | None:
    """Colour of the tissue pixels: the mean haematoxylin and eosin optical densities
    (colour deconvolution with scikit-image's ``rgb2hed``, Ruifrok & Johnston's vectors) and
    the mean CIELAB lightness, a* (green-red) and b* (blue-yellow). A site, scanner or
    staining batch whose colour differs shows here whatever the slide holds; None without
    tissue."""
    from skimage.color import rgb2hed, rgb2lab

    px = rgb[mask]
    if not len(px):
        return None
    if len(px) > STAIN_SAMPLE:
        px = px[:: int(np.ceil(len(px) / STAIN_SAMPLE))]
    unit = px[None].astype(np.float32) / 255.0
    hed, lab = rgb2hed(unit)[0], rgb2lab(unit)[0]
    return {"stain_haematoxylin": round(float(hed[:, 0].mean()), 5), "stain_eosin": round(float(hed[:, 1].mean()), 5),
            "tissue_lightness": round(float(lab[:, 0].mean()), 3), "tissue_a": round(float(lab[:, 1].mean()), 3),
            "tissue_b": round(float(lab[:, 2].mean()), 3)}
