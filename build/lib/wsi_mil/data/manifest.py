"""Slide manifests and command-line inputs → a validated list of slides.

Manifest CSV schema (see ``slides_manifest/README.md``):

- ``slide_id`` (required): unique, file-name safe.
- ``path`` (required for tiling and ``--slides``; not needed by ``train-mil``): slide
  file; relative paths are relative to the manifest's folder.
- ``patient_id`` (recommended): used for patient-level splits by later stages.
- ``mpp`` (optional): level-0 microns per pixel when the slide's metadata lacks it.
- ``split`` (optional): train / val / test given by the user.
- label columns: ``label`` or ``label_<name>`` (one per task / class).

Any other column is kept as metadata (``SlideEntry.meta``: site, sex, age ... for the
audit's ``--subgroups``), except one that looks like a misspelt known column
(``patientid``, ``lable``, ``Label``), which is refused so a typo cannot silently drop data.

Lines before the header that start with ``#`` are directives; ``# classes: normal,tumour``
names the classes of the label column (negative first for a binary task), as
``--classes`` does.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import ManifestError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide_id", "path")
OPTIONAL_COLUMNS = ("patient_id", "mpp", "split")
LABEL_PATTERN = re.compile(r"^label(_[A-Za-z0-9][A-Za-z0-9_\-]*)?$")
SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".png", ".jpg", ".jpeg",
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
    meta: dict[str, str] = field(default_factory=dict)  # the row's other columns (site, sex, age ...)


def slide_file(entry: SlideEntry) -> Path:
    """The entry's slide file. Entries of :func:`read_manifest` (``require_path=True``, the
    default) and of :func:`resolve_inputs` always have one; only a training manifest may
    leave the path out."""
    if entry.path is None:
        raise ManifestError(f"slide {entry.slide_id!r} has no path to its file")
    return entry.path


def csv_rows(text: str, path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the (line, row) pairs of a manifest's CSV text, cells stripped. Rows
    of empty cells (",,,", as spreadsheets save after the data) are skipped; a header split
    by semicolons (spreadsheets in locales with a decimal comma: it reads as one column)
    and a row with more cells than the header (a shifted row) are refused naming the fix."""
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if len(columns) == 1 and ";" in columns[0]:
        raise ManifestError(f"manifest {path}: its columns are separated by semicolons ({columns[0][:60]!r}); save it "
                            "as a CSV with commas (in a spreadsheet: comma as the list separator, or export as "
                            "'CSV UTF-8')")
    rows = []
    for row in reader:
        if None in row and any(v.strip() for v in row[None]):
            raise ManifestError(f"{path}: line {reader.line_num} has {len(row[None])} more cell(s) than the header's "
                                f"{len(columns)} columns ({row[None][:3]}); quote values that hold commas")
        cells = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if any(cells.values()):
            rows.append((reader.line_num, cells))
    return columns, rows


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


def _meant(column: str) -> str | None:
    """The known column a metadata column looks like a misspelling of (None when it does not):
    a different case or spelling of slide_id / path / patient_id / mpp / split / label."""
    import difflib

    known = [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, "label"]
    low = column.lower()
    if low in known or LABEL_PATTERN.match(low):  # a known name in other letter case
        return low
    if low.startswith("label"):  # labels, label-x ...
        return "label"
    close = difflib.get_close_matches(low.replace(" ", "_"), known, n=1, cutoff=0.8)
    return close[0] if close else None


def entry_columns(entries: list[Any]) -> dict[str, dict[str, str]]:
    """id -> the manifest columns of each entry (slide or image: its metadata, labels,
    patient and split), for the audit's --subgroups and --label-sources."""
    return {e.slide_id: {**e.meta, **e.labels, "patient_id": e.patient_id or "", "split": e.split or ""}
            for e in entries}


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
        _, text = _split_directives(path.read_text(encoding="utf-8-sig"))
        columns, numbered = csv_rows(text, path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc}). It must be a UTF-8 CSV.") from exc
    where = f"manifest {path}"
    rows = [row for _, row in numbered]
    required = REQUIRED_COLUMNS if require_path else ("slide_id",)
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(
            f"{where}: missing required column(s) {missing}; found {_preview(columns)}. "
            f"A manifest needs at least {' and '.join(repr(c) for c in required)} (see slides_manifest/README.md)."
        )
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and not LABEL_PATTERN.match(c)]
    misspelt = {c: meant for c in unknown if (meant := _meant(c))}
    if misspelt:
        raise ManifestError(
            f"{where}: column(s) {list(misspelt)} look like misspelt " + ", ".join(
                f"{c!r} (did you mean {m!r}?)" for c, m in misspelt.items())
            + f". Allowed: {list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}, label columns named 'label' or 'label_<name>', "
            "and other metadata columns (site, sex, age ...: for --subgroups). Rename them."
        )
    if unknown:
        logger.info("%s: column(s) %s kept as metadata (usable with --subgroups / --label-sources)", where, unknown)
    if not rows:
        raise ManifestError(f"{where}: no slides listed. Add one row per slide.")
    if "patient_id" not in columns:
        logger.warning("%s: no 'patient_id' column; training will need one for patient-level splits", where)

    entries: list[SlideEntry] = []
    problems: list[str] = []
    for line, row in numbered:
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
        meta = {k: v for k, v in row.items() if k not in labels and k not in ("slide_id", "path")}
        if meta.get("annotations") and not Path(meta["annotations"]).is_absolute():  # (tile reads the file)
            meta["annotations"] = str(path.parent / meta["annotations"])
        entries.append(SlideEntry(sid, slide_path, row.get("patient_id") or None, mpp, labels,
                                  (row.get("split") or "").lower() or None, meta))
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


