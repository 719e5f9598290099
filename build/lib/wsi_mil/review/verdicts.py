"""A reviewer's verdicts and drawn regions, kept beside the run (``<run>/review/``).

- ``verdicts.csv``: one row per verdict ever given (slide, reviewer, verdict, corrected label,
  comment, the model's call, UTC time); a slide's current verdict by a reviewer is their
  latest row. Rows are never edited or dropped: a second verdict on a slide is written only
  when the page says the reviewer confirmed it (``replace``), and both rows stay.
- ``regions/<slide_id>.geojson``: the regions drawn on a slide, a QuPath GeoJSON
  FeatureCollection in level-0 pixels (each feature's reviewer and time in its properties).
  The folder is what ``wsi-mil tile --annotations`` reads: drawn lesions come back in as
  annotations. Replacing a slide's regions also needs ``replace``.

Every file is written atomically (a temporary file renamed into place), under one lock."""

from __future__ import annotations

import csv
import io
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError, ManifestError

VERDICTS = ("agree", "disagree", "uncertain")
#: the classes a reviewer draws: a lesion (missed or confirmed), a hot spot that is none, an artefact to leave out
REGION_CLASSES = ("Tumor", "False positive", "Exclude")
COLUMNS = ("slide_id", "reviewer", "verdict", "corrected_label", "comment", "model_prediction", "time")
MAX_COMMENT = 2000


class Conflict(Exception):
    """A write that would replace what a reviewer already saved (the page asks before it replaces)."""

    def __init__(self, existing: Any) -> None:
        super().__init__("already saved")
        self.existing = existing


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ReviewStore:
    """The review folder of one run."""

    def __init__(self, folder: Path, reviewer: str, label_values: list[str] | None = None) -> None:
        if not reviewer.strip() or any(c in reviewer for c in "\r\n,"):
            raise ConfigError(f"--reviewer {reviewer!r}: give a name (no commas or line breaks)")
        self.folder, self.reviewer = folder, reviewer.strip()
        self.label_values = label_values  # (a corrected label must be one of the run's; None: the run does not say)
        self.lock = threading.Lock()

    @property
    def verdicts_csv(self) -> Path:
        return self.folder / "verdicts.csv"

    def regions_file(self, slide_id: str) -> Path:
        return self.folder / "regions" / f"{slide_id}.geojson"

    def rows(self) -> list[dict[str, str]]:
        if not self.verdicts_csv.exists():
            return []
        with open(self.verdicts_csv, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def current(self, slide_id: str) -> dict[str, str] | None:
        """This reviewer's latest verdict on the slide."""
        mine = [r for r in self.rows() if r["slide_id"] == slide_id and r["reviewer"] == self.reviewer]
        return mine[-1] if mine else None

    def save_verdict(self, slide_id: str, body: dict[str, Any], model_prediction: str) -> dict[str, str]:
        verdict = body.get("verdict")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        comment, label = body.get("comment") or "", body.get("corrected_label") or ""
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise ValueError(f"comment: text of at most {MAX_COMMENT} characters")
        if not isinstance(label, str) or len(label) > 100 or any(c in label for c in "\r\n"):
            raise ValueError("corrected_label: one line of text")
        if label.strip() and self.label_values is not None and label.strip() not in self.label_values:
            raise ValueError(f"corrected_label {label.strip()!r} is not one of the run's labels "
                             f"({', '.join(self.label_values)})")
        comment = comment.strip()
        if comment[:1] in ("=", "+", "-", "@"):  # (a spreadsheet would run it as a formula)
            comment = "'" + comment
        row = {"slide_id": slide_id, "reviewer": self.reviewer, "verdict": verdict, "corrected_label": label.strip(),
               "comment": comment, "model_prediction": model_prediction, "time": _now()}
        from wsi_mil.io.atomic import write_text

        with self.lock:
            existing = self.current(slide_id)
            if existing is not None and body.get("replace") is not True:
                raise Conflict(existing)
            out = io.StringIO()
            w = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
            w.writeheader()
            w.writerows([*self.rows(), row])
            write_text(self.verdicts_csv, out.getvalue())
        return row

    def regions(self, slide_id: str) -> list[dict[str, Any]]:
        f = self.regions_file(slide_id)
        return list(json.loads(f.read_text()).get("features", [])) if f.exists() else []

    def save_regions(self, slide_id: str, body: dict[str, Any], size: tuple[int, int]) -> list[dict[str, Any]]:
        """Check the drawn regions (each a Polygon of a REGION_CLASSES class, on the slide) and write them."""
        from wsi_mil.io.annotations import AnnotationError, read_geojson, write_geojson

        features = body.get("features")
        if not isinstance(features, list) or len(features) > 500:
            raise ValueError("features: a list of at most 500 GeoJSON Features")
        stamped: list[dict[str, Any]] = []
        for i, f in enumerate(features):
            if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict) or \
                    f["geometry"].get("type") != "Polygon":
                raise ValueError(f"feature {i}: a GeoJSON Feature with a Polygon geometry")
            cls = ((f.get("properties") or {}).get("classification") or {}).get("name")
            if cls not in REGION_CLASSES:
                raise ValueError(f"feature {i}: class {cls!r} is not one of {', '.join(REGION_CLASSES)}")
            stamped.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": f["geometry"].get("coordinates")},
                            "properties": {"objectType": "annotation", "classification": {"name": cls},
                                           "reviewer": self.reviewer, "time": _now()}})
        try:  # (the reader's checks: numbers, rings of three points or more, on the slide)
            read = read_geojson(Path(f"{slide_id}.geojson"),
                                 json.dumps({"type": "FeatureCollection", "features": stamped}).encode(), size)
        except AnnotationError as exc:
            raise ValueError(str(exc)) from None
        for f, r in zip(stamped, read.regions, strict=True):  # (what was checked is what is written)
            f["geometry"]["coordinates"] = [[[float(x), float(y)] for x, y in ring] + [[float(ring[0][0]), float(ring[0][1])]]
                                            for ring in (r.exterior, *r.holes)]
        with self.lock:
            if self.regions_file(slide_id).exists() and body.get("replace") is not True:
                raise Conflict(self.regions(slide_id))
            self.regions_file(slide_id).parent.mkdir(parents=True, exist_ok=True)
            write_geojson(self.regions_file(slide_id), stamped)
        return stamped


