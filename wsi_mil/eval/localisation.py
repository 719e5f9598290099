"""Localisation: how well instance attention finds the tumour of a generated slide.

Each patch's tumour share is read from the slide's ground-truth mask (written beside
every generated slide); a patch is "tumour" when at least half of it is. The
localisation AUC is the ROC AUC of the attention scores against those patch labels,
within each positive slide (attention is only comparable within one bag); the slides'
AUCs are averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt


def patch_tumour_share(coords: npt.NDArray[np.int64], extent_px: float, mask: npt.NDArray[np.bool_],
                       mask_downsample: float) -> npt.NDArray[np.float32]:
    """Share of each patch (level-0 ``coords``, side ``extent_px``) inside the tumour mask."""
    out = np.zeros(len(coords), np.float32)
    for i, (x, y) in enumerate(np.asarray(coords)):
        x0, y0 = int(x // mask_downsample), int(y // mask_downsample)
        x1 = max(x0 + 1, int(np.ceil((x + extent_px) / mask_downsample)))
        y1 = max(y0 + 1, int(np.ceil((y + extent_px) / mask_downsample)))
        cell = mask[y0:y1, x0:x1]
        out[i] = float(cell.mean()) if cell.size else 0.0
    return out


def slide_localisation_auc(attention_h5: Path, slide_path: Path, extent_px: float) -> float | None:
    """AUC of one slide's attention against its tumour patches (None without both kinds)."""
    from wsi_mil.eval.metrics import auc
    from wsi_mil.io.attention import read_attention
    from wsi_mil.synth.slide import read_truth_mask

    coords, att, _ = read_attention(attention_h5)
    mask, ds = read_truth_mask(slide_path)
    truth = patch_tumour_share(coords, extent_px, mask, ds) >= 0.5
    return auc(truth.astype(int), att)


def localisation_summary(attention_dir: Path, slides: dict[str, Path], extent_px: dict[str, float]) -> dict[str, object]:
    """Mean localisation AUC over the slides in ``attention_dir`` that have tumour patches."""
    per: dict[str, float] = {}
    for h5 in sorted(attention_dir.glob("*.h5")):
        sid = h5.stem
        if sid not in slides or not slides[sid].with_name(slides[sid].stem + ".json").exists():
            continue
        value = slide_localisation_auc(h5, slides[sid], extent_px[sid])
        if value is not None:
            per[sid] = value
    return {"mean_auc": float(np.mean(list(per.values()))) if per else None, "per_slide": per}
