"""Localisation: how well instance attention finds the tumour of a generated slide.

Each patch's tumour share is read from the slide's ground-truth mask (written beside
every generated slide); a patch is "tumour" when at least half of it is. The
localisation AUC is the ROC AUC of the attention scores against those patch labels,
within each positive slide (attention is only comparable within one bag); callers
average the slides' AUCs.
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


def slide_localisation_auc(coords: npt.NDArray[np.int64], attention: npt.NDArray[np.float32], slide_path: Path,
                           extent_px: float) -> float | None:
    """AUC of one slide's attention against its tumour patches (None without both kinds)."""
    from wsi_mil.eval.metrics import auc
    from wsi_mil.synth.slide import read_truth_mask

    mask, ds = read_truth_mask(slide_path)
    truth = patch_tumour_share(coords, extent_px, mask, ds) >= 0.5
    return auc(truth.astype(int), attention)


def unseen_localisation(run_dir: Path, slides: dict[str, Path]) -> dict[str, float]:
    """Localisation AUC of every generated slide with tumour patches that a train-mil
    run's models did not train on: each fold's validation slides, and the test set as
    scored by the fold ensemble. Keys are ``<fold dir>/<slide_id>``."""
    from wsi_mil.data.bags import attention_patch_extent
    from wsi_mil.io.attention import out_of_fold_stores, read_attention

    per: dict[str, float] = {}
    for sid, h5 in out_of_fold_stores(run_dir).items():
        if sid not in slides or not slides[sid].with_name(slides[sid].stem + ".json").exists():
            continue  # not a generated slide: no ground truth
        coords, att, attrs = read_attention(h5)
        value = slide_localisation_auc(coords, att, slides[sid], attention_patch_extent(attrs, h5))
        if value is not None:
            per[f"{h5.parent.name}/{sid}"] = value
    return per
