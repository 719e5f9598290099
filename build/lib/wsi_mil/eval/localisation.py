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

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

#: the annotation class whose regions are the lesions localisation is judged against (train-mil --lesion-class)
TUMOUR_CLASS = "Tumor"
DRAWN, GENERATED = "drawn lesion regions (tile --annotations)", "generated lesion masks"


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
                    cls: str = TUMOUR_CLASS) -> tuple[npt.NDArray[np.float32] | None, list[str] | None]:
    """(each attention patch's share inside the ``cls`` regions a pathologist drew, the file's classes), from
    the patch store the slide was tiled into with ``tile --annotations`` (matched by coordinates). The share is
    zeros for a file with nothing drawn (a negative slide), None for a file whose classes do not include ``cls``
    (they are returned: lesions drawn under another name are not taken for none); (None, None) when the store
    has no annotations or its coordinates do not cover the attention's."""
    from wsi_mil.data.bags import attention_feature_store, source_patch_store
    from wsi_mil.errors import WsiMilError
    from wsi_mil.io.features import FeatureStore
    from wsi_mil.io.store import PatchStore

    store = attention_feature_store(attrs, h5)
    if store is None or not store.exists():
        return None, None
    try:
        with FeatureStore(store) as fs:
            fattrs = fs.attrs
        patch_store, _ = source_patch_store(fattrs, store)
        if patch_store is None:
            return None, None
        with PatchStore(patch_store) as ps:
            found = ps.annotation_overlap()
            if found is None:
                return None, None
            classes, overlap = found
            index = {(int(x), int(y)): i for i, (x, y) in enumerate(ps.coords)}
    except (WsiMilError, OSError, KeyError):
        return None, None
    rows = [index.get((int(x), int(y))) for x, y in coords]
    if any(r is None for r in rows):
        return None, None  # (not the tiling these features came from: never a guessed alignment)
    if not classes:  # (a file with nothing drawn: none of the slide's patches is a lesion)
        return np.zeros(len(coords), np.float32), classes
    if cls not in classes:
        return None, classes
    return overlap[np.asarray(rows, np.int64), classes.index(cls)], classes


def unseen_localisation(run_dir: Path, slides: dict[str, Path], sources: dict[str, str] | None = None,
                        slides_out: dict[str, Any] | None = None, lesion_class: str = TUMOUR_CLASS,
                        unjudged: dict[str, list[str]] | None = None) -> dict[str, float]:
    """Localisation AUC of every slide with tumour patches that a train-mil run's models did not
    train on: each fold's validation slides, and the test set as scored by the fold ensemble.
    A slide's truth is the ``lesion_class`` regions drawn on it (a patch store tiled with --annotations),
    else a generated slide's lesion mask (``slides``), else nothing drawn on an annotated slide (a
    negative); a slide whose file has other classes only is left out and listed in ``unjudged``
    (slide -> its classes). Keys are ``<fold dir>/<slide_id>``; ``sources``
    gets which truth each key was judged on; ``slides_out`` gets each judged slide's patches (coords,
    attention, truth, slide probability) for the FROC and Dice figures (negative slides too)."""
    from wsi_mil.data.bags import attention_patch_extent
    from wsi_mil.eval.metrics import auc
    from wsi_mil.io.attention import out_of_fold_stores, read_attention, read_attention_attrs

    per: dict[str, float] = {}
    for sid, h5 in out_of_fold_stores(run_dir).items():
        coords, att, attrs = read_attention(h5)
        drawn, classes = annotated_truth(read_attention_attrs(h5), h5, coords, lesion_class)
        if drawn is not None and classes:
            truth = drawn >= 0.5
        elif sid in slides and slides[sid].with_name(slides[sid].stem + ".json").exists():
            from wsi_mil.synth.slide import read_truth_mask

            drawn = None  # (a generated slide's own mask, not a file with nothing, or something else, drawn)
            mask, ds = read_truth_mask(slides[sid])
            truth = patch_tumour_share(coords, attention_patch_extent(attrs, h5), mask, ds) >= 0.5
        elif drawn is not None:
            truth = drawn >= 0.5  # (an annotated slide with nothing drawn: a negative)
        else:
            if classes and unjudged is not None:
                unjudged[sid] = classes
            continue  # no lesion regions, not a generated slide: no ground truth
        if slides_out is not None:
            from wsi_mil.viz.scores import slide_call

            slides_out[f"{h5.parent.name}/{sid}"] = (coords, att, truth, slide_call(attrs).get("p"))
        value = auc(truth.astype(int), att)
        if value is not None:
            per[f"{h5.parent.name}/{sid}"] = value
            if sources is not None:
                sources[f"{h5.parent.name}/{sid}"] = DRAWN if drawn is not None else GENERATED
    return per