#: files a folder scan never takes for slides: the sidecars of slides and of other tools
SIDECAR_SUFFIXES = {".json", ".csv", ".txt", ".xml", ".md", ".yaml", ".yml", ".log", ".geojson", ".h5",
                    ".db", ".ini", ".sha256", ".md5", ".partial"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
#: DICOM VL Whole Slide Microscopy Image Storage
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


@dataclass
class ResolvedInputs:
    entries: list[SlideEntry]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def resolve_inputs(inputs: list[str | Path]) -> list[SlideEntry]:
    """Slides from a mix of slide files, folders (non-recursive) and manifest CSVs."""
    return resolve_inputs_reporting(inputs).entries


def resolve_inputs_reporting(inputs: list[str | Path]) -> ResolvedInputs:
    """Like :func:`resolve_inputs`, with the files a folder scan left out and why.

    DICOM files (``.dcm``/``.dicom``, from folders or given one by one) are grouped by
    SeriesInstanceUID from their headers: a DICOM whole-slide image is one series of
    files, one per pyramid level (plus label / overview images), and is one slide.
    A folder scan skips sidecar files (JSON, CSV, ...) and images that belong to a slide
    beside them (``<slide>.tumour.png``, ``<slide>.mask.png``)."""
    entries: list[SlideEntry] = []
    skipped: list[dict[str, str]] = []
    dicoms: list[Path] = []
    from_manifest: set[int] = set()
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            if not item.exists():
                raise ManifestError(f"manifest {item} not found")
            rows = read_manifest(item)
            from_manifest.update(id(e) for e in rows)
            entries.extend(rows)
        elif item.is_dir():
            found, left = _scan_folder(item)
            skipped += left
            dicoms += [p for p in found if _is_dicom_name(p)]
            slides = [p for p in found if not _is_dicom_name(p)]
            if not found:
                logger.warning("%s: no slide files found (looked for %s)", item,
                               ", ".join(sorted(SLIDE_SUFFIXES | DICOM_SUFFIXES)))
            entries.extend(SlideEntry(slide_id_from_path(p), p) for p in slides)
        elif _is_dicom_name(item) and item.is_file():
            dicoms.append(item)
        else:  # a slide file, possibly missing: reported per slide by the run
            entries.append(SlideEntry(slide_id_from_path(item), item))
    if dicoms:
        series, left = group_dicom_series(list(dict.fromkeys(p.resolve() for p in dicoms)))
        entries += series
        skipped += left
    entries = _one_entry_per_file(entries, skipped, from_manifest)
    for s in skipped:
        logger.debug("skipped %s: %s", s["path"], s["reason"])
    if not entries:
        raise ManifestError("no slides to process: give slide files, folders of slides or a manifest CSV"
                            + (f" ({len(skipped)} file(s) skipped, e.g. {skipped[0]['path']}: {skipped[0]['reason']})"
                               if skipped else ""))
    problems: list[str] = []
    _check_duplicates(entries, "inputs", problems)
    if problems:
        raise ManifestError(problems[0] + " (two inputs share a file name; use a manifest with explicit slide_ids)")
    return ResolvedInputs(entries, skipped)


def _one_entry_per_file(entries: list[SlideEntry], skipped: list[dict[str, str]],
                        from_manifest: set[int]) -> list[SlideEntry]:
    """Slides given as files or folders that are one file (a link and its target, one path
    given twice): the first kept, the others listed as skipped; manifest rows are kept as
    they are (their ids are the user's; tile reports them as one file)."""
    seen: dict[Path, str] = {}
    kept = []
    for e in entries:
        try:
            real = Path(e.path).resolve() if e.path is not None and Path(e.path).exists() else None
        except OSError:
            real = None
        if real is not None and real in seen and id(e) not in from_manifest:
            skipped.append({"path": str(e.path), "reason": f"the same file as slide {seen[real]} ({real}); tiled once"})
            continue
        if real is not None:
            seen.setdefault(real, e.slide_id)
        kept.append(e)
    return kept


def _is_dicom_name(p: Path) -> bool:
    return p.suffix.lower() in DICOM_SUFFIXES


def _scan_folder(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Slide candidates of one folder (not recursive) and every entry left out, with why:
    subfolders, hidden files, links that lead nowhere or in a loop, sidecars and other
    file types (nothing is dropped without a word)."""
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        try:
            is_file, is_dir = p.is_file(), p.is_dir()
        except OSError as exc:  # a link loop (ELOOP) and the like
            skipped.append({"path": str(p), "reason": f"cannot be followed ({exc.strerror or exc}): a link loop?"})
            continue
        if p.is_symlink() and not (is_file or is_dir):
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            skipped.append({"path": str(p), "reason": f"a link to {target}, which does not exist (or loops)"})
        elif is_dir:
            skipped.append({"path": str(p), "reason": "a subfolder: folders are not scanned recursively; give it as an "
                                                      "input of its own (a DICOM series folder too), or list its slides "
                                                      "in a manifest"})
        elif p.name.startswith("."):
            skipped.append({"path": str(p), "reason": "a hidden file"})
        elif is_file:
            files.append(p)
        else:
            skipped.append({"path": str(p), "reason": "not a regular file (a device, socket or pipe)"})
    slide_like = SLIDE_SUFFIXES | DICOM_SUFFIXES
    stems = {slide_id_from_path(p) for p in files if p.suffix.lower() in slide_like - {".png", ".jpg", ".jpeg"}}
    found = []
    for p in files:
        suffix = p.suffix.lower()
        if suffix in slide_like:
            owner = next((st for st in stems if p.name.startswith(st + ".") and p.stem != st), None)
            if suffix in {".png", ".jpg", ".jpeg"} and owner is not None:
                skipped.append({"path": str(p), "reason": f"an image beside slide {owner} (mask or sidecar), not a slide"})
            else:
                found.append(p)
        elif suffix in SIDECAR_SUFFIXES:
            skipped.append({"path": str(p), "reason": f"a {suffix} file, not a slide"})
        else:
            skipped.append({"path": str(p), "reason": f"file type {suffix or '(none)'} is not a slide format wsi-mil reads "
                            "(give it explicitly if OpenSlide can open it)"})
    return found, skipped


def group_dicom_series(paths: list[Path]) -> tuple[list[SlideEntry], list[dict[str, str]]]:
    """One slide per DICOM whole-slide series (headers only are read).

    The slide's path is the file of its largest level (OpenSlide opens the whole series
    from any of its files, finding the others in the same folder); its id is the series'
    SeriesInstanceUID, or the file's name without suffix for a series of one file — never
    the folder's name, which many exports share (``.../DICOM/``). Files that are not whole-slide DICOM (CT, a report ...) or cannot be read
    are left out with the reason."""
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return [SlideEntry(slide_id_from_path(p), p) for p in paths], []
    series: dict[str, list[tuple[int, Path]]] = {}
    skipped: list[dict[str, str]] = []
    tags = ["SeriesInstanceUID", "SOPClassUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]
    for p in sorted(set(paths)):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=tags)
        except Exception as exc:  # noqa: BLE001 - any unreadable header is reported, never fatal
            skipped.append({"path": str(p), "reason": f"not a readable DICOM file ({type(exc).__name__}: {exc})"})
            continue
        if str(getattr(ds, "SOPClassUID", "")) != WSI_SOP_CLASS:
            skipped.append({"path": str(p), "reason": f"a DICOM file of another kind (SOP class {getattr(ds, 'SOPClassUID', '?')}), "
                            "not a whole-slide image"})
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or f"file:{p}")
        size = int(getattr(ds, "TotalPixelMatrixColumns", 0) or 0) * int(getattr(ds, "TotalPixelMatrixRows", 0) or 0)
        image_type = [str(v).upper() for v in (getattr(ds, "ImageType", []) or [])]
        if "LABEL" in image_type or "OVERVIEW" in image_type or "THUMBNAIL" in image_type:
            size = -1  # never the file the slide is opened by
        series.setdefault(uid, []).append((size, p))
    entries = []
    for uid, members in series.items():
        size, main = max(members, key=lambda m: (m[0], str(m[1])))
        if size < 0:
            skipped += [{"path": str(p), "reason": "a DICOM label/overview image whose slide's levels are not in the inputs"}
                        for _, p in members]
            continue
        # named by the series, never the folder (per-patient .../DICOM/ folders, or two lone files of one
        # folder tiled in two runs, would share a name and one store would replace the other's)
        lone = len(members) == 1 or uid.startswith("file:")
        sid = main.stem if lone else uid
        if not _SAFE_ID.match(sid):
            sid = "dicom-" + (uid.replace(".", "")[-24:] if not uid.startswith("file:") else
                              hashlib.sha256(str(main.resolve()).encode()).hexdigest()[:16])
        entries.append(SlideEntry(sid, main))
        if len(members) > 1:
            logger.info("%s: DICOM series %s of %d files read as one slide (opened by %s)", sid, uid, len(members), main.name)
    return entries, skipped
