"""The audit every trainer runs (and ``wsi-mil audit`` runs alone): duplicates and label
sources before training, subgroups, operating points and the error gallery after it.

Everything is modality-blind: samples are slides (``Bag``: patch embeddings), images or
volumes (``ImageSample``: pixels); predictions are the rows of ``predictions.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)

#: errors shown in the gallery per kind (all are listed in errors.csv and the report)
GALLERY_MAX = 12


class DuplicateLeakError(ConfigError):
    """Near-duplicate samples of different patients would land in different sets."""


# ---- before training ---------------------------------------------------------------------
def duplicate_audit(samples: list[Any], pixels: Any = None) -> dict[str, Any]:
    """Near-duplicate pairs among ``samples`` (and duplicated patches inside slides);
    ``pixels`` (id -> array) gives images / volumes as the trainer already holds them."""
    from wsi_mil.data.duplicates import (
        fingerprint_pairs,
        picture_signature,
        signature_pairs,
        slide_pairs,
        volume_signature,
    )

    ids = [s.slide_id for s in samples]
    patients = [str(s.patient_id) for s in samples]
    if not samples:
        return {"method": "none", "pairs": [], "within": {}}
    if hasattr(samples[0], "load") and hasattr(samples[0], "store"):  # slides: patch embeddings
        pairs, within = slide_pairs(ids, patients, lambda i: samples[i].load()[0])
        seen = {frozenset((p.a, p.b)) for p in pairs}
        fingerprints = [str((getattr(s, "meta", None) or {}).get("slide_fingerprint") or "") for s in samples]
        pairs += [p for p in fingerprint_pairs(ids, patients, fingerprints) if frozenset((p.a, p.b)) not in seen]
        method = ("slide files: stores recording one file fingerprint are the same slide; patch embeddings: 128 "
                  "patches sampled per slide, each reduced to 64 random-hyperplane sign bits; candidate slide pairs "
                  "from an inverted index over those bits (8 hash tables of 24 bits, sub-quadratic); a pair when at "
                  "least half of each slide's sampled patches have a patch in the other at cosine >= 0.99; a group of "
                  "copies is listed as a chain of pairs, not every pair")
    else:
        sigs = []
        for s in samples:
            a = np.asarray(pixels(s.slide_id) if pixels is not None else s.load(), dtype=np.float32)
            sigs.append(volume_signature(a) if a.ndim == 3 and a.shape[-1] not in (3, 4) else picture_signature(a))
        pairs, within = signature_pairs(ids, patients, sigs), {}
        method = ("perceptual signature: the picture (a volume: its three mean projections) shrunk to 32x32 grey "
                  "pixels and normalised; a pair when two signatures correlate at 0.99 or more")
    return {"method": method, "pairs": pairs, "within": within}


def apply_duplicate_policy(samples: list[Any], found: dict[str, Any], policy: str) -> dict[str, Any]:
    """With ``merge``, give every duplicate group one patient id (before the splits are made)."""
    from wsi_mil.data.duplicates import merge_patients

    target = {s.slide_id: np.asarray(s.target, dtype=float) for s in samples}
    pairs = []
    for p in found["pairs"]:
        a, b = target.get(p.a), target.get(p.b)
        same = a is not None and b is not None and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))
        pairs.append({**p.to_dict(), "labels_differ": not same})
    differ = [p for p in pairs if p["labels_differ"]]
    if differ:
        logger.warning("%d near-duplicate pair(s) carry different labels (the same picture labelled twice), e.g. %s ~ %s",
                       len(differ), differ[0]["a"], differ[0]["b"])
    record: dict[str, Any] = {"policy": policy, "method": found["method"], "pairs": pairs,
                              "n_labels_differ": len(differ), "within_slide": found["within"], "merged": {}}
    if policy == "merge" and found["pairs"]:
        mapping = merge_patients(found["pairs"], {s.slide_id: str(s.patient_id) for s in samples})
        for s in samples:
            if mapping[s.slide_id] != str(s.patient_id):
                record["merged"][s.slide_id] = {"from": str(s.patient_id), "to": mapping[s.slide_id]}
                s.patient_id = mapping[s.slide_id]
    return record


def split_sets(folds: list[tuple[list[str], list[str]]], test: list[str]) -> list[dict[str, str]]:
    """One {sample id: train | validation | test} map per fold, from the folds' (train, val) ids."""
    sets = []
    for train, val in folds:
        where = dict.fromkeys(train, "train")
        where.update(dict.fromkeys(val, "validation"))
        where.update(dict.fromkeys(test, "test"))
        sets.append(where)
    return sets


