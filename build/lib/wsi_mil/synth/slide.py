"""Generate a realistic large pyramidal slide (tiled JPEG TIFF) from real tissue textures.

The slide is described by two smooth fields on a coarse grid (``LAYOUT_PX`` level-0 px
per cell): *tissue* (where tissue lies on the glass) and *tumour* (planted regions).
Every tile of every pyramid level is rendered on demand from those fields and from the
textures downsampled to that level, so memory stays bounded for any slide size and the
levels agree with each other. The ground-truth tumour mask is saved beside the slide.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from wsi_mil.io.atomic import atomic_path, write_json
from wsi_mil.synth.textures import Texture

if TYPE_CHECKING:
    from wsi_mil.synth.mosaic import MosaicTexture, TexturePool

logger = logging.getLogger(__name__)

LAYOUT_PX = 32
TILE_PX = 256
LEVEL_FACTOR = 4
_EDGE = 0.08  # width of the soft tissue edge in field units


@dataclass
class SlideSpec:
    """Everything that determines a generated slide (same spec, same bytes)."""

    width_px: int
    height_px: int
    mpp: float = 0.5
    seed: int = 0
    tissue_cover: float = 0.35
    n_pieces: int = 3
    tumour_regions: int = 0
    tumour_size_um: tuple[float, float] = (300.0, 1200.0)
    jpeg_quality: int = 85
    background_rgb: tuple[int, int, int] = (241, 240, 238)
    #: "easy": one normal texture mirror-tiled, per-slide stain jitter of ±7 %, tumour as it
    #: comes; "hard": a mosaic of real sources, stain per slide, colour-matched tumour
    #: (``wsi_mil.synth.mosaic``).
    style: str = "easy"
    #: a site's stain on top of the slide's own: per-channel scaling of (255 - value), so glass
    #: stays white and stained tissue shifts colour (e.g. (1.3, 0.8, 1.1): redder, darker)
    stain_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: hard style: the normal sources it shows (indices into the pool; a balanced cohort
    #: assigns them); None: drawn with the slide's seed
    normal_sources: tuple[int, ...] | None = None


def site_stain(rgb: npt.NDArray[np.uint8], gain: tuple[float, float, float]) -> npt.NDArray[np.uint8]:
    """A site's stain: each channel's (255 - value) scaled by ``gain``."""
    if tuple(gain) == (1.0, 1.0, 1.0):
        return rgb
    g = np.asarray(gain, dtype=np.float32)
    return np.clip(255 - (255 - rgb.astype(np.float32)) * g, 0, 255).astype(np.uint8)


def _stained(tiles: Any, gain: tuple[float, float, float]) -> Any:
    """:func:`site_stain` over the tiles a level is written from (as they are made)."""
    return tiles if tuple(gain) == (1.0, 1.0, 1.0) else (site_stain(t, gain) for t in tiles)


@dataclass
class SlideTruth:
    """Ground truth written beside a generated slide (``<stem>.json``)."""

    slide: str
    label: int
    mpp: float
    width_px: int
    height_px: int
    mask: str
    mask_downsample: float
    tumour_regions: list[dict[str, float]] = field(default_factory=list)
    tumour_area_mm2: float = 0.0
    tissue_area_mm2: float = 0.0
    spec: dict[str, object] = field(default_factory=dict)
    sources: dict[str, object] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> npt.NDArray[np.float32]:
    from scipy import ndimage

    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    n -= n.mean()
    return n / (n.std() + 1e-6)


def make_layout(spec: SlideSpec) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], list[dict[str, float]]]:
    """Coarse tissue and tumour fields (values > 0.5 are inside) and the tumour regions."""
    rng = np.random.default_rng(spec.seed)
    gh, gw = -(-spec.height_px // LAYOUT_PX) + 1, -(-spec.width_px // LAYOUT_PX) + 1
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    envelope = np.full((gh, gw), -np.inf, dtype=np.float32)
    scale = np.sqrt(spec.tissue_cover / spec.n_pieces / np.pi) * min(gh, gw)
    for _ in range(spec.n_pieces):  # elliptical tissue pieces with random orientation
        cy, cx = rng.uniform(0.25, 0.75) * gh, rng.uniform(0.2, 0.8) * gw
        a, b = scale * rng.uniform(0.9, 1.5), scale * rng.uniform(0.6, 1.0)
        t = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
        v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
        envelope = np.maximum(envelope, 1.0 - (u * u + v * v))
    wobble = _smooth_noise(rng, (gh, gw), sigma=max(2.0, min(gh, gw) / 40))
    tissue = (0.5 + np.maximum(envelope, -1.0) + 0.12 * wobble).astype(np.float32)

    tumour = np.zeros((gh, gw), dtype=np.float32)
    regions: list[dict[str, float]] = []
    inside = np.argwhere(tissue > 0.75)
    for _ in range(spec.tumour_regions if len(inside) else 0):
        cy, cx = inside[rng.integers(len(inside))]
        diameter_um = float(rng.uniform(*spec.tumour_size_um))
        r = diameter_um / 2 / spec.mpp / LAYOUT_PX
        angle = np.arctan2(yy - cy, xx - cx)
        k = rng.uniform(0.1, 0.25, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        radius = r * (1 + k[0] * np.sin(2 * angle + ph[0]) + k[1] * np.sin(3 * angle + ph[1]) + k[2] * np.sin(5 * angle + ph[2]))
        dist = np.hypot(yy - cy, xx - cx)
        tumour = np.maximum(tumour, np.clip(0.5 + (radius - dist) / max(r, 1.0), 0, 1).astype(np.float32))
        regions.append({"x_px": float(cx * LAYOUT_PX), "y_px": float(cy * LAYOUT_PX), "diameter_um": diameter_um})
    tumour = np.where(tissue > 0.5, tumour, 0).astype(np.float32)
    return tissue, tumour, regions


def _bilinear(field_: npt.NDArray[np.float32], ys: npt.NDArray[np.floating], xs: npt.NDArray[np.floating]
              ) -> npt.NDArray[np.float32]:
    """Sample a coarse field at level-0 pixel centres ``ys`` (rows) × ``xs`` (cols)."""
    return _bilinear_at(field_, ys, xs, LAYOUT_PX)


def _bilinear_at(field_: npt.NDArray[np.float32], ys: npt.NDArray[np.floating], xs: npt.NDArray[np.floating],
                 cell_px: float) -> npt.NDArray[np.float32]:
    """Sample a field of ``cell_px`` level-0 pixels per cell at ``ys`` (rows) × ``xs`` (cols)."""
    gy, gx = ys / cell_px, xs / cell_px
    y0 = np.clip(np.floor(gy).astype(np.int64), 0, field_.shape[0] - 2)
    x0 = np.clip(np.floor(gx).astype(np.int64), 0, field_.shape[1] - 2)
    wy = (gy - y0).astype(np.float32)[:, None]
    wx = (gx - x0).astype(np.float32)[None, :]
    f00 = field_[np.ix_(y0, x0)]
    f01 = field_[np.ix_(y0, x0 + 1)]
    f10 = field_[np.ix_(y0 + 1, x0)]
    f11 = field_[np.ix_(y0 + 1, x0 + 1)]
    # float32 throughout (numpy's stubs widen float32 arithmetic of this depth to float64)
    return cast("npt.NDArray[np.float32]", (f00 * (1 - wx) + f01 * wx) * (1 - wy) + (f10 * (1 - wx) + f11 * wx) * wy)


_PERIOD_ALIGN = 256  # texture periods are multiples of every pyramid downsample (1, 4, 16, 64, 256)


class _BaseTexture:
    """A texture mirrored (seamless), stain-jittered and scaled to level-0 pixels.

    Its sides are multiples of ``_PERIOD_ALIGN`` so every pyramid level is an exact
    integer downsample of it and the levels of a slide line up pixel for pixel.
    """

    def __init__(self, texture: Texture, *, slide_mpp: float, gain: npt.NDArray[np.float32], offset: tuple[int, int]) -> None:
        from PIL import Image

        # stain variation scales absorbance, so glass stays white
        rgb = np.clip(255 - (255 - texture.rgb.astype(np.float32)) * gain, 0, 255).astype(np.uint8)
        mirrored = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
        mirrored = np.concatenate([mirrored, mirrored[::-1]], axis=0)
        factor = slide_mpp / texture.mpp  # texture pixels per level-0 pixel
        h, w = mirrored.shape[:2]
        nh = max(_PERIOD_ALIGN, int(round(h / factor / _PERIOD_ALIGN)) * _PERIOD_ALIGN)
        nw = max(_PERIOD_ALIGN, int(round(w / factor / _PERIOD_ALIGN)) * _PERIOD_ALIGN)
        self.image = Image.fromarray(mirrored).resize((nw, nh), Image.Resampling.LANCZOS)
        self.offset = (offset[0] % nh // _PERIOD_ALIGN * _PERIOD_ALIGN, offset[1] % nw // _PERIOD_ALIGN * _PERIOD_ALIGN)

    def at_level(self, ds: int) -> _LevelTexture:
        from PIL import Image

        w, h = self.image.size
        rgb = np.asarray(self.image if ds == 1 else self.image.resize((w // ds, h // ds), Image.Resampling.BOX))
        return _LevelTexture(rgb, (self.offset[0] // ds, self.offset[1] // ds))


@dataclass
class _LevelTexture:
    rgb: npt.NDArray[np.uint8]
    offset: tuple[int, int]

    def sample(self, rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        h, w = self.rgb.shape[:2]
        return self.rgb[np.ix_((rows + self.offset[0]) % h, (cols + self.offset[1]) % w)]


def level_downsamples(width_px: int, height_px: int) -> list[int]:
    ds = [1]
    while max(width_px, height_px) / ds[-1] > 2048:
        ds.append(ds[-1] * LEVEL_FACTOR)
    return ds


def _render_level(spec: SlideSpec, tissue: npt.NDArray[np.float32], tumour: npt.NDArray[np.float32],
                  normal: Any, tumour_tex: Any, ds: int) -> Iterator[npt.NDArray[np.uint8]]:
    lw, lh = -(-spec.width_px // ds), -(-spec.height_px // ds)
    bg = np.array(spec.background_rgb, dtype=np.float32)
    blank = np.broadcast_to(np.array(spec.background_rgb, dtype=np.uint8), (TILE_PX, TILE_PX, 3))
    for ty in range(0, lh, TILE_PX):
        rows = np.arange(ty, ty + TILE_PX, dtype=np.int64)
        ys = (rows + 0.5) * ds
        for tx in range(0, lw, TILE_PX):
            cols = np.arange(tx, tx + TILE_PX, dtype=np.int64)
            xs = (cols + 0.5) * ds
            a_tissue = np.clip((_bilinear(tissue, ys, xs) - 0.5) / _EDGE + 0.5, 0, 1)
            if a_tissue.max() <= 0:
                yield blank
                continue
            rgb = normal.sample(rows, cols).astype(np.float32)
            if tumour_tex is not None:
                a_tum = np.clip((_bilinear(tumour, ys, xs) - 0.5) / 0.05 + 0.5, 0, 1)
                if a_tum.max() > 0:
                    a = a_tum[..., None]
                    rgb = rgb * (1 - a) + tumour_tex.sample(rows, cols).astype(np.float32) * a
            a = a_tissue[..., None]
            yield (rgb * a + bg * (1 - a)).astype(np.uint8)


def write_slide(path: str | Path, spec: SlideSpec, *, normal: Texture | None = None, tumour: Texture | None = None,
                pool: TexturePool | None = None) -> SlideTruth:
    """Write a pyramidal tiled JPEG TIFF that OpenSlide reads (mpp in the resolution tags).

    ``normal`` / ``tumour`` are the textures of the easy style; the hard style draws from
    ``pool`` (the bundled sources when not given).

    Writes ``<stem>.json`` (ground truth and spec) and, for slides with tumour regions,
    ``<stem>.tumour.png`` (tumour mask at ``LAYOUT_PX`` downsample) next to it.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    tissue, tumour_field, regions = make_layout(spec)
    drawn: dict[str, object] = {}
    normal_base: MosaicTexture | _BaseTexture
    tumour_base: MosaicTexture | _BaseTexture | None
    if spec.style == "hard":
        from wsi_mil.synth.mosaic import default_pool, slide_textures

        normal_base, tumour_base, drawn = slide_textures(
            pool or default_pool(), slide_mpp=spec.mpp, shape_px=(spec.height_px, spec.width_px),
            rng=np.random.default_rng(spec.seed + 104_729), layout_px=LAYOUT_PX, with_tumour=bool(regions),
            sources=None if spec.normal_sources is None else list(spec.normal_sources))
    elif spec.style == "easy":
        if normal is None:
            raise ValueError("the easy style needs a normal texture")
        if spec.tumour_regions and tumour is None:
            raise ValueError("tumour regions requested but no tumour texture given")
        rng = np.random.default_rng(spec.seed + 7919)
        gain = rng.uniform(0.93, 1.07, size=3).astype(np.float32)  # per-slide stain variation
        offsets = [(int(rng.integers(0, 1 << 20)), int(rng.integers(0, 1 << 20))) for _ in range(2)]
        normal_base = _BaseTexture(normal, slide_mpp=spec.mpp, gain=gain, offset=offsets[0])
        tumour_base, tumour_source = None, None
        if tumour is not None and regions:
            tumour_base, tumour_source = _BaseTexture(tumour, slide_mpp=spec.mpp, gain=gain, offset=offsets[1]), tumour.name
        drawn = {"normal_sources": [normal.name], "tumour_source": tumour_source}
    else:
        raise ValueError(f"slide style {spec.style!r}: choose 'easy' or 'hard'")

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, ds in enumerate(level_downsamples(spec.width_px, spec.height_px)):
            normal_l = normal_base.at_level(ds)
            tumour_l = tumour_base.at_level(ds) if tumour_base is not None else None
            shape = (-(-spec.height_px // ds), -(-spec.width_px // ds), 3)
            px_per_cm = 1e4 / (spec.mpp * ds)
            tif.write(
                _stained(_render_level(spec, tissue, tumour_field, normal_l, tumour_l, ds), spec.stain_gain),
                shape=shape, dtype=np.uint8,
                tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg",
                compressionargs={"level": spec.jpeg_quality}, subfiletype=0 if i == 0 else 1,
                resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                description=f"wsi-mil synthetic slide; mpp={spec.mpp}" if i == 0 else None,
                metadata=None, software="wsi-mil",
            )

    tumour_mask = tumour_field > 0.5
    mask_path = path.with_name(path.stem + ".tumour.png")
    with atomic_path(mask_path) as tmp:
        Image.fromarray((tumour_mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    cell_mm2 = (LAYOUT_PX * spec.mpp / 1000) ** 2
    truth = SlideTruth(
        slide=path.name, label=int(bool(regions)), mpp=spec.mpp, width_px=spec.width_px, height_px=spec.height_px,
        mask=mask_path.name, mask_downsample=float(LAYOUT_PX), tumour_regions=regions,
        tumour_area_mm2=float(tumour_mask.sum() * cell_mm2), tissue_area_mm2=float((tissue > 0.5).sum() * cell_mm2),
        spec=json.loads(json.dumps(asdict(spec))), sources=drawn,
    )
    write_json(path.with_name(path.stem + ".json"), asdict(truth))
    return truth


def read_truth_mask(slide_path: str | Path) -> tuple[npt.NDArray[np.bool_], float]:
    """The ground-truth tumour mask of a generated slide and its downsample to level 0."""
    from PIL import Image

    slide_path = Path(slide_path)
    meta = json.loads(slide_path.with_name(slide_path.stem + ".json").read_text())
    mask = np.asarray(Image.open(slide_path.with_name(meta["mask"]))) > 127
    return mask, float(meta["mask_downsample"])
