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


#: the overlay's width in pixels (two panels side by side)
OVERLAY_WIDTH_PX = 1200


def _wrap(draw, text: str, font, width: int) -> list[str]:  # type: ignore[no-untyped-def]
    """``text`` broken into lines no wider than ``width`` pixels in ``font``."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def overlay_png(path: Path, thumbnail: npt.NDArray[np.uint8], grid: ScoreGrid, scores: Scores, *, cmap: str,
                title: str, opacity: float = 0.5, banner: str = "", positive: bool | None = None) -> Path:
    """Thumbnail with the heatmap blended where patches were scored, a colour bar in the
    normalisation's units, the slide's prediction in the title and its call in a banner
    (red for a positive call, grey for a negative one). Composed with Pillow (a matplotlib
    figure cost 0.7 s of a slide's 0.9 s)."""
    from PIL import Image, ImageDraw

    from wsi_mil.io.atomic import atomic_path

    pad, gap = 12, 16
    panel_w = (OVERLAY_WIDTH_PX - 2 * pad - gap) // 2
    h, w = thumbnail.shape[:2]
    panel_h = max(1, round(panel_w * h / max(w, 1)))
    small = Image.fromarray(thumbnail).resize((panel_w, panel_h), Image.Resampling.BILINEAR)
    tissue = np.asarray(small.convert("RGB"), dtype=np.float32)
    on = grid_on_thumbnail(grid, (panel_h, panel_w))
    a = np.where(np.isfinite(on), opacity, 0.0)[..., None]
    blend = (tissue * (1 - a) + colourise(on, cmap).astype(np.float32) * a).round().astype(np.uint8)

    title_font, font, small_font = (_font(s) for s in (15, 13, 12))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrap(probe, title, title_font, OVERLAY_WIDTH_PX - 2 * pad)
    banner_lines = _wrap(probe, banner, font, panel_w - 12) if banner else []
    y_title = pad
    y_banner = y_title + 20 * len(title_lines) + 6
    y_caption = y_banner + (17 * len(banner_lines) + 10 if banner_lines else 0)
    y_panel = y_caption + 20
    y_bar = y_panel + panel_h + 14
    height = y_bar + 14 + 44
    sheet = Image.new("RGB", (OVERLAY_WIDTH_PX, height), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(title_lines):
        tw = draw.textlength(line, font=title_font)
        draw.text(((OVERLAY_WIDTH_PX - tw) / 2, y_title + 20 * k), line, fill="black", font=title_font)
    x_left, x_right = pad, pad + panel_w + gap
    if banner_lines:  # the slide's call, over the heatmap panel
        colour = {True: "#b2182b", False: "#4d4d4d"}.get(positive, "#2166ac")  # type: ignore[arg-type]
        draw.rectangle([x_right, y_banner, x_right + panel_w, y_caption - 4], fill=colour)
        for k, line in enumerate(banner_lines):
            draw.text((x_right + 6, y_banner + 4 + 17 * k), line, fill="white", font=font)
    for x, name in ((x_left, "tissue"), (x_right, "attention")):
        draw.text((x + (panel_w - draw.textlength(name, font=font)) / 2, y_caption + 2), name, fill="black", font=font)
    sheet.paste(small.convert("RGB"), (x_left, y_panel))
    sheet.paste(Image.fromarray(blend), (x_right, y_panel))
    bar_w = 2 * panel_w + gap  # the colour bar in the normalisation's units, under both panels
    ramp = colourise(np.tile(np.linspace(0, 1, bar_w)[None, :], (14, 1)), cmap)
    sheet.paste(Image.fromarray(ramp), (x_left, y_bar))
    draw.rectangle([x_left, y_bar, x_left + bar_w - 1, y_bar + 13], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x_tick = x_left + frac * (bar_w - 1)
        label = f"{scores.vmin + frac * (scores.vmax - scores.vmin):.3g}"
        draw.line([x_tick, y_bar + 14, x_tick, y_bar + 18], fill="black")
        tw = draw.textlength(label, font=small_font)
        draw.text((min(max(x_tick - tw / 2, x_left), x_left + bar_w - tw), y_bar + 19), label, fill="black",
                  font=small_font)
    desc = scores.description
    draw.text((x_left + (bar_w - draw.textlength(desc, font=font)) / 2, y_bar + 35), desc, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", pnginfo=_png_info())
    return path


def _font(size: int):  # type: ignore[no-untyped-def]
    """DejaVu Sans (shipped with matplotlib: it has the dashes, µ and arrows titles use),
    else Pillow's default font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def _png_info():  # type: ignore[no-untyped-def]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "wsi-mil")
    return info


def patch_gallery(path: Path, top: list[tuple[npt.NDArray[np.uint8], float, int, tuple[int, int]]],
                  bottom: list[tuple[npt.NDArray[np.uint8], float, int, tuple[int, int]]], *, method: str,
                  title: str, subtitle: str = "") -> Path:
    """Top-k and bottom-k patches (image, score, patch index, level-0 x/y) in two labelled
    rows (composed directly with Pillow: a matplotlib grid of images costs a second per slide).

    Saved as JPEG when ``path`` ends in .jpg (quality 92, no chroma subsampling, so the
    captions stay sharp): the patches are photographs, already JPEG-compressed in the slide
    or the patch store; as PNG a sheet of 16 patches took 0.5-1 MB, as JPEG a third of that."""
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
        if path.suffix.lower() in (".jpg", ".jpeg"):
            sheet.save(tmp, format="JPEG", quality=92, subsampling=0)
        else:
            sheet.save(tmp, format="PNG")
    return path