def check_leaks(found: dict[str, Any], plan: Any, policy: str, unit: str) -> list[dict[str, Any]]:
    """The duplicate pairs that cross sets; raises :class:`DuplicateLeakError` unless
    ``policy`` is ``allow``."""
    from wsi_mil.data.duplicates import leaking_pairs

    leaks = leaking_pairs(found["pairs"], split_sets([(f.train, f.val) for f in plan.folds], plan.test))
    if leaks and policy != "allow":
        listing = "\n  ".join(f"{x['a']} (patient {x['patient_a']}, {x['set_a']}) ~ {x['b']} (patient {x['patient_b']}, "
                              f"{x['set_b']}): {x['kind']} duplicate" for x in leaks[:15])
        fix = ("run again with --duplicates merge to treat each duplicate group as one patient (the splits then keep "
               "them together)" if plan.source != "manifest" else
               "the given split (a manifest's split column, or a MedMNIST file's official splits) puts them apart: put "
               "each pair in one set (or give them one patient_id); a published split that must stay as it is can be "
               "kept with --duplicates allow")
        raise DuplicateLeakError(
            f"{len(leaks)} near-duplicate {unit} pair(s) of different patients cross train / validation / test — the "
            f"same leak as a patient in two sets:\n  {listing}\nTo fix: {fix}; or --duplicates allow to train anyway "
            "(recorded in the report)")
    return leaks


def label_source_audit(ids: list[str], columns: dict[str, dict[str, str]], sources: str | None) -> dict[str, Any] | None:
    """Disagreements between two label-source columns named ``a,b`` (None without)."""
    from wsi_mil.data.duplicates import label_conflicts

    if not sources:
        return None
    names = _named_columns(columns, sources, "--label-sources")
    if len(names) != 2:
        raise ConfigError(f"--label-sources needs two column names separated by a comma, got {sources!r}")
    first = [columns.get(i, {}).get(names[0], "") for i in ids]
    second = [columns.get(i, {}).get(names[1], "") for i in ids]
    out = label_conflicts(ids, first, second, names=(names[0], names[1]))
    if out["n_conflicts"]:
        logger.warning("%d of %d row(s) disagree between %s and %s (listed in report.md)", out["n_conflicts"],
                       out["n"], names[0], names[1])
    return out


def _named_columns(columns: dict[str, dict[str, str]], names: str, option: str) -> list[str]:
    """The comma-separated column ``names`` of ``option``, each checked to be in the manifest."""
    wanted = [c.strip() for c in names.split(",") if c.strip()]
    have = set().union(*(set(v) for v in columns.values())) if columns else set()
    absent = [c for c in wanted if c not in have]
    if absent:
        raise ConfigError(f"{option}: column(s) {absent} not in the manifest; it has {sorted(have)[:30]}")
    return wanted


# ---- after evaluation --------------------------------------------------------------------
def subgroup_columns(ids: list[str], columns: dict[str, dict[str, str]], names: str | None) -> dict[str, list[str]]:
    """Values of the ``--subgroups`` columns for ``ids`` (a missing column is an error)."""
    if not names:
        return {}
    return {c: [columns.get(i, {}).get(c, "") for i in ids] for c in _named_columns(columns, names, "--subgroups")}


