"""Localisation: how well instance attention finds the tumour of a slide.

Each patch's tumour share is read from the ``Tumor`` regions a pathologist drew (a slide
tiled with ``--annotations``: the patch store's ``annotation_overlap``), else from a
generated slide's ground-truth mask (written beside it); a patch is "tumour" when at
least half of it is. The
localisation AUC is the ROC AUC of the attention scores against those patch labels,
within each positive slide (attention is only comparable within one bag); callers
average the slides' AUCs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: the annotation class whose regions are the lesions localisation is judged against
TUMOUR_CLASS = "Tumor"
DRAWN, GENERATED = f"drawn {TUMOUR_CLASS} regions (tile --annotations)", "generated lesion masks"


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


def annotated_truth(attrs: dict[str, Any], h5: Path, coords: npt.NDArray[np.int64],
                    cls: str = TUMOUR_CLASS) -> npt.NDArray[np.float32] | None:
    """Each attention patch's share inside the ``cls`` regions a pathologist drew, from the patch store the
    slide was tiled into with ``tile --annotations`` (matched by coordinates); None when that store has no
    annotations, no such class, or its coordinates do not cover the attention's."""
    from wsi_mil.data.bags import attention_feature_store, source_patch_store
    from wsi_mil.errors import WsiMilError
    from wsi_mil.io.features import FeatureStore
    from wsi_mil.io.store import PatchStore

    store = attention_feature_store(attrs, h5)
    if store is None or not store.exists():
        return None
    try:
        with FeatureStore(store) as fs:
            fattrs = fs.attrs
        patch_store, _ = source_patch_store(fattrs, store)
        if patch_store is None:
            return None
        with PatchStore(patch_store) as ps:
            found = ps.annotation_overlap()
            if found is None or cls not in found[0]:
                return None
            classes, overlap = found
            index = {(int(x), int(y)): i for i, (x, y) in enumerate(ps.coords)}
    except (WsiMilError, OSError, KeyError):
        return None
    rows = [index.get((int(x), int(y))) for x, y in coords]
    if any(r is None for r in rows):
        return None  # (not the tiling these features came from: never a guessed alignment)
    return overlap[np.asarray(rows, np.int64), classes.index(cls)]


def unseen_localisation(run_dir: Path, slides: dict[str, Path],
                        sources: dict[str, str] | None = None) -> dict[str, float]:
    """Localisation AUC of every slide with tumour patches that a train-mil run's models did not
    train on: each fold's validation slides, and the test set as scored by the fold ensemble.
    A slide's truth is the ``Tumor`` regions drawn on it (a patch store tiled with --annotations),
    else a generated slide's lesion mask (``slides``). Keys are ``<fold dir>/<slide_id>``; ``sources``
    gets which truth each key was judged on."""
    from wsi_mil.data.bags import attention_patch_extent
    from wsi_mil.eval.metrics import auc
    from wsi_mil.io.attention import out_of_fold_stores, read_attention, read_attention_attrs

    per: dict[str, float] = {}
    for sid, h5 in out_of_fold_stores(run_dir).items():
        coords, att, attrs = read_attention(h5)
        drawn = annotated_truth(read_attention_attrs(h5), h5, coords)
        if drawn is not None:
            value = auc((drawn >= 0.5).astype(int), att)
        elif sid in slides and slides[sid].with_name(slides[sid].stem + ".json").exists():
            value = slide_localisation_auc(coords, att, slides[sid], attention_patch_extent(attrs, h5))
        else:
            continue  # no drawn regions, not a generated slide: no ground truth
        if value is not None:
            per[f"{h5.parent.name}/{sid}"] = value
            if sources is not None:
                sources[f"{h5.parent.name}/{sid}"] = DRAWN if drawn is not None else GENERATED
    return per


def run_localisation(run_dir: Path) -> dict[str, Any] | None:
    """Localisation of a train-mil run over its slides with drawn tumour regions or generated
    lesion masks (found through each attention store's feature and patch stores; slides with
    neither are left out): ``{"n", "mean", "min", "per_slide", "truth"}`` (truth: slides per
    source), or None when no slide of the run has one."""
    from wsi_mil.commands.heatmap import slide_for_attention
    from wsi_mil.errors import WsiMilError
    from wsi_mil.io.attention import out_of_fold_stores, read_attention_attrs

    slides: dict[str, Path] = {}
    for sid, h5 in out_of_fold_stores(run_dir).items():
        try:
            path, _ = slide_for_attention(read_attention_attrs(h5), {}, h5)
        except (WsiMilError, OSError):
            continue
        if path.with_name(path.stem + ".json").exists() and path.with_name(path.stem + ".tumour.png").exists():
            slides[sid] = path
    sources: dict[str, str] = {}
    per = unseen_localisation(run_dir, slides, sources)
    if not per:
        return None
    values = list(per.values())
    truth = {k: sum(v == k for v in sources.values()) for k in (DRAWN, GENERATED) if k in sources.values()}
    return {"n": len(values), "mean": float(np.mean(values)), "min": float(np.min(values)), "per_slide": per,
            "truth": truth}


# -- weak localisation with boxes (ChestX-ray8) -------------------------------------------
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def box_iou(a: dict[str, float], b: dict[str, float]) -> float:
    """Intersection over union of two boxes ``{"x0", "y0", "x1", "y1"}`` (x1, y1 exclusive)."""
    iw = max(0.0, min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]))
    ih = max(0.0, min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]))
    inter = iw * ih
    union = (a["x1"] - a["x0"]) * (a["y1"] - a["y0"]) + (b["x1"] - b["x0"]) * (b["y1"] - b["y0"]) - inter
    return inter / union if union > 0 else 0.0


def weak_localisation(predicted: dict[str, list[dict[str, float]]], truth: dict[str, list[dict[str, float]]],
                      thresholds: tuple[float, ...] = IOU_THRESHOLDS) -> dict[str, Any]:
    """Detection from weak labels scored as ChestX-ray8 (Wang et al. 2017) does: at each
    IoU threshold T, the accuracy is the share of ground-truth boxes hit by a predicted box
    with IoU >= T, and the average false positives are the predicted boxes that hit no
    ground-truth box, per image. Images are those with ground-truth boxes that were
    predicted (an image absent from ``predicted`` is not scored)."""
    ids = sorted(i for i in truth if i in predicted)
    acc: dict[str, float | None] = {}
    afp: dict[str, float | None] = {}
    n_gt = sum(len(truth[i]) for i in ids)
    for t in thresholds:
        hits = fps = 0
        for i in ids:
            preds = predicted.get(i, [])
            hits += sum(any(box_iou(g, p) >= t for p in preds) for g in truth[i])
            fps += sum(not any(box_iou(g, p) >= t for g in truth[i]) for p in preds)
        acc[f"{t:.1f}"] = hits / n_gt if n_gt else None
        afp[f"{t:.1f}"] = fps / len(ids) if ids else None
    return {"n_images": len(ids), "n_boxes": n_gt, "accuracy": acc, "average_false_positives": afp,
            "rule": "a ground-truth box is found when a predicted box overlaps it with IoU >= T; a predicted box "
                    "that overlaps no ground-truth box with IoU >= T is a false positive"}
