"""Patient-level bags (``train-mil --bag patient``): all slides of a patient in one bag.

A diagnosis, a mutation or an outcome belongs to the patient, and often only some of the
patient's slides show it: trained one bag per slide, the slides without the evidence are
positives that look negative. One bag per patient sees them all. The bag's features are
its slides' features one after another (``meta["slides"]`` keeps each slide's rows, so
attention is written back per slide and heatmaps stay per slide); its label is the
patient's, and slides of one patient with different labels are refused by name. A bag
larger than the cap keeps a seeded sample of its patches, recorded in ``meta["sampled"]``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from wsi_mil.data.bags import Bag, Task
from wsi_mil.errors import ManifestError


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(a, float), np.asarray(b, float), equal_nan=True))


def patient_bags(bags: list[Bag], task: Task, *, max_instances: int | None, seed: int) -> list[Bag]:
    """One bag per patient (in the order patients first appear), from slide bags."""
    groups: dict[str, list[Bag]] = {}
    for b in bags:
        groups.setdefault(str(b.patient_id), []).append(b)
    disagree = [(p, members) for p, members in groups.items()
                if any(not _same(m.target, members[0].target) for m in members[1:])]
    if disagree:
        lines = "; ".join(f"patient {p}: " + ", ".join(f"{m.slide_id} = {_label(task, m.target)}" for m in members)
                          for p, members in disagree[:5])
        raise ManifestError(f"--bag patient: the slides of {len(disagree)} patient(s) carry different labels ({lines}"
                            f"{' ...' if len(disagree) > 5 else ''}); a patient bag has one label. Correct the "
                            "manifest, or train one bag per slide (--bag slide)")
    splits = [(p, sorted({str(m.split) for m in members})) for p, members in groups.items()
              if len({m.split for m in members}) > 1]
    if splits:  # (the splits check refuses it too; said here in the patient's words)
        raise ManifestError(f"--bag patient: the slides of patient {splits[0][0]} are in different splits "
                            f"({', '.join(splits[0][1])}); a patient is in one split")
    rng = np.random.default_rng(seed)
    out = []
    for patient, members in groups.items():
        feats, coords, start = [], [], 0
        slides: list[dict[str, Any]] = []
        for m in members:
            f, c = m.load()
            feats.append(np.asarray(f, np.float32))
            coords.append(np.asarray(c, np.int64))
            slides.append({"slide_id": m.slide_id, "store": str(m.store), "start": start, "end": start + len(f),
                           "extent_px": m.extent_px, "step_px": m.step_px})
            start += len(f)
        x, xy = np.concatenate(feats), np.concatenate(coords)
        meta: dict[str, Any] = dict(members[0].meta)
        meta["slides"] = slides
        total = len(x)
        if max_instances is not None and total > max_instances:
            keep = np.sort(rng.choice(total, max_instances, replace=False))
            x, xy = x[keep], xy[keep]
            for s in slides:  # each slide's rows among those kept (kept rows stay in slide order)
                rows = np.flatnonzero((keep >= s["start"]) & (keep < s["end"]))
                s["of"] = int(s["end"] - s["start"])
                s["start"], s["end"] = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
                s["kept"] = int(len(rows))
            meta["sampled"] = {"kept": int(max_instances), "of": int(total), "seed": int(seed)}
        meta["n_features"] = int(len(x))
        for key in ("tissue_area_mm2",):  # the patient's facts, not its first slide's
            vals = [float(m.meta[key]) for m in members if m.meta.get(key) is not None]
            meta[key] = float(np.sum(vals)) if len(vals) == len(members) else None
        from wsi_mil.tiling.tissue import STAIN_NAMES

        for key in STAIN_NAMES:
            vals = [float(m.meta[key]) for m in members if m.meta.get(key) is not None]
            meta[key] = float(np.mean(vals)) if len(vals) == len(members) else None
        meta["fingerprint"] = hashlib.sha256("|".join(str(m.meta.get("fingerprint")) for m in members)
                                             .encode()).hexdigest()[:16]
        out.append(Bag(patient, patient, members[0].target, members[0].store, members[0].split, features=x, coords=xy,
                       step_px=members[0].step_px, meta=meta, extent_px=members[0].extent_px,
                       stratum=members[0].stratum))
    return out


def _label(task: Task, target: np.ndarray) -> str:
    t = np.asarray(target, float)
    if task.kind_obj.has_classes and task.classes and len(t) == 1 and not np.isnan(t[0]):
        return repr(task.classes[int(t[0] > 0.5)])
    return "/".join("blank" if np.isnan(v) else f"{v:g}" for v in t)


def patient_columns(bags: list[Bag], columns: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Each patient's manifest row: a value its slides share, or ``mixed`` where they differ
    (a patient scanned at two sites is then its own subgroup, never silently one of them)."""
    out: dict[str, dict[str, str]] = {}
    for b in bags:
        rows = [columns.get(s["slide_id"], {}) for s in b.meta.get("slides", [])]
        keys = sorted({k for r in rows for k in r})
        out[b.slide_id] = {k: (vals[0] if len(vals := sorted({r.get(k, "") for r in rows})) == 1 else "mixed")
                           for k in keys}
    return out