def prediction_audit(ids: list[str], patients: list[str], y: np.ndarray, p: np.ndarray, thr: Any, *,
                     set_name: str, columns: dict[str, dict[str, str]], subgroups: str | None,
                     prevalence: float | None, n_boot: int, seed: int, links: list[str | None] | None = None) -> dict[str, Any]:
    """Subgroups, operating points and errors of one set of binary predictions."""
    from wsi_mil.eval.audit import error_cases, operating_points, subgroup_report

    known = ~np.isnan(y)
    ids = [i for i, k in zip(ids, known, strict=True) if k]
    patients = [q for q, k in zip(patients, known, strict=True) if k]
    links = [x for x, k in zip(links or [None] * len(known), known, strict=True) if k]
    y, p = y[known].astype(int), p[known]
    thr = np.broadcast_to(np.asarray(thr, dtype=float), known.shape)[known]
    out: dict[str, Any] = {"set": set_name, "n": len(y)}
    cols = subgroup_columns(ids, columns, subgroups)
    if cols:
        out["subgroups"] = subgroup_report(y, p, thr, cols, n_boot=n_boot, seed=seed, patients=patients)
    out["operating_points"] = operating_points(y, p, thr, prevalence=prevalence, n_boot=n_boot, seed=seed,
                                               patients=patients)
    out["errors"] = error_cases(ids, patients, y, p, thr, links=links)
    return out


def write_audit_files(out_dir: Path, audit: dict[str, Any], picture: Any = None) -> None:
    """errors.csv and (with ``picture``: id -> 2-D/RGB array or None) gallery.png."""
    from wsi_mil.io.atomic import write_csv

    post = audit.get("evaluation")
    if not post:
        return
    e = post["errors"]
    rows = [dict(c.items()) for c in e["false_negatives"] + e["false_positives"]]
    write_csv(out_dir / "errors.csv", rows or [{"id": "", "patient_id": "", "label": "", "probability": "",
                                                 "threshold": "", "kind": "", "link": ""}])
    if picture is not None:
        try:
            gallery_png(out_dir / "gallery.png", e, picture, title=f"errors on the {post['set']}")
            post["gallery"] = "gallery.png"
        except Exception as exc:  # noqa: BLE001 - a picture that cannot be drawn must not lose the run
            logger.warning("could not draw the error gallery (%s); errors.csv lists every error", exc)


