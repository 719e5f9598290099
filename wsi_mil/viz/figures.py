"""The two PNG exports: the heatmap over the slide thumbnail, and the top/bottom patch gallery.

Both are drawn from the slide's pyramid levels only (never its label or macro image)
and saved without any of the slide's metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from wsi_mil.viz.raster import ScoreGrid, colourise
from wsi_mil.viz.scores import Scores


def _figure_module():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    from wsi_mil.io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": "wsi-mil"})
    _figure_module().close(fig)
    return path


def grid_on_thumbnail(grid: ScoreGrid, thumb_shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """The score grid resampled (nearest) onto a thumbnail of the whole slide."""
    th, tw = thumb_shape
    xs = (np.arange(tw) + 0.5) * grid.slide_width_px / tw
    ys = (np.arange(th) + 0.5) * grid.slide_height_px / th
    cols, _ = grid.cell_index(xs, np.zeros(1))
    _, rows = grid.cell_index(np.zeros(1), ys)
    out = grid.values[np.clip(rows, 0, None)][:, np.clip(cols, 0, None)]
    out[(rows < 0)[:, None] | (cols < 0)[None, :]] = np.nan
    return out


def overlay_png(path: Path, thumbnail: npt.NDArray[np.uint8], grid: ScoreGrid, scores: Scores, *, cmap: str,
                title: str, opacity: float = 0.5, banner: str = "", positive: bool | None = None) -> Path:
    """Thumbnail with the heatmap blended where patches were scored, a colour bar in the
    normalisation's units, the slide's prediction in the title and its call in a banner
    (red for a positive call, grey for a negative one)."""
    plt = _figure_module()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    on = grid_on_thumbnail(grid, thumbnail.shape[:2])
    rgb = colourise(on, cmap).astype(np.float32)
    a = np.where(np.isfinite(on), opacity, 0.0)[..., None]
    blend = (thumbnail.astype(np.float32) * (1 - a) + rgb * a).round().astype(np.uint8)
    h, w = blend.shape[:2]
    fig_w = 12.0
    extra = 0.8 if banner else 0.0  # room for the banner's two lines over the heatmap panel
    fig, axes = plt.subplots(1, 2, figsize=(fig_w, fig_w / 2 * h / w + 1.4 + extra), layout="constrained")
    for ax, img, sub in ((axes[0], thumbnail, "tissue"), (axes[1], blend, "attention")):
        ax.imshow(img)
        ax.set_title(sub, fontsize=10)
        ax.set_axis_off()
    sm = ScalarMappable(norm=Normalize(scores.vmin, scores.vmax), cmap=cmap)
    bar = fig.colorbar(sm, ax=axes, orientation="horizontal", fraction=0.05, aspect=50)
    bar.set_label(scores.description, fontsize=9)
    fig.suptitle(title, fontsize=11)
    if banner:  # the slide's call, over the heatmap panel (its title), wrapped to the panel's width
        import textwrap

        colour = {True: "#b2182b", False: "#4d4d4d"}.get(positive, "#2166ac")  # type: ignore[arg-type]
        axes[1].set_title(textwrap.fill(banner, width=72), fontsize=9, color="white",
                          bbox={"facecolor": colour, "edgecolor": "none", "pad": 4})
    return _save(fig, path)


def gallery_png(path: Path, top: list[tuple[npt.NDArray[np.uint8], float, int, tuple[int, int]]],
                bottom: list[tuple[npt.NDArray[np.uint8], float, int, tuple[int, int]]], *, method: str,
                title: str, subtitle: str = "") -> Path:
    """Top-k and bottom-k patches (image, score, patch index, level-0 x/y) in two labelled
    rows (composed directly with Pillow: a matplotlib grid of images costs a second per slide)."""
    from PIL import Image, ImageDraw, ImageFont

    from wsi_mil.io.atomic import atomic_path

    side = max((img.shape[0] for img, _, _, _ in top + bottom), default=64)
    k = max(len(top), len(bottom), 1)
    pad, caption, label_w, head = 6, 42, 24, 60
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    width = label_w + k * (side + pad) + pad
    height = head + 2 * (caption + side + pad)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill="black", font=font)
    draw.text((pad, 24), f"attention ({method}); #index in the attention store; (x, y) level-0 pixels of the "
              "patch's top-left corner", fill="dimgray", font=small)
    if subtitle:
        draw.text((pad, 40), subtitle, fill="black", font=small)
    for r, (row, name) in enumerate(((top, "highest"), (bottom, "lowest"))):
        y = head + r * (caption + side + pad)
        label = Image.new("RGB", (side + caption, label_w - 4), "white")
        ImageDraw.Draw(label).text((2, 0), f"{name} {len(row)}", fill="black", font=font)
        sheet.paste(label.rotate(90, expand=True), (0, y))
        for c, (img, score, idx, (px, py)) in enumerate(row):
            x = label_w + pad + c * (side + pad)
            draw.text((x, y + 2), f"#{idx}  {score:.3g}", fill="black", font=small)
            draw.text((x, y + 15), f"({px}, {py})", fill="dimgray", font=small)
            sheet.paste(Image.fromarray(img), (x, y + caption))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
