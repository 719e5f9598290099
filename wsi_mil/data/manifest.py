"""Slide manifests and command-line inputs → a validated list of slides.

Manifest CSV schema (see ``slides_manifest/README.md``):

- ``slide_id`` (required): unique, file-name safe.
- ``path`` (required for tiling and ``--slides``; not needed by ``train-mil``): slide
  file; relative paths are relative to the manifest's folder.
- ``patient_id`` (recommended): used for patient-level splits by later stages.
- ``mpp`` (optional): level-0 microns per pixel when the slide's metadata lacks it.
- ``split`` (optional): train / val / test given by the user.
- label columns: ``label`` or ``label_<name>`` (one per task / class).

Any other column is refused, so a typo (``patientid``, ``lable``) cannot silently drop data.

Lines before the header that start with ``#`` are directives; ``# classes: normal,tumour``
names the classes of the label column (negative first for a binary task), as
``--classes`` does.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from wsi_mil.errors import ManifestError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide_id", "path")
OPTIONAL_COLUMNS = ("patient_id", "mpp", "split")
LABEL_PATTERN = re.compile(r"^label(_[A-Za-z0-9][A-Za-z0-9_\-]*)?$")
SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".png", ".jpg", ".jpeg",
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process."""

    slide_id: str
    path: Path | None
    patient_id: str | None = None
    mpp: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    split: str | None = None


def slide_id_from_path(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _split_directives(text: str) -> tuple[dict[str, str], str]:
    """``# key: value`` lines before the header → ({key: value}, the CSV text)."""
    directives: dict[str, str] = {}
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (lines[i].lstrip().startswith("#") or not lines[i].strip()):
        body = lines[i].strip().lstrip("#").strip()
        if ":" in body:
            key, value = body.split(":", 1)
            directives[key.strip().lower()] = value.strip()
        i += 1
    return directives, "".join(lines[i:])


def manifest_classes(path: str | Path) -> list[str] | None:
    """The class names of a manifest's ``# classes: a,b`` line, or None."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    value = _split_directives(text)[0].get("classes")
    return [c.strip() for c in value.split(",")] if value else None


def read_manifest(path: str | Path, *, require_path: bool = True) -> list[SlideEntry]:
    """Read and validate a manifest CSV.

    Missing slide files are *not* an error here: the run reports them per slide and
    continues with the others. With ``require_path=False`` (training, which reads
    feature stores by slide_id) the ``path`` column may be absent and is not checked.

    Raises:
        ManifestError: missing/unknown columns, empty manifest, duplicate or unsafe ids,
            bad mpp values.
    """
    path = Path(path)
    try:
        import io

        _, text = _split_directives(path.read_text(encoding="utf-8-sig"))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc}). It must be a UTF-8 CSV.") from exc
    where = f"manifest {path}"
    required = REQUIRED_COLUMNS if require_path else ("slide_id",)
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(
            f"{where}: missing required column(s) {missing}; found {_preview(columns)}. "
            f"A manifest needs at least {' and '.join(repr(c) for c in required)} (see slides_manifest/README.md)."
        )
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and not LABEL_PATTERN.match(c)]
    if unknown:
        raise ManifestError(
            f"{where}: unknown column(s) {unknown}. Allowed: {list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} "
            "and label columns named 'label' or 'label_<name>'. Rename or remove them."
        )
    if not rows:
        raise ManifestError(f"{where}: no slides listed. Add one row per slide.")
    if "patient_id" not in columns:
        logger.warning("%s: no 'patient_id' column; training will need one for patient-level splits", where)

    entries: list[SlideEntry] = []
    problems: list[str] = []
    for line, row in enumerate(rows, start=2):
        sid = row["slide_id"]
        if not sid or not _SAFE_ID.match(sid):
            problems.append(f"line {line}: slide_id {sid!r} is empty or not file-name safe (use letters, digits, . _ -)")
            continue
        if require_path and not row.get("path"):
            problems.append(f"line {line}: slide {sid!r} has an empty path")
            continue
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not mpp > 0:
                problems.append(f"line {line}: slide {sid!r} has mpp {row['mpp']!r}; give a positive number or leave it empty")
                continue
        slide_path = Path(row["path"]) if row.get("path") else None
        if slide_path is not None and not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        labels = {k: v for k, v in row.items() if LABEL_PATTERN.match(k)}
        entries.append(SlideEntry(sid, slide_path, row.get("patient_id") or None, mpp, labels,
                                  (row.get("split") or "").lower() or None))
    _check_duplicates(entries, where, problems)
    if problems:
        raise ManifestError(f"{where} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if require_path:
        absent = [e.slide_id for e in entries if e.path is not None and not e.path.exists()]
        if absent:
            logger.warning("%s: %d slide file(s) not found (%s)", where, len(absent), ", ".join(absent[:5]))
    return entries


def _preview(items: list[str], n: int = 8) -> str:
    return str(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


def _check_duplicates(entries: list[SlideEntry], where: str, problems: list[str]) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.slide_id] = seen.get(e.slide_id, 0) + 1
    dups = sorted(s for s, n in seen.items() if n > 1)
    if dups:
        problems.append(f"duplicate slide_id(s) {dups}: every slide needs a unique id")


def write_manifest(path: str | Path, rows: list[dict[str, object]]) -> Path:
    """Write a manifest CSV atomically (columns in the order of the first row)."""
    from wsi_mil.io.atomic import write_csv

    return write_csv(path, rows)  # type: ignore[arg-type]


def resolve_inputs(inputs: list[str | Path]) -> list[SlideEntry]:
    """Slides from a mix of slide files, folders (non-recursive) and manifest CSVs."""
    entries: list[SlideEntry] = []
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            if not item.exists():
                raise ManifestError(f"manifest {item} not found")
            entries.extend(read_manifest(item))
        elif item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                logger.warning("%s: no slide files found (looked for %s)", item, ", ".join(sorted(SLIDE_SUFFIXES)))
            entries.extend(SlideEntry(slide_id_from_path(p), p) for p in found)
        else:  # a slide file, possibly missing: reported per slide by the run
            entries.append(SlideEntry(slide_id_from_path(item), item))
    if not entries:
        raise ManifestError("no slides to process: give slide files, folders of slides or a manifest CSV")
    problems: list[str] = []
    _check_duplicates(entries, "inputs", problems)
    if problems:
        raise ManifestError(problems[0] + " (two inputs share a file name; use a manifest with explicit slide_ids)")
    return entries
