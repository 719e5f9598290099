"""Bags for MIL: slide labels from a manifest joined with the feature stores.

A bag is one slide: its instance features (N, D), their level-0 coordinates, and its
target. The task is inferred from the manifest's label columns unless given:

* one ``label`` column with two values -> **binary** (one logit; the positive class is the
  value that names it — ``1``/``true``/``yes``/``positive``/``tumour``/``malignant``/
  ``abnormal`` ..., or the other of ``0``/``normal``/``benign``/``negative`` ...; two values
  these lists cannot order are refused: ``--classes NEG,POS`` says it);
* one ``label`` column with more values -> **multi-class** (softmax over the classes);
* several ``label_<name>`` columns of 0/1 -> **multi-label** (one sigmoid per label).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from wsi_mil import choices
from wsi_mil.choices import names
from wsi_mil.data.manifest import SlideEntry
from wsi_mil.errors import ConfigError, ManifestError, StoreError

if TYPE_CHECKING:
    from wsi_mil.data.images import ImageEntry
    from wsi_mil.tasks import TaskKind

TASKS = names(choices.TASKS)
#: label values that name the positive class of a binary task ...
_POSITIVE = {"1", "1.0", "true", "yes", "positive", "pos", "tumour", "tumor", "abnormal", "malignant", "malignancy", "cancer",
             "carcinoma", "metastasis", "metastases", "metastatic", "lesion", "disease", "diseased"}
#: ... and the negative one; two values that these lists cannot order are refused (--classes NEG,POS)
_NEGATIVE = {"0", "0.0", "false", "no", "negative", "neg", "normal", "benign", "healthy", "control", "none", "no finding",
             "non-tumour", "non-tumor", "nontumour", "nontumor"}
POSITIVE_VALUES, NEGATIVE_VALUES = _POSITIVE, _NEGATIVE  # (what the task kinds read)
#: values of a 0/1 label column; a column holding two of these and anything else has a stray value
_BINARY_CODES = {"0", "1", "0.0", "1.0", "true", "false", "yes", "no"}  # 0.0 / 1.0: pandas' writing
#: cell values that mean "no label" in spreadsheets and pandas exports; never a class
MISSING_TOKENS = {"nan", "na", "n/a", "none", "null", "?", "-", "missing", "unknown", "#n/a"}
#: fewest slides a class (or a label's positives / negatives) may have; fewer is an error
MIN_SLIDES_PER_CLASS = 5


@dataclass(frozen=True)
class Task:
    """What is predicted: ``kind`` and the names of the outputs (one per logit).

    ``classes`` are the class names shown in reports, predictions, heatmaps and the review
    page: (negative, positive) for binary, the classes for multi-class. ``values`` are the
    label values in the manifest that stand for them, in the same order (they differ when
    the classes were named with ``--classes`` over a column coded 0/1)."""

    kind: str
    outputs: tuple[str, ...]
    label_columns: tuple[str, ...]
    classes: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    #: a regression's (mean, sd) of the development slides' targets: the model predicts the
    #: standardised target, reported in the target's units (recorded with the models)
    scale: tuple[float, float] | None = None
    #: a multi-task run's targets (each a task of its own, sharing the model's aggregator) and their loss weights
    parts: tuple[Task, ...] = ()
    weights: tuple[float, ...] = ()
    #: a discrete-time survival model's number of time intervals (0: Cox) and their inner edges, fitted on
    #: the development slides' event times (recorded with the models)
    time_bins: int = 0
    bins: tuple[float, ...] = ()
    #: a regression's loss (huber, mse) and whether it trains on the standardised target (recorded with the models)
    loss: str = "huber"
    standardise: bool = True

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    @property
    def n_logits(self) -> int:
        """The model's outputs: one per output, a hazard per time interval (discrete-time survival), or the
        parts' together (multi-task)."""
        if self.parts:
            return sum(p.n_logits for p in self.parts)
        return self.time_bins or self.n_outputs

    @property
    def n_targets(self) -> int:
        """Values per sample's target: one per output, a survival's time and event, or a multi-task's parts' together."""
        if self.parts:
            return sum(p.n_targets for p in self.parts)
        return len(self.label_columns) if self.kind == "survival" else self.n_outputs

    @property
    def label_values(self) -> tuple[str, ...]:
        return self.values or self.classes

    @property
    def kind_obj(self) -> TaskKind:
        """What this kind of task does (:mod:`wsi_mil.tasks`): loss, activation, metrics, report."""
        from wsi_mil.tasks import kind_of

        return kind_of(self.kind)

    def target(self, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        """The float target vector of one slide (one-hot for multi-class; NaN: not labelled)."""
        return self.kind_obj.encode(self, labels, where)

    def describe(self, entries: Sequence[SlideEntry | ImageEntry] | None = None) -> str:
        """One line: the task, its classes and (given the entries) slides per class."""
        return self.kind_obj.describe(self, entries)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "outputs": list(self.outputs), "label_columns": list(self.label_columns),
             "classes": list(self.classes), "values": list(self.label_values)}
        if self.parts:
            d |= {"parts": [p.to_dict() for p in self.parts], "weights": list(self.weights)}
        if self.time_bins:
            d |= {"time_bins": self.time_bins, "bins": list(self.bins)}
        if self.loss != "huber" or not self.standardise:  # (left out at their defaults: older runs' files alike)
            d |= {"loss": self.loss, "standardise": self.standardise}
        return d | ({"scale": list(self.scale)} if self.scale is not None else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        scale = d.get("scale")
        return cls(d["kind"], tuple(d["outputs"]), tuple(d["label_columns"]), tuple(d.get("classes", ())),
                   tuple(d.get("values", ())), (float(scale[0]), float(scale[1])) if scale else None,
                   tuple(cls.from_dict(p) for p in d.get("parts", ())), tuple(float(w) for w in d.get("weights", ())),
                   int(d.get("time_bins", 0)), tuple(float(b) for b in d.get("bins", ())), str(d.get("loss", "huber")),
                   bool(d.get("standardise", True)))


def _rows_with(entries: list[SlideEntry], column: str, values: set[str], n: int = 6) -> str:
    hits = [f"{e.slide_id}={e.labels.get(column, '')!r}" for e in entries if e.labels.get(column, "").strip() in values]
    return ", ".join(hits[:n]) + (f", ... ({len(hits)} in all)" if len(hits) > n else "")


def infer_task(entries: list[Any], kind: str = "auto", label: str | None = None,
               classes: list[str] | None = None, min_per_class: int = MIN_SLIDES_PER_CLASS,
               allow_blank: bool = False, unit: str = "slide", targets: str | None = None,
               target_weights: str | None = None, time_bins: int = 0) -> Task:
    """The task of a labelled manifest (see the module docstring), with every label value
    validated: a missing-value token (``NaN``, ``NA`` ...), a stray value in a 0/1 column,
    a value outside ``classes`` or a class with fewer than ``min_per_class`` slides is an
    error naming the slides, never a silently different task. With ``allow_blank`` (images)
    a blank cell means "not labelled" (NaN in the target, masked out of loss and metrics).
    ``unit`` is the word the errors use (slide, image, volume). ``targets`` (``--targets``) makes a
    multi-task: each target's column checked as its own task would be, blank cells allowed (that
    target masked for that slide), a slide without any target refused. ``time_bins`` > 0 makes a
    survival target a discrete-time one with that many intervals."""
    if kind not in TASKS:
        raise ConfigError(f"task {kind!r}: choose one of {list(TASKS)}")
    if targets or kind == "multitask":
        return _multitask(entries, targets, target_weights, min_per_class, unit, time_bins)
    if kind == "survival":
        return _survival_task(entries, label, classes, min_per_class, allow_blank, unit, time_bins)
    columns = sorted({c for e in entries for c in e.labels})
    if label:
        if label not in columns:
            raise ManifestError(f"label column {label!r} not in the manifest; it has {columns or 'no label columns'}")
        columns = [label]
    if not columns:
        raise ManifestError("the manifest has no label column; add 'label' (or 'label_<name>' columns) to train")
    unlabelled = [e.slide_id for e in entries if any(not e.labels.get(c, "").strip() for c in columns)]
    if unlabelled and not allow_blank:
        raise ManifestError(f"{len(unlabelled)} {unit}(s) have no label ({', '.join(unlabelled[:5])}); "
                            "label them or leave them out of the manifest")
    for c in columns:
        tokens = {e.labels[c].strip() for e in entries if e.labels[c].strip().lower() in MISSING_TOKENS}
        if tokens:
            raise ManifestError(f"column {c!r} holds missing-value markers instead of labels: "
                                f"{_rows_with(entries, c, tokens)}. Label these {unit}s or leave them out of the manifest"
                                + (" (or leave the cell empty: an empty cell is 'not labelled' here)" if allow_blank else ""))
    if kind == "regression":
        return _regression_task(entries, columns, classes, min_per_class, unit)
    said_multiclass = kind == "multiclass"
    if kind == "auto" and {"label_time", "label_event"} <= set(columns):
        raise ManifestError("the manifest has label_time and label_event: a survival task, which is never guessed; "
                            "pass --task survival")
    if kind == "auto" and classes:
        kind = "binary" if len(classes) == 2 else "multiclass"
    if kind == "auto":
        kind = "multilabel" if len(columns) > 1 else ("binary" if len({e.labels[columns[0]].strip() for e in entries} - {""}) <= 2 else "multiclass")
    if kind == "multilabel":
        if classes:
            raise ConfigError("--classes names the classes of one label column; a multi-label task takes its "
                              "label names from the label_<name> columns")
        names = tuple(c.removeprefix("label_") for c in columns)
        task = Task("multilabel", names, tuple(columns))
        _check_multilabel_counts(entries, task, min_per_class, unit)
        return task
    if len(columns) > 1:
        raise ManifestError(f"a {kind} task needs one label column; the manifest has {columns} (pick one with --label)")
    col = columns[0]
    values = sorted({e.labels[col].strip() for e in entries} - {""})
    codes = [v for v in values if v.lower() in _BINARY_CODES]
    stray = [v for v in values if v.lower() not in _BINARY_CODES]
    if not classes and len(codes) >= 2 and stray and not said_multiclass:
        raise ManifestError(f"column {col!r} codes classes as {codes} but also holds {stray}: "
                            f"{_rows_with(entries, col, set(stray))}. Fix these labels; if the column really has "
                            f"{len(values)} classes, say so with --task multiclass or name them with --classes")
    if classes:
        task = _named_task(entries, kind, col, values, classes)
    elif kind == "binary":
        if len(values) > 2:
            raise ManifestError(f"--task binary, but column {col!r} has {len(values)} values {values[:6]}: "
                                f"{_rows_with(entries, col, set(values[2:]))}; a binary task takes exactly two")
        if len(values) == 1:  # a cohort with one class cannot be trained, but say so clearly
            raise ManifestError(f"every {unit} has label {values[0]!r}; a classifier needs both classes")
        task = Task("binary", *_binary_order(col, values))
    else:
        task = Task("multiclass", tuple(values), (col,), tuple(values))
    small = [(name, value) for name, value in zip(task.classes, task.label_values, strict=True)
             if sum(e.labels[col].strip() == value for e in entries) < min_per_class]
    if small:
        listing = "; ".join(f"class {name!r}: {_rows_with(entries, col, {value})}" for name, value in small[:6])
        if len(small) > 6:  # (a numeric column read as classes has hundreds: the point is made by a few)
            listing += f"; ... ({len(small)} classes in all; is {col!r} a number to regress, --task regression?)"
        raise ManifestError(f"fewer than {min_per_class} {unit}s in {listing}. A class this small cannot be trained "
                            f"or evaluated; fix the labels if these are typos, or add {unit}s of the class")
    return task


def _regression_task(entries: list[Any], columns: list[str], classes: list[str] | None, min_per_class: int,
                     unit: str) -> Task:
    """One numeric label column, every value a finite number (a typo is named, never read as 0)."""
    from wsi_mil.tasks.base import finite_number

    if classes:
        raise ConfigError("--classes names classes; a regression target has none")
    if len(columns) > 1:
        raise ManifestError(f"a regression task needs one label column; the manifest has {columns} (pick one with --label)")
    col = columns[0]
    bad = {e.labels[col].strip() for e in entries if e.labels[col].strip() and finite_number(e.labels[col]) is None}
    if bad:
        raise ManifestError(f"column {col!r} of a regression task holds values that are not finite numbers: "
                            f"{_rows_with(entries, col, bad)}. Fix them or leave these {unit}s out")
    values = [finite_number(e.labels[col]) for e in entries if e.labels[col].strip()]
    if len(values) < 2 * min_per_class:
        raise ManifestError(f"{len(values)} labelled {unit}(s): too few to train and evaluate a regression "
                            f"(at least {2 * min_per_class})")
    if len(set(values)) < 2:
        raise ManifestError(f"every {unit} has the value {values[0]!r} in column {col!r}: nothing to regress")
    return Task("regression", (col,), (col,))


def _survival_task(entries: list[Any], label: str | None, classes: list[str] | None, min_per_class: int,
                   allow_blank: bool, unit: str, time_bins: int = 0) -> Task:
    """Follow-up time and event columns, each value checked (a time < 0, an event other than 0 / 1 is named)."""
    from wsi_mil.tasks.survival import EVENT, TIME

    if label or classes:
        raise ConfigError(f"a survival task reads the columns {TIME} and {EVENT}; --label and --classes do not apply")
    columns = sorted({c for e in entries for c in e.labels})
    missing = [c for c in (TIME, EVENT) if c not in columns]
    if missing:
        raise ManifestError(f"--task survival needs the columns {TIME} (follow-up time) and {EVENT} (1: event, "
                            f"0: censored); the manifest lacks {missing} (it has {columns or 'no label columns'})")
    task = Task("survival", ("risk",), (TIME, EVENT), time_bins=time_bins)
    half = [e.slide_id for e in entries if bool(e.labels.get(TIME, "").strip()) != bool(e.labels.get(EVENT, "").strip())]
    if half:
        raise ManifestError(f"{len(half)} {unit}(s) have a follow-up time without an event or the reverse: "
                            f"{', '.join(half[:5])}. Give both or neither")
    blank = [e.slide_id for e in entries if not e.labels.get(TIME, "").strip()]
    if blank and not allow_blank:
        raise ManifestError(f"{len(blank)} {unit}(s) have no follow-up ({', '.join(blank[:5])}); give their "
                            f"{TIME} and {EVENT} or leave them out of the manifest")
    targets = np.stack([task.target(e.labels, f"{unit} {e.slide_id}") for e in entries])  # (each value checked)
    known = ~np.isnan(targets).any(axis=1)
    if len(np.unique(targets[known, 0])) < 2:
        raise ManifestError(f"every {unit}'s {TIME} is {targets[known, 0][0]:g}: follow-up times that do not differ "
                            "cannot order anyone's risk")
    n_events = int(targets[known, 1].sum())
    if time_bins and n_events < 2 * time_bins:
        raise ManifestError(f"{n_events} event(s) for --time-bins {time_bins}: each time interval needs events to "
                            f"learn its hazard; use fewer intervals (at most {max(1, n_events // 2)})")
    if n_events < min_per_class or known.sum() - n_events < min_per_class:
        raise ManifestError(f"{n_events} event(s) and {int(known.sum()) - n_events} censored {unit}(s): a survival "
                            f"model needs at least {min_per_class} of each to be trained and evaluated")
    return task


def _multitask(entries: list[Any], targets: str | None, target_weights: str | None, min_per_class: int,
               unit: str, time_bins: int = 0) -> Task:
    """The targets of ``--targets``, each checked as a task of its own (blank cells allowed)."""
    from wsi_mil.tasks.multitask import output_names, parse_targets, parse_weights

    spec = parse_targets(targets)
    columns = sorted({c for e in entries for c in e.labels})
    parts = []
    for column, kind in spec:
        if kind == "survival":
            parts.append(_survival_task(entries, None, None, min_per_class, True, unit, time_bins))
            continue
        if column not in columns:
            raise ManifestError(f"--targets: {column!r} is not a label column of the manifest; it has "
                                f"{columns or 'no label columns'} (label columns are named label or label_<name>)")
        try:
            parts.append(infer_task(entries, kind, column, None, min_per_class, allow_blank=True, unit=unit))
        except (ManifestError, ConfigError) as exc:
            raise type(exc)(f"--targets {column}: {exc}") from exc
    task = Task("multitask", tuple(o for p in parts for o in output_names(p)),
                tuple(c for p in parts for c in p.label_columns), parts=tuple(parts),
                weights=parse_weights(target_weights, len(parts)))
    none = [e.slide_id for e in entries if np.isnan(task.target(e.labels, f"{unit} {e.slide_id}")).all()]
    if none:
        raise ManifestError(f"{len(none)} {unit}(s) have none of the targets ({', '.join(none[:5])}); label them or "
                            "leave them out of the manifest")
    return task


def _binary_order(col: str, values: list[str]) -> tuple[tuple[str], tuple[str], tuple[str, str]]:
    """(outputs, label columns, (negative, positive)) of a two-valued column, ordered by the
    names' meaning (``_POSITIVE`` / ``_NEGATIVE``: ``normal`` is negative whatever it sorts
    after), never by the alphabet: two values the lists cannot order are refused."""
    a, b = values
    pos = [v for v in values if v.lower() in _POSITIVE]
    neg = [v for v in values if v.lower() in _NEGATIVE]
    if len(pos) == 1 and pos[0] not in neg:
        positive = pos[0]
    elif len(neg) == 1 and neg[0] not in pos:
        positive = b if neg[0] == a else a
    else:
        raise ManifestError(f"column {col!r} holds {a!r} and {b!r}: which is the positive class cannot be told from "
                            f"the names. Say it with --classes NEG,POS (e.g. --classes {a},{b} makes {b!r} positive), "
                            f"or a '# classes: NEG,POS' line at the top of the manifest")
    negative = b if positive == a else a
    return (positive,), (col,), (negative, positive)


def _named_task(entries: list[SlideEntry], kind: str, col: str, values: list[str], classes: list[str]) -> Task:
    """The task for ``--classes`` (or the manifest's ``# classes:`` line): the names are the
    label values themselves, in order (negative first for binary), or name the codes 0..k-1."""
    names = [c.strip() for c in classes]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ConfigError(f"--classes {','.join(classes)}: class names must be distinct and non-empty")
    if kind == "binary" and len(names) != 2:
        raise ConfigError(f"--task binary takes two class names (negative, positive); got {names}")
    codes = [str(i) for i in range(len(names))]
    if set(values) <= set(names):
        label_values = names
    elif set(values) <= set(codes):
        label_values = codes
    else:
        allowed = set(names) | set(codes)
        stray = sorted(set(values) - allowed) if set(values) & set(names) else sorted(set(values) - set(codes))
        raise ManifestError(f"column {col!r} holds {stray} outside the classes {names} (or their codes "
                            f"{codes}): {_rows_with(entries, col, set(stray))}. Fix these labels or the class list")
    outputs = (names[1],) if kind == "binary" else tuple(names)
    return Task(kind, outputs, (col,), tuple(names), tuple(label_values))


def _check_multilabel_counts(entries: list[Any], task: Task, min_per_class: int, unit: str = "slide") -> None:
    problems = []
    for name, col in zip(task.outputs, task.label_columns, strict=True):
        pos = sum(e.labels[col].strip().lower() in _POSITIVE for e in entries)
        neg = sum(e.labels[col].strip().lower() in _NEGATIVE for e in entries)
        if pos < min_per_class or neg < min_per_class:
            problems.append(f"{name}: {pos} positive, {neg} negative")
    if problems:
        raise ManifestError(f"labels with fewer than {min_per_class} positive or negative {unit}s: "
                            f"{'; '.join(problems)}. Drop the label column or add {unit}s")


@dataclass
class Bag:
    slide_id: str
    patient_id: str
    target: npt.NDArray[np.float32]
    store: Path | None
    split: str | None = None
    features: npt.NDArray[np.float32] | None = None
    coords: npt.NDArray[np.int64] | None = None
    step_px: float = 1.0  # tiling grid step, level-0 px (positions for coordinate-aware models)
    meta: dict[str, Any] = field(default_factory=dict)
    extent_px: float = 1.0  # patch side, level-0 px (what a heatmap draws)
    stratum: str | None = None  # the splits' stratum where the task kind gives one (else the class)
    covariates: npt.NDArray[np.float32] | None = None  # the encoded --covariates of the fold being trained

    def load(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(features, level-0 coords); read from the store unless held in memory."""
        if self.features is not None and self.coords is not None:
            return self.features, self.coords
        if self.store is None:
            raise StoreError(f"{self.slide_id}: no feature store")
        from wsi_mil.io.features import FeatureStore, check_finite

        with FeatureStore(self.store) as fs:
            return check_finite(self.store, fs.features), fs.coords

    def cache(self) -> Bag:
        self.features, self.coords = self.load()
        return self

    @property
    def label_index(self) -> int:
        """Class index (multi-class) or the binary label; -1 for multi-label."""
        if len(self.target) == 1:
            return int(self.target[0] > 0.5)
        return int(np.argmax(self.target)) if abs(self.target.sum() - 1) < 1e-6 else -1


def find_feature_store(features: Path, slide_id: str) -> Path | None:
    for suffix in (".h5", ".zarr"):
        p = features / f"{slide_id}{suffix}"
        if p.exists():
            return p
    return None


def feature_store_attrs(store: Path) -> dict[str, Any] | None:
    """Root attributes of a finished feature store (one open), or None when the store is
    incomplete, unreadable or holds no features."""
    from wsi_mil.io.features import FeatureStore

    try:
        with FeatureStore(store) as fs:
            attrs = fs.attrs
            has_features = "features" in fs._root
    except Exception:  # noqa: BLE001 - a damaged store is reported as missing
        return None
    return attrs if attrs.get("complete") is True and has_features else None


def source_patch_store(feature_attrs: dict[str, Any], feature_store: Path | None = None
                       ) -> tuple[Path | None, dict[str, Any]]:
    """The patch store a feature store was made from and its root attributes ((None, {})
    when it is gone; {} when it is unreadable); ``feature_store`` (its path) resolves the
    relative record."""
    from wsi_mil.io.paths import resolve_recorded
    from wsi_mil.io.store import PatchStore

    source = resolve_recorded(feature_attrs, "source_store", feature_store.parent if feature_store else Path("."))
    if source is None:
        return None, {}
    try:
        with PatchStore(source) as ps:
            return source, ps.attrs
    except Exception:  # noqa: BLE001 - callers treat a damaged store as missing
        return source, {}


def source_patch_store_attrs(feature_attrs: dict[str, Any], feature_store: Path | None = None) -> dict[str, Any]:
    """Root attributes of the patch store a feature store was made from ({} when it is gone
    or unreadable)."""
    return source_patch_store(feature_attrs, feature_store)[1]


def patch_geometry(attrs: dict[str, Any], store: Path | None = None) -> tuple[float, float]:
    """(patch extent, grid step) in level-0 px of a feature store. Stores written before
    these were recorded are resolved through their source patch store; bags without
    geometry (imported classic MIL sets) get 1.0."""
    extent, step = attrs.get("extent_level0_px"), attrs.get("step_level0_px")
    if extent is None:
        from wsi_mil.tiling.grid import PatchGeometry

        pattrs = source_patch_store_attrs(attrs, store)
        if pattrs.get("extent_level0_px") is not None:
            geometry = PatchGeometry.from_store_attrs(pattrs)
            extent, step = geometry.extent_level0_px, geometry.step_level0_px
    extent_f = float(extent) if extent else 1.0
    return extent_f, float(step) if step else extent_f


def attention_feature_store(attrs: dict[str, Any], attention_store: Path | None) -> Path | None:
    """The feature store an attention store was computed from, wherever the run now is."""
    from wsi_mil.io.paths import resolve_recorded

    return resolve_recorded(attrs, "feature_store", attention_store.parent if attention_store else Path("."))


def attention_patch_extent(attrs: dict[str, Any], attention_store: Path | None = None) -> float:
    """The patch side (level-0 px) of an attention store; stores from before it was
    recorded correctly (1.0) are resolved through their feature and patch stores."""
    extent = float(attrs.get("patch_extent_level0_px") or 0.0)
    if extent > 1.0:
        return extent
    store = attention_feature_store(attrs, attention_store)
    fattrs = feature_store_attrs(store) if store is not None else None
    if fattrs:
        extent = patch_geometry(fattrs, store)[0]
        if extent > 1.0:
            return extent
    raise StoreError(f"the attention store of {attrs.get('slide_id')} does not say how large its patches are, and "
                      f"its feature store {store} cannot tell either; re-run train-mil or predict")


def bags_from_manifest(entries: list[SlideEntry], features_dirs: list[Path], task: Task,
                       split_column: dict[str, str] | None = None, *, cache: bool = False,
                       progress: bool = False) -> tuple[list[Bag], list[dict[str, str]]]:
    """Bags of every manifest slide whose feature store exists (its attributes kept in
    ``Bag.meta``); the others are returned as problems (slide_id, reason) so the caller
    can list them: a missing, incomplete or damaged store, or one with non-finite
    features (every store is read once here to check)."""
    from tqdm import tqdm

    bags: list[Bag] = []
    missing: list[dict[str, str]] = []
    folders = list(dict.fromkeys(Path(d).resolve() for d in features_dirs))
    found = {e.slide_id: [s for d in folders if (s := find_feature_store(d, e.slide_id))] for e in entries}
    clashes = [f"{sid}: {', '.join(map(str, stores))}" for sid, stores in found.items() if len(stores) > 1]
    if clashes:  # one slide id in two --features folders: which store is meant cannot be guessed
        raise ManifestError(f"{len(clashes)} slide(s) have a feature store in more than one --features folder "
                            f"({'; '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}); which one is meant "
                            "cannot be told. Give one --features folder per slide (remove the other stores or folders)")
    for e in tqdm(entries, desc="reading bags", unit="slide", disable=not progress):
        store = found[e.slide_id][0] if found[e.slide_id] else None
        if store is None:
            missing.append({"slide_id": e.slide_id, "reason": f"no feature store {e.slide_id}.h5/.zarr in "
                            f"{', '.join(map(str, features_dirs))}; check the slide_id, or run wsi-mil extract-features"})
            continue
        attrs = feature_store_attrs(store)
        if attrs is None:
            missing.append({"slide_id": e.slide_id, "reason": f"{store} is incomplete or not a feature store; re-run extract-features"})
            continue
        extent, step = patch_geometry(attrs, store)
        bag = Bag(e.slide_id, e.patient_id or e.slide_id, task.target(e.labels, f"slide {e.slide_id}"), store,
                  (split_column or {}).get(e.slide_id), step_px=step, meta=attrs, extent_px=extent)
        try:
            features = bag.cache().features if cache else bag.load()[0]
        except StoreError as exc:
            missing.append({"slide_id": e.slide_id, "reason": str(exc)})
            continue
        except (OSError, KeyError, ValueError) as exc:
            missing.append({"slide_id": e.slide_id, "reason": f"{store} cannot be read ({type(exc).__name__}: {exc}); "
                            "re-run extract-features for this slide"})
            continue
        if features is None or not len(features):  # a bag of nothing was scored at a constant probability and counted in every metric
            missing.append({"slide_id": e.slide_id, "reason": f"{store} holds no patches (tiling found no tissue that "
                            "passed its settings: see the slide's QC image); re-tile it with other tissue settings "
                            "(e.g. --min-tissue, --no-reject-pen), or leave it out of the manifest"})
            continue
        bags.append(bag)
    return bags, missing


def collate(items: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(features (n, D), coords (n, 2) in patch units, target (C,))] -> padded
    x (B, N, D), mask (B, N), coords (B, N, 2), targets (B, C)."""
    n = max(1, max(len(f) for f, _, _ in items))
    d = items[0][0].shape[1]
    x = torch.zeros(len(items), n, d)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    coords = torch.zeros(len(items), n, 2)
    for i, (f, c, _) in enumerate(items):
        x[i, :len(f)] = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
        coords[i, :len(f)] = torch.from_numpy(np.asarray(c, np.float32))
        mask[i, :len(f)] = True
    y = torch.from_numpy(np.stack([t for _, _, t in items]).astype(np.float32))
    return x, mask, coords, y


def bag_item(bag: Bag, max_instances: int | None, rng: np.random.Generator | None
             ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One bag as (features, coords in patch units, target); a random subset of at most
    ``max_instances`` instances when training."""
    feats, coords = bag.load()
    if max_instances and len(feats) > max_instances and rng is not None:
        keep = np.sort(rng.choice(len(feats), max_instances, replace=False))
        feats, coords = feats[keep], coords[keep]
    return feats, np.asarray(coords, np.float32) / bag.step_px, bag.target