def corrected_manifest(manifest: Path, verdicts_csv: Path, out: Path, column: str = "label") -> list[dict[str, str]]:
    """A copy of ``manifest`` with each slide's ``column`` set to the corrected label of its latest verdict
    (slides without one unchanged), written to ``out``; the changes are returned (and written beside it as
    ``<out>.changes.csv``). Two reviewers who corrected one slide differently are refused by name."""
    from wsi_mil.io.atomic import write_csv, write_text

    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or column not in rows[0]:
        raise ManifestError(f"{manifest}: no {column!r} column to correct")
    with open(verdicts_csv, newline="", encoding="utf-8") as fh:
        verdicts = list(csv.DictReader(fh))
    latest: dict[tuple[str, str], dict[str, str]] = {}
    for v in verdicts:
        latest[(v["slide_id"], v["reviewer"])] = v
    corrections: dict[str, dict[str, str]] = {}
    for (sid, _), v in latest.items():
        if not v.get("corrected_label"):
            continue
        if sid in corrections and corrections[sid]["corrected_label"] != v["corrected_label"]:
            raise ManifestError(f"slide {sid}: reviewers disagree on its label ({corrections[sid]['reviewer']}: "
                                f"{corrections[sid]['corrected_label']!r}, {v['reviewer']}: {v['corrected_label']!r}); "
                                "settle it in the review page first")
        corrections[sid] = v
    known = sorted({r[column] for r in rows if r[column].strip()})
    strange = [(sid, v) for sid, v in corrections.items() if v["corrected_label"] not in known]
    if strange:
        sid, v = strange[0]
        raise ManifestError(f"slide {sid}: {v['reviewer']} corrected its label to {v['corrected_label']!r}, which is "
                            f"not a value of {column!r} in {manifest.name} ({', '.join(known)}); a new class is not "
                            "made by a correction: fix the verdict in the review page")
    ids = {r["slide_id"] for r in rows}
    unknown = sorted(set(corrections) - ids)
    if unknown:
        raise ManifestError(f"verdicts correct slides the manifest does not have: {', '.join(unknown[:5])}")
    changes: list[dict[str, str]] = []
    for r in rows:
        c = corrections.get(r["slide_id"])
        if c is not None and r[column] != c["corrected_label"]:
            changes.append({"slide_id": r["slide_id"], "column": column, "was": r[column], "now": c["corrected_label"],
                            "reviewer": c["reviewer"], "time": c["time"], "comment": c["comment"]})
            r[column] = c["corrected_label"]
    import os

    for r in rows:  # (a path relative to the manifest, made relative to OUT: the copy finds the same files)
        for key in ("path", "annotations"):
            if r.get(key) and not Path(r[key]).is_absolute():
                r[key] = os.path.relpath((manifest.parent / r[key]).resolve(), out.parent.resolve())
    write_csv(out, rows)  # type: ignore[arg-type]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["slide_id", "column", "was", "now", "reviewer", "time", "comment"],
                       lineterminator="\n")
    w.writeheader()
    w.writerows(changes)
    write_text(out.with_name(out.stem + ".changes.csv"), buf.getvalue())
    return changes