def run_localisation(run_dir: Path, lesion_class: str = TUMOUR_CLASS) -> dict[str, Any] | None:
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
    judged: dict[str, Any] = {}
    unjudged: dict[str, list[str]] = {}
    per = unseen_localisation(run_dir, slides, sources, judged, lesion_class, unjudged)
    if unjudged:  # (lesions drawn under another name would silently count as none)
        classes = sorted({c for v in unjudged.values() for c in v})
        logger.warning("localisation: %d slide(s) have drawn regions but none of class %r (their classes: %s); "
                       "they are left out: name the lesion class with train-mil --lesion-class", len(unjudged),
                       lesion_class, ", ".join(classes))
    if not per:
        return {"n": 0, "unjudged": unjudged, "lesion_class": lesion_class} if unjudged else None
    values = list(per.values())
    truth = {k: sum(v == k for v in sources.values()) for k in (DRAWN, GENERATED) if k in sources.values()}
    dice = {k: patch_dice(t, a) for k, (_, a, t, _) in judged.items() if t.any()}
    return {"n": len(values), "mean": float(np.mean(values)), "min": float(np.min(values)), "per_slide": per,
            "truth": truth, "dice_mean": float(np.mean(list(dice.values()))) if dice else None,
            "froc": froc(list(judged.values())), "lesion_class": lesion_class,
            **({"unjudged": unjudged} if unjudged else {})}


#: average false positives per slide the FROC's sensitivities are read at (CAMELYON16's)
FROC_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def patch_dice(truth: npt.NDArray[np.bool_], attention: npt.NDArray[Any], level: float = 0.5) -> float:
    """Dice between a slide's lesion patches and its heatmap thresholded at ``level`` of its range
    (attention min-max scaled within the slide, as the heatmap draws it)."""
    a = np.asarray(attention, float)
    span = a.max() - a.min()
    hot = (a - a.min()) / span >= level if span > 0 else np.zeros(len(a), bool)
    denominator = hot.sum() + truth.sum()
    return float(2 * (hot & truth).sum() / denominator) if denominator else 1.0


def _lesions(coords: npt.NDArray[np.int64], truth: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Each patch's lesion (connected lesion patches on the patch grid, 8-neighbours; -1: not a lesion patch)."""
    from scipy.ndimage import label

    ij = _grid_index(coords)
    grid = np.zeros(ij.max(axis=0)[::-1] + 1, bool)
    grid[ij[truth, 1], ij[truth, 0]] = True
    labels, _ = label(grid, structure=np.ones((3, 3)))
    out = labels[ij[:, 1], ij[:, 0]] - 1
    return np.where(truth, out, -1)


def _grid_index(coords: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Each patch's (column, row) on the patch grid (the step: the smallest gap between coordinates)."""
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
    found = [int(s[s > 0].min()) for s in steps if (s > 0).any()]
    return ((coords - coords.min(axis=0)) // (min(found) if found else 1)).astype(np.int64)


def _peaks(coords: npt.NDArray[np.int64], score: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Patches whose score is the highest among their 8 grid neighbours (one detection per hot spot)."""
    ij = _grid_index(coords)
    where = {(int(i), int(j)): k for k, (i, j) in enumerate(ij)}
    keep = np.ones(len(coords), bool)
    for k, (i, j) in enumerate(ij):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                n = where.get((int(i) + di, int(j) + dj))
                if n is not None and n != k and (score[n] > score[k] or (score[n] == score[k] and n < k)):
                    keep[k] = False
    return keep


def froc(judged: list[tuple[Any, Any, Any, Any]]) -> dict[str, Any] | None:
    """CAMELYON16-style FROC over slides ``(coords, attention, lesion truth, slide probability)``:
    each slide's detections are the local maxima of its heatmap (attention min-max scaled within
    the slide, times the slide's positive probability, so a slide called negative adds few false
    positives); a detection on a lesion patch finds that lesion (each lesion counted once), any
    other is a false positive. Sensitivity (lesions found / lesions) at average false positives per
    slide of FROC_FP_RATES, and their mean (the FROC score). None without a lesion."""
    scores, hits, lesion_ids, n_lesions = [], [], [], 0
    for slide_no, (coords, att, truth, p) in enumerate(judged):
        a = np.asarray(att, float)
        span = a.max() - a.min()
        s = ((a - a.min()) / span if span > 0 else np.zeros(len(a))) * (1.0 if p is None else float(p))
        lesion = _lesions(np.asarray(coords), np.asarray(truth, bool))
        n_lesions += int(lesion.max()) + 1 if (lesion >= 0).any() else 0
        peak = _peaks(np.asarray(coords), s)
        scores.append(s[peak])
        hits.append(lesion[peak] >= 0)
        lesion_ids.append(np.where(lesion[peak] >= 0, slide_no * 1_000_000 + lesion[peak], -1))
    if not n_lesions:
        return None
    score, hit, ids = np.concatenate(scores), np.concatenate(hits), np.concatenate(lesion_ids)
    order = np.argsort(-score, kind="stable")
    score, hit, ids = score[order], hit[order], ids[order]
    found: set[int] = set()
    sens, fps = [], []
    n_fp = 0
    for k in range(len(score)):  # (thresholds at each detection's score, from the highest)
        if hit[k]:
            found.add(int(ids[k]))
        else:
            n_fp += 1
        if k == len(score) - 1 or score[k + 1] != score[k]:
            sens.append(len(found) / n_lesions)
            fps.append(n_fp / len(judged))
    sens_a, fps_a = np.asarray(sens), np.asarray(fps)
    at = {f"{r:g}": float(sens_a[fps_a <= r].max()) if (fps_a <= r).any() else 0.0 for r in FROC_FP_RATES}
    return {"sensitivity_at_fp_per_slide": at, "score": float(np.mean(list(at.values()))), "n_lesions": n_lesions,
            "n_slides": len(judged)}


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