def gallery_png(path: Path, errors: dict[str, Any], picture: Any, *, title: str, tile: int = 128) -> Path:
    """Rows of tiles: false negatives beside confident true positives, false positives
    beside confident true negatives; each tile captioned with id and probability."""
    from PIL import Image, ImageDraw

    from wsi_mil.io.atomic import atomic_path

    fn, fp = errors["false_negatives"], errors["false_positives"]
    tp, tn = errors["confident_true_positives"], errors["confident_true_negatives"]
    rows = [(f"false negatives (positive, missed): {len(fn)}", fn[:GALLERY_MAX], len(fn), (200, 40, 40)),
            ("most confident true positives", tp, len(tp), (40, 140, 40)),
            (f"false positives (negative, flagged): {len(fp)}", fp[:GALLERY_MAX], len(fp), (200, 120, 0)),
            ("most confident true negatives", tn, len(tn), (40, 140, 40))]
    cols = max(4, max(len(r[1]) for r in rows))
    cap, head = 40, 18
    canvas = Image.new("RGB", (cols * (tile + 4) + 4, 22 + len(rows) * (head + tile + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0))
    y = 22
    for label, cases, total, colour in rows:
        more = f" (the {GALLERY_MAX} most confident shown; all in errors.csv)" if total > len(cases) else ""
        draw.text((4, y + 3), f"{label}{more}", fill=colour)
        y += head
        for k, c in enumerate(cases):
            x = 4 + k * (tile + 4)
            img = picture(c["id"])
            if img is not None:
                a = np.asarray(img, dtype=np.float32)
                if a.max() > 1.5:
                    a = a / 255.0
                a = (np.clip(a, 0, 1) * 255).astype(np.uint8)
                pic = Image.fromarray(a).convert("RGB")
                scale = tile / max(pic.size)  # fit the tile, up or down
                pic = pic.resize((max(1, round(pic.size[0] * scale)), max(1, round(pic.size[1] * scale))),
                                 Image.Resampling.LANCZOS)
                canvas.paste(pic, (x, y))
            draw.rectangle([x - 1, y - 1, x + tile, y + tile], outline=colour, width=2)
            draw.text((x, y + tile + 2), _fit(str(c["id"])), fill=(0, 0, 0))
            draw.text((x, y + tile + 14), f"p={c['probability']:.3f}", fill=(60, 60, 60))
            draw.text((x, y + tile + 26), _fit(f"pt {c['patient_id']}"), fill=(60, 60, 60))
        y += tile + cap
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _fit(text: str, width: int = 21) -> str:
    """A caption that fits under a tile: a long one keeps its start and its end (ids and
    patients differ at either), never only its first characters."""
    return text if len(text) <= width else f"{text[:8]}...{text[-(width - 11):]}"


def sample_picture(sample: Any) -> npt.NDArray[Any] | None:
    """A small picture of a sample for the error gallery: an image itself, a volume's
    middle slice, a slide's thumbnail (found through its stores' provenance); None if none."""
    if sample is None:
        return None
    try:
        if hasattr(sample, "store"):  # a slide
            return _slide_thumbnail(sample)
        a = np.asarray(sample.load(), dtype=np.float32)
        if a.ndim == 3 and a.shape[-1] not in (3, 4):
            a = a[a.shape[0] // 2]
        return a
    except Exception as exc:  # noqa: BLE001 - the gallery then shows an empty frame
        logger.debug("no picture for %s: %s", getattr(sample, "slide_id", "?"), exc)
        return None


def _slide_thumbnail(bag: Any) -> npt.NDArray[np.uint8] | None:
    from wsi_mil.data.bags import source_patch_store
    from wsi_mil.io.paths import resolve_recorded
    from wsi_mil.io.slide import open_slide
    from wsi_mil.io.thumbnail import read_thumbnail

    if bag.store is None:
        return None
    patch_store, attrs = source_patch_store(bag.meta, Path(bag.store))
    if patch_store is None:
        return None
    slide_path = resolve_recorded(attrs, "slide_path", patch_store.parent)
    if slide_path is None or not slide_path.exists():
        return None
    mpp = float(attrs.get("slide_mpp") or 1.0)
    with open_slide(slide_path) as slide:
        # the whole slide at about 256 px on its longer side (a resolution coarser than the slide asked
        # for a 1-pixel average before)
        side_um = mpp * max(int(v) for v in slide.dimensions)
        thumb, _, _ = read_thumbnail(slide, slide_mpp=mpp, pixel_um=side_um / 256, max_side_px=256)
    return thumb



# ---- report ------------------------------------------------------------------------------
def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(c: Any) -> str:
    return "" if not c else f" ({c[0]:.2f}–{c[1]:.2f})"


def audit_markdown(audit: dict[str, Any], unit: str = "slide") -> list[str]:
    """The audit section of report.md."""
    lines = ["", "## Audit", ""]
    dup = audit.get("duplicates")
    if dup is not None:
        pairs, leaks = dup["pairs"], dup.get("leaks", [])
        lines += [f"Near-duplicate {unit}s ({dup['method']}): {len(pairs)} pair(s); "
                  f"{len(leaks)} cross train / validation / test under different patients (policy: {dup['policy']})."]
        if dup.get("n_labels_differ"):
            lines.append(f"**{dup['n_labels_differ']} of these pairs carry different labels** (the same picture "
                         "labelled twice: check which label is right).")
        differ = {(x["a"], x["b"]) for x in pairs if x.get("labels_differ")}
        for x in (leaks or pairs)[:20]:
            lines.append(f"- {x['a']} (patient {x['patient_a']}) ~ {x['b']} (patient {x['patient_b']}): {x['kind']}, "
                         f"distance {x['distance']}" + (f", {x['set_a']} / {x['set_b']}" if "set_a" in x else "")
                         + (", labels differ" if (x["a"], x["b"]) in differ else ""))
        if dup.get("merged"):
            lines.append(f"- merged into one patient: {len(dup['merged'])} {unit}(s) (see metrics.json audit.duplicates.merged)")
        within = dup.get("within_slide") or {}
        if within:
            total = sum(v["n_patches_duplicated"] for v in within.values())
            lines.append(f"- duplicated patches inside slides (embedding cosine >= 0.999): {total} in {len(within)} slide(s): "
                         + ", ".join(f"{k} {v['n_patches_duplicated']}/{v['n_patches']}" for k, v in list(within.items())[:10]))
        lines.append("")
    lab = audit.get("label_sources")
    if lab:
        lines.append(f"Label sources {lab['sources'][0]} vs {lab['sources'][1]}: {lab['n_conflicts']} of {lab['n']} "
                     f"disagree ({lab['rule']}).")
        lines += [f"- {c['id']}: {lab['sources'][0]} = {c[lab['sources'][0]]!r}, {lab['sources'][1]} = {c[lab['sources'][1]]!r}"
                  for c in lab["conflicts"][:20]]
        lines.append("")
    post = audit.get("evaluation")
    if not post:
        return lines
    lines += [f"Evaluated set: {post['set']} ({post['n']} {unit}s with a label).", ""]
    for col, rep in (post.get("subgroups") or {}).items():
        lines.append(f"### Subgroups by `{col}`" + (f" — {rep['bands']}" if rep["bands"] else ""))
        methods = sorted({g.get("ci_method", "") for g in rep["groups"]} - {""})
        lines += [""] + ([f"(Intervals: {'; '.join(methods)}.)", ""] if methods else []) + [
                  "| group | n (patients) | positive | negative | AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) | note |",
                  "|---|---:|---:|---:|---|---|---|---|"]
        for g in rep["groups"]:
            lines.append(f"| {g['group']} | {g['n']} ({g.get('n_patients', g['n'])}) | {g['n_positive']} | {g['n_negative']} | {_f(g['auc'])}{_ci(g['auc_ci95'])} "
                         f"| {_f(g['sensitivity'])}{_ci(g['sensitivity_ci95'])} | {_f(g['specificity'])}{_ci(g['specificity_ci95'])} "
                         f"| {g.get('warning') or g.get('auc_ci_note') or ''} |")
        gap = rep["largest_gap"]
        parts = [f"{m} {gap[m]['gap']:.3f} ({gap[m]['lowest']} {gap[m]['lowest_value']:.3f} vs {gap[m]['highest']} "
                 f"{gap[m]['highest_value']:.3f}" + ({True: "; the intervals overlap", False: "; the intervals do not overlap",
                                                     None: ""}[gap[m].get("intervals_overlap")]) + ")"
                 for m in ("auc", "sensitivity", "specificity") if gap.get(m)]
        lines += ["", "Largest gap between subgroups large enough to judge: " + ("; ".join(parts) if parts else
                  f"none to state ({gap['groups_judged']} subgroup(s) large enough)") + ".", ""]
    op = post["operating_points"]
    lines += ["### Operating points", "", f"({op['note']}.)", ""]
    for r in op["sensitivity_at_specificity"]:
        lines.append(f"- sensitivity at specificity {r['specificity']:.2f}: {_f(r['sensitivity'])}{_ci(r['ci95'])}")
    for r in op["specificity_at_sensitivity"]:
        lines.append(f"- specificity at sensitivity {r['sensitivity']:.2f}: {_f(r['specificity'])}{_ci(r['ci95'])}")
    if "at_prevalence" in op:
        a = op["at_prevalence"]
        lines.append(f"- at a deployment prevalence of {a['prevalence']:.3f}: PPV {_f(a['ppv'])}{_ci(a['ppv_ci95'])}, "
                     f"NPV {_f(a['npv'])}{_ci(a['npv_ci95'])} ({a['note']})")
    e = post["errors"]
    lines += ["", f"### Errors at the threshold: {len(e['false_negatives'])} false negative(s), "
              f"{len(e['false_positives'])} false positive(s)", "",
              "| kind | id | patient | probability | threshold | heatmap / picture |", "|---|---|---|---:|---:|---|"]
    for c in e["false_negatives"] + e["false_positives"]:
        link = f"[{Path(c['link']).name}]({c['link']})" if c.get("link") else "–"
        lines.append(f"| {c['kind']} | {c['id']} | {c['patient_id']} | {c['probability']:.3f} | {c['threshold']:.3f} | {link} |")
    if post.get("gallery"):
        lines += ["", "![errors beside confident correct cases](gallery.png)"]
    lines.append("")
    return lines
