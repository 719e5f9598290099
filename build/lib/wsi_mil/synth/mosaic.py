"""The *hard* slide style: tissue laid out as a mosaic of real crops from several sources.

The easy style mirror-tiles one texture, so every slide's normal tissue is the same
1.2 mm² crop seen as a kaleidoscope and the planted tumour differs from it in colour and
sharpness: a novelty detector finds it without learning histology. Here:

* **Several real sources.** Normal tissue comes from a pool (stroma, collagen with
  vessels, adipose tissue, muscle, eosinophilic tissue and the CMU skin slide); each slide
  draws 2-3 of them, laid out in large coherent compartments (a smooth random field picks
  the source of each cell), so slides differ from each other as organs do.
* **No mirror symmetry, no repeated crops.** The plane is cut into cells of ``CELL_PX``
  level-0 pixels; the grid bends gently (a smooth warp the texture follows) and the cell
  borders wiggle. Each cell shows a crop of its source at a random offset (inside
  tissue) and one of the eight rotations / reflections, so a patch grid never lines up
  with a repeating pattern.
* **Stain per slide.** Every source is re-stained per slide: optical density is scaled
  per channel (0.8-1.2) and slightly mixed between channels, the slide gets a focus blur
  of 0-1 px and the same JPEG quality for everything.
* **Colour-matched tumour.** The tumour source is matched to the slide's normal tissue by
  Reinhard's transfer (mean and spread of each CIELAB channel over tissue pixels) before
  the slide's stain is applied, and is resampled from its own pixel size like the normal
  sources, so neither colour nor sharpness gives it away: its texture (nuclear density
  and architecture) does.

Sources carry their own pixel size (``Texture.mpp``); all are resampled to the slide's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import cast

import numpy as np
import numpy.typing as npt

from wsi_mil.synth.textures import Texture, load_texture, sample_path

CELL_PX = 160  # level-0 side of a mosaic cell (80 µm at 0.5 µm/px)
MARGIN_PX = 32  # crops are CELL_PX + 2 * MARGIN_PX: room for the wiggle of cell borders
CROP_PX = CELL_PX + 2 * MARGIN_PX
BEND = 0.35  # amplitude of the gentle bend of the cell grid (texture follows it), in cells
TISSUE_SHARE = 0.9  # a cell's crop must be at least this much tissue

#: (file in wsi_mil/sample, assumed µm per pixel) of the bundled normal and tumour sources.
NORMAL_SOURCES = (("tissue/stroma-loose.jpg", 0.5), ("tissue/stroma-cellular.jpg", 0.5),
                  ("tissue/collagen-vessel.jpg", 0.25), ("tissue/eosinophilic.jpg", 0.25),
                  ("tissue/adipose.jpg", 0.25), ("tissue/muscle-kather.jpg", 0.5),
                  ("cmu-1-small-region.svs", None))
TUMOUR_SOURCES = (("TCGA-HE-7130-01Z-00-DX1.png", 0.25), ("tissue/tumour-high-nuclei.jpg", 0.25),
                  ("tissue/tumour-kather.jpg", 0.5))


@dataclass(frozen=True)
class TexturePool:
    """Normal and tumour sources for hard-style slides."""

    normal: tuple[Texture, ...]
    tumour: tuple[Texture, ...]

    @cached_property
    def _normal_lab_moments(self) -> list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Per normal source: (tissue pixels, sum, sum of squares) of CIELAB, computed once."""
        out = []
        for t in self.normal:
            lab = _rgb_to_lab(t.rgb)[tissue_pixels(t.rgb)].astype(np.float64)
            out.append((len(lab), lab.sum(axis=0), (lab * lab).sum(axis=0)))
        return out

    def normal_colour(self, chosen: list[int]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Mean and standard deviation of each CIELAB channel over the tissue pixels of the
        ``chosen`` normal sources together (the target of the tumour's colour transfer)."""
        moments = [self._normal_lab_moments[k] for k in chosen]
        n = sum(m[0] for m in moments)
        if not n:
            return np.zeros(3, np.float32), np.full(3, 1e-3, np.float32)
        mean = cast("npt.NDArray[np.float64]", sum(m[1] for m in moments)) / n  # n > 0: a sum of arrays, not 0
        var = np.maximum(sum(m[2] for m in moments) / n - mean * mean, 0.0)
        return mean.astype(np.float32), (np.sqrt(var) + 1e-3).astype(np.float32)


@lru_cache(maxsize=1)
def default_pool() -> TexturePool:
    """The bundled sources (``wsi_mil/sample``; licences in its README)."""
    def load(name: str, mpp: float | None) -> Texture:
        return load_texture(sample_path(name), mpp=mpp, crop_to_tissue=name.endswith(".svs"))

    return TexturePool(tuple(load(n, m) for n, m in NORMAL_SOURCES), tuple(load(n, m) for n, m in TUMOUR_SOURCES))


# --------------------------------------------------------------------------- colour
def _rgb_to_lab(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    from skimage.color import rgb2lab

    return rgb2lab(rgb).astype(np.float32)


def _lab_to_rgb(lab: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    from skimage.color import lab2rgb

    return (np.clip(lab2rgb(lab), 0, 1) * 255 + 0.5).astype(np.uint8)


def tissue_pixels(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Pixels that are stained tissue, not glass (not near-white and not grey)."""
    f = rgb.astype(np.float32)
    return (f.min(axis=-1) < 215) & (f.max(axis=-1) - f.min(axis=-1) > 12)


def reinhard(rgb: npt.NDArray[np.uint8], mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """``rgb`` with the CIELAB mean and spread of its tissue moved to ``mean`` / ``std``
    (Reinhard et al. 2001); glass is left as it is."""
    lab = _rgb_to_lab(rgb)
    tissue = tissue_pixels(rgb)
    m, s = lab[tissue].mean(axis=0), lab[tissue].std(axis=0) + 1e-3
    out = lab.copy()
    out[tissue] = (lab[tissue] - m) / s * std + mean
    return _lab_to_rgb(out)


@dataclass(frozen=True)
class Stain:
    """A slide's stain: optical density ``od' = od @ mix * gain`` per channel, then blur."""

    mix: npt.NDArray[np.float32]  # (3, 3), near identity
    gain: npt.NDArray[np.float32]  # (3,)
    blur_px: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Stain:
        mix = np.eye(3, dtype=np.float32) + rng.uniform(-0.08, 0.08, size=(3, 3)).astype(np.float32) * (1 - np.eye(3, dtype=np.float32))
        return cls(mix, rng.uniform(0.8, 1.2, size=3).astype(np.float32), float(rng.uniform(0.0, 1.0)))

    def apply(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        od = -np.log((rgb.astype(np.float32) + 1) / 256)
        od = (od @ self.mix) * self.gain
        out = np.clip(256 * np.exp(-np.maximum(od, 0)) - 1, 0, 255)
        if self.blur_px > 0.05:
            from scipy import ndimage

            out = ndimage.gaussian_filter(out, sigma=(self.blur_px, self.blur_px, 0))
        return (out + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- mosaic
@dataclass
class _Source:
    """A source resampled to the slide's pixel size, its allowed crop offsets, per level."""

    levels: dict[int, npt.NDArray[np.uint8]]
    offsets: npt.NDArray[np.int64]  # (K, 2) level-0 (row, col) of allowed crops


def _prepare(texture: Texture, slide_mpp: float, stain: Stain, colour: tuple[np.ndarray, np.ndarray] | None) -> _Source:
    from PIL import Image

    rgb = texture.rgb if colour is None else reinhard(texture.rgb, *colour)
    factor = texture.mpp / slide_mpp  # level-0 px per source px
    h, w = rgb.shape[:2]
    nh, nw = max(CROP_PX, int(round(h * factor))), max(CROP_PX, int(round(w * factor)))
    base = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
    base = stain.apply(base)
    # allowed crops: CROP_PX squares (stride 8) that are nearly all tissue
    tissue = tissue_pixels(base).astype(np.float32)
    integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys, xs = np.arange(0, nh - CROP_PX + 1, 8), np.arange(0, nw - CROP_PX + 1, 8)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    c = CROP_PX
    share = (integral[yy + c, xx + c] - integral[yy, xx + c] - integral[yy + c, xx] + integral[yy, xx]) / c**2
    ok = np.argwhere(share >= TISSUE_SHARE)
    if not len(ok):  # a source without a clean crop: take the most tissue-rich ones
        ok = np.argwhere(share >= np.quantile(share, 0.9))
    offsets = np.stack([ys[ok[:, 0]], xs[ok[:, 1]]], axis=1).astype(np.int64)
    return _Source({1: base}, offsets)


def _level(src: _Source, ds: int) -> npt.NDArray[np.uint8]:
    if ds not in src.levels:
        from PIL import Image

        base = src.levels[1]
        h, w = base.shape[:2]
        src.levels[ds] = np.asarray(Image.fromarray(base).resize((max(1, w // ds), max(1, h // ds)), Image.Resampling.BOX))
    return src.levels[ds]


class MosaicTexture:
    """Normal (or tumour) tissue of one slide: cells of real crops with wavy borders.

    ``at_level(ds)`` gives an object whose ``sample(rows, cols)`` returns the RGB of level
    ``ds`` at those level pixel rows × columns, as the easy style's textures do.
    """

    def __init__(self, sources: list[_Source], *, shape_px: tuple[int, int], rng: np.random.Generator,
                 compartments: float, layout_px: int) -> None:
        from wsi_mil.synth.slide import _smooth_noise

        self.sources = sources
        self.layout_px = layout_px
        gh, gw = -(-shape_px[0] // layout_px) + 2, -(-shape_px[1] // layout_px) + 2
        # the cell grid bends gently (the texture follows: little distortion) and its
        # borders wiggle within a cell (only where a pixel's cell changes, not the texture)
        self.bend = [(BEND * CELL_PX) * _smooth_noise(rng, (gh, gw), max(2.0, 3.0 * CELL_PX / layout_px))
                     for _ in range(2)]
        self.wiggle = [np.clip(0.4 * MARGIN_PX * _smooth_noise(rng, (gh, gw), max(1.0, 0.5 * CELL_PX / layout_px)),
                               -MARGIN_PX + 1, MARGIN_PX - 1) for _ in range(2)]
        # compartments: a smooth field cut into equal-area bands, one source per band
        self.compartment = _smooth_noise(rng, (gh, gw), max(2.0, compartments * CELL_PX / layout_px))
        self.edges = np.quantile(self.compartment, np.linspace(0, 1, len(sources) + 1)[1:-1])
        ch, cw = -(-shape_px[0] // CELL_PX) + 3, -(-shape_px[1] // CELL_PX) + 3
        self.cell_offset = np.stack([s.offsets[rng.integers(len(s.offsets), size=(ch, cw))] for s in sources])
        self.cell_orient = rng.integers(8, size=(ch, cw))

    def at_level(self, ds: int) -> _MosaicLevel:
        return _MosaicLevel(self, ds)


@dataclass
class _MosaicLevel:
    mosaic: MosaicTexture
    ds: int

    def sample(self, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        from wsi_mil.synth.slide import _bilinear_at

        m, ds = self.mosaic, self.ds
        ys, xs = (rows.astype(np.float64) + 0.5) * ds, (cols.astype(np.float64) + 0.5) * ds
        by = ys[:, None] + _bilinear_at(m.bend[0], ys, xs, m.layout_px) + CELL_PX
        bx = xs[None, :] + _bilinear_at(m.bend[1], ys, xs, m.layout_px) + CELL_PX
        ci = np.clip(((by + _bilinear_at(m.wiggle[0], ys, xs, m.layout_px)) // CELL_PX).astype(np.int64),
                     0, m.cell_orient.shape[0] - 1)
        cj = np.clip(((bx + _bilinear_at(m.wiggle[1], ys, xs, m.layout_px)) // CELL_PX).astype(np.int64),
                     0, m.cell_orient.shape[1] - 1)
        ly, lx = by - ci * CELL_PX + MARGIN_PX, bx - cj * CELL_PX + MARGIN_PX  # in [0, CROP_PX)
        o = m.cell_orient[ci, cj]
        ly = np.where(o & 1, CROP_PX - 1 - ly, ly)
        lx = np.where(o & 2, CROP_PX - 1 - lx, lx)
        ly, lx = np.where(o & 4, lx, ly), np.where(o & 4, ly, lx)
        ly, lx = np.clip(ly, 0, CROP_PX - 1), np.clip(lx, 0, CROP_PX - 1)
        src_of = np.searchsorted(m.edges, _bilinear_at(m.compartment, ys, xs, m.layout_px))
        out = np.empty(rows.shape + cols.shape + (3,), np.uint8)
        for k in np.unique(src_of):
            sel = src_of == k
            off = m.cell_offset[k][ci[sel], cj[sel]]
            img = _level(m.sources[k], ds)
            h, w = img.shape[:2]
            out[sel] = img[np.clip(((off[:, 0] + ly[sel]) / ds).astype(np.int64), 0, h - 1),
                           np.clip(((off[:, 1] + lx[sel]) / ds).astype(np.int64), 0, w - 1)]
        return out


def slide_textures(pool: TexturePool, *, slide_mpp: float, shape_px: tuple[int, int], rng: np.random.Generator,
                   layout_px: int, with_tumour: bool, sources: list[int] | None = None,
                   ) -> tuple[MosaicTexture, MosaicTexture | None, dict[str, object]]:
    """The normal and tumour mosaics of one slide, and what was drawn (for the slide's json).
    ``sources``: the normal sources (pool indices) when the cohort assigns them (balanced
    across classes); else drawn (the same random numbers are drawn either way)."""
    stain = Stain.draw(rng)
    n_src = int(rng.integers(2, 4))
    chosen = sorted(rng.choice(len(pool.normal), size=min(n_src, len(pool.normal)), replace=False).tolist())
    if sources is not None:
        chosen = sorted(sources)
    normal_src = [_prepare(pool.normal[k], slide_mpp, stain, None) for k in chosen]
    normal = MosaicTexture(normal_src, shape_px=shape_px, rng=rng, compartments=4.0, layout_px=layout_px)
    drawn: dict[str, object] = {"normal_sources": [pool.normal[k].name for k in chosen],
                                "stain_gain": [round(float(g), 3) for g in stain.gain], "blur_px": round(stain.blur_px, 3)}
    tumour = None
    if with_tumour:
        t = int(rng.integers(len(pool.tumour)))
        colour = pool.normal_colour(chosen)
        tumour = MosaicTexture([_prepare(pool.tumour[t], slide_mpp, stain, colour)], shape_px=shape_px, rng=rng,
                               compartments=1.0, layout_px=layout_px)
        drawn["tumour_source"] = pool.tumour[t].name
    return normal, tumour, drawn
