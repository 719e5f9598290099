"""Multi-task: several targets of one slide predicted by one model (``--targets
label_subtype,label_grade:regression,survival``). Each target is a task of its own (binary,
multi-class, regression or survival) with its output slice on the model's last layer: one
linear head per target on the shared aggregator (one linear map with the heads' outputs side
by side is the same thing). The loss is the weighted sum of the targets' losses
(``--target-weights``), each over the slides that have that target: a blank cell masks the
target for that slide, never counts as a value. Model selection and early stopping follow
the weighted mean of each target's skill over chance, (score - chance) / (1 - chance) (AUC
and Harrell's C: chance 0.5; R²: 0), each target's score also in the training history.
Every target gets its own metrics, thresholds, figures and report section."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from wsi_mil.tasks.base import Question, TaskKind

if TYPE_CHECKING:
    from wsi_mil.data.bags import Task

#: the target word of ``--targets`` that means a survival target (columns label_time and label_event)
SURVIVAL_TARGET = "survival"


def parse_targets(text: str | None) -> list[tuple[str, str]]:
    """(column, kind) of each ``--targets`` entry, ``COLUMN[:KIND]`` separated by commas (kind auto: binary or
    multi-class from the values); the word ``survival`` is the survival target."""
    from wsi_mil.errors import ConfigError
    from wsi_mil.tasks import KINDS

    allowed = sorted(k for k in KINDS if k not in ("multilabel", "multitask"))
    out: list[tuple[str, str]] = []
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            raise ConfigError(f"--targets {text!r}: an empty entry; give COLUMN[:KIND] entries separated by commas")
        column, _, kind = item.partition(":")
        column, kind = column.strip(), (kind.strip() or "auto")
        if column == SURVIVAL_TARGET:
            kind = SURVIVAL_TARGET if kind == "auto" else kind
        if kind not in ("auto", *allowed):
            raise ConfigError(f"--targets {item!r}: kind {kind!r} is not one of auto, {', '.join(allowed)}")
        if column in ("label_time", "label_event"):
            raise ConfigError(f"--targets {item!r}: {column} is half of the survival outcome (a follow-up time read "
                              "without its censoring, or an event without its time, is a wrong target); write the "
                              "word survival for the label_time / label_event pair")
        if (kind == SURVIVAL_TARGET) != (column == SURVIVAL_TARGET):
            raise ConfigError(f"--targets {item!r}: a survival target is written 'survival' (it reads the label_time "
                              "and label_event columns); a column names a binary, multi-class or regression target")
        out.append((column, kind))
    if len({c for c, _ in out}) != len(out):
        raise ConfigError(f"--targets {text!r}: a target is named twice")
    if len(out) < 2:
        raise ConfigError(f"--targets {text!r}: a multi-task run needs two targets or more (one target: --label with "
                          "--task)")
    return out


def parse_weights(text: str | None, n: int) -> tuple[float, ...]:
    """``--target-weights`` (one positive number per target, in the order of --targets; default 1 each)."""
    from wsi_mil.errors import ConfigError

    if not text:
        return (1.0,) * n
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--target-weights {text!r}: numbers separated by commas") from None
    if len(w) != n or not all(np.isfinite(x) and x > 0 for x in w):
        raise ConfigError(f"--target-weights {text!r}: one positive number per target ({n} targets)")
    return w


def part_name(part: Task) -> str:
    """What a target is called in outputs, reports and the history: its column without 'label_' (survival: survival)."""
    if part.kind == SURVIVAL_TARGET:
        return SURVIVAL_TARGET
    return part.label_columns[0].removeprefix("label_") or part.label_columns[0]


def output_names(part: Task) -> tuple[str, ...]:
    """A target's outputs as the multi-task model names them: a class output 'target:class', a risk or a value
    as the single-task run names it (risk; the column)."""
    if part.kind_obj.class_call:
        return tuple(f"{part_name(part)}:{o}" for o in part.outputs)
    return part.outputs


@dataclasses.dataclass(frozen=True)
class Slot:
    """One target of a multi-task run: its task, weight and slices of outputs, targets, thresholds and loss weights."""

    name: str
    task: Task
    weight: float
    out: slice
    logit: slice
    tgt: slice
    thr: slice
    lw: slice

    @property
    def kind(self) -> TaskKind:
        return self.task.kind_obj


def slots(task: Task) -> Iterator[Slot]:
    o = g = t = h = w = 0
    for part, weight in zip(task.parts, task.weights or (1.0,) * len(task.parts), strict=True):
        n_w = int(np.prod(part.kind_obj.weight_shape(part)))
        yield Slot(part_name(part), part, weight, slice(o, o + part.n_outputs), slice(g, g + part.n_logits),
                   slice(t, t + part.n_targets), slice(h, h + part.kind_obj.threshold_count(part)), slice(w, w + n_w))
        o, g, t = o + part.n_outputs, g + part.n_logits, t + part.n_targets
        h, w = h + part.kind_obj.threshold_count(part), w + n_w


def _known(y: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    return np.asarray(~np.isnan(y).any(axis=1)) if y.ndim == 2 else np.ones(len(y), bool)


def _thr(thresholds: Sequence[Any], s: Slot, rows: npt.NDArray[np.bool_]) -> list[Any]:
    """The target's thresholds (per-sample arrays cut to ``rows``)."""
    return [t if np.ndim(t) == 0 else np.asarray(t)[rows] for t in list(thresholds)[s.thr]]


def _view(m: dict[str, Any], name: str) -> dict[str, Any]:
    """The run's metrics as one target's report table reads them (each set's figures of that target)."""
    def part(mm: Any) -> dict[str, Any]:
        return (mm or {}).get("parts", {}).get(name) or {}

    out: dict[str, Any] = {k: part(m.get(k)) for k in ("ensemble_test", "pooled_validation", "ensemble_test_at_true_prevalence")}
    out["folds"] = [{"fold": f["fold"], "test": part(f.get("test")), "val": part(f.get("val"))} for f in m.get("folds", [])]
    return out


def skill(score: float | None, chance: float) -> float | None:
    """A score's skill over chance: 0 at chance, 1 perfect."""
    return None if score is None else (score - chance) / (1.0 - chance)


class Multitask(TaskKind):
    name = "multitask"
    calibrated_per_output = False
    class_call = False
    loss_over_set = True  # (a survival target's Cox loss ranks the whole set; the others' mean over it is the same)
    score_name = "weighted mean skill over chance"
    score_key = "skill"
    chance = 0.0
    column_prefix = ""

    # ---- targets
    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        return np.concatenate([p.target(labels, where) for p in task.parts]).astype(np.float32)

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        w = task.weights or (1.0,) * len(task.parts)
        return (f"multitask over {len(task.parts)} targets: "
                + "; ".join(f"[{part_name(p)}, weight {x:g}] {p.describe(entries)}"
                            for p, x in zip(task.parts, w, strict=True)))

    # ---- training
    def activation(self, logits: torch.Tensor, task: Task | None = None) -> torch.Tensor:
        assert task is not None  # (a multi-task's outputs are its targets')
        return torch.cat([s.kind.activation(logits[:, s.logit], s.task) for s in slots(task)], dim=1)

    contribution_unit = ("each target's own: a classifier's logit, a Cox model's log relative risk, a regression's "
                         "units (adding up to its prediction less the development mean)")

    def contribution_units(self, task: Task, shares: torch.Tensor) -> torch.Tensor | None:
        parts = [s.kind.contribution_units(s.task, shares[:, s.logit]) for s in slots(task)]
        return None if any(p is None for p in parts) else torch.cat([p for p in parts if p is not None], dim=1)

    def weight_shape(self, task: Task) -> tuple[int, ...]:
        return (sum(int(np.prod(s.kind.weight_shape(s.task))) for s in slots(task)),)

    def loss_weights(self, targets: npt.NDArray[np.float32], task: Task | None = None) -> torch.Tensor:
        """Each target's class weights from its labelled slides, flattened side by side."""
        assert task is not None
        parts = []
        for s in slots(task):
            y = np.asarray(targets)[:, s.tgt]
            known = y[_known(y)]
            w = s.kind.loss_weights(known, s.task) if len(known) else torch.ones(s.kind.weight_shape(s.task))
            parts.append(w.reshape(-1))
        return torch.cat(parts)

    def sample_weights(self, targets: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        from wsi_mil.errors import ConfigError

        raise ConfigError("--imbalance sampler draws slides by one class; a multi-task run has several targets "
                          "(use --imbalance weighted: each classifier target's loss weighted by its classes)")

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, mode: str,
             gamma: float, task: Task | None = None) -> torch.Tensor:
        """The weighted sum of the targets' losses, each over the slides where that target is known."""
        assert task is not None
        total = logits.float().sum() * 0.0
        for s in slots(task):
            w = None if weights is None else weights[s.lw].reshape(s.kind.weight_shape(s.task))
            total = total + s.weight * s.kind.loss(logits[:, s.logit], y[:, s.tgt], w, mode, gamma, s.task)
        return total

    def score_parts(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> dict[str, float | None]:
        """Each target's own validation score (the training history's per-target columns)."""
        out = {}
        for s in slots(task):
            y, p = targets[:, s.tgt], probs[:, s.out]
            k = _known(y)
            out[s.name] = s.kind.score(s.task, y[k], p[k]) if k.any() else None
        return out

    def score(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float | None:
        """The weighted mean of the targets' skill over chance (targets whose score is undefined left out)."""
        scores = self.score_parts(task, targets, probs)
        return _combine(task, {s.name: skill(scores[s.name], s.kind.chance) for s in slots(task)})

    def covariate_model(self, task: Task, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Any:
        fits = [(s, s.kind.covariate_model(s.task, x, np.asarray(y)[:, s.tgt])) for s in slots(task)]
        return lambda z: np.concatenate([f(z) for _, f in fits], axis=1)

    def configured(self, task: Task, config: Any) -> Task:
        return dataclasses.replace(task, parts=tuple(s.kind.configured(s.task, config) for s in slots(task)))

    def fitted(self, task: Task, targets: npt.NDArray[Any]) -> Task:
        parts = tuple(s.kind.fitted(s.task, np.asarray(targets)[:, s.tgt]) for s in slots(task))
        return dataclasses.replace(task, parts=parts)

    def strata(self, task: Task, targets: npt.NDArray[Any]) -> list[str] | None:
        """The first target's strata (its classes, its event, a regression's quartiles): --targets says which."""
        s = next(slots(task))
        y = np.asarray(targets)[:, s.tgt]
        own = s.kind.strata(s.task, y)
        if own is not None:
            return own
        k = _known(y)
        cls = y.argmax(axis=1) if y.shape[1] > 1 else (y[:, 0] > 0.5).astype(int)
        return [f"{s.name}={c}" if ok else "blank" for c, ok in zip(cls, k, strict=True)]

    # ---- evaluation
    def threshold_count(self, task: Task) -> int:
        return sum(s.kind.threshold_count(s.task) for s in slots(task))

    def thresholds(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], rule: str,
                   target_sensitivity: float) -> list[float]:
        out: list[float] = []
        for s in slots(task):
            k = _known(y[:, s.tgt])
            if k.any():
                out += s.kind.thresholds(s.task, y[k][:, s.tgt], p[k][:, s.out], rule, target_sensitivity)
            else:  # (no validation slide has this target: a probability's middle, a log risk's zero)
                out += [0.5 if s.kind.class_call else 0.0] * s.kind.threshold_count(s.task)
        return out

    def ensemble_thresholds(self, task: Task, per_fold: list[list[float]]) -> list[float]:
        return [t for s in slots(task) for t in s.kind.ensemble_thresholds(s.task, [f[s.thr] for f in per_fold])]

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        for s in slots(task):
            yt, k = y[:, s.tgt], _known(y[:, s.tgt])
            mm = s.kind.evaluate(s.task, yt[k], p[k][:, s.out], _thr(thresholds, s, k), config, None, ci) if k.any() else {}
            parts[s.name] = {**mm, "kind": s.task.kind, "n_not_labelled": int((~k).sum()),
                             "weight": s.weight, "skill": skill(mm.get(s.kind.score_key), s.kind.chance)}
        return {"parts": parts, "n": len(y), "skill": _combine(task, {n: v["skill"] for n, v in parts.items()})}

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        """One text: each target's call or value."""
        cols = self.prediction_columns(task, probs, thresholds)
        return "; ".join(f"{k.removeprefix('predicted_')}: {v}" for k, v in cols.items() if v not in ("", []))

    def prediction_columns(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> dict[str, Any]:
        out = {}
        for s in slots(task):
            v = s.kind.predicted(s.task, probs[s.out], list(thresholds)[s.thr])
            out[f"predicted_{s.name}"] = ";".join(v) if isinstance(v, list) else v
        return out

    def truth_columns(self, task: Task, target: npt.NDArray[Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for s in slots(task):
            t = np.asarray(target)[s.tgt]
            own = s.kind.truth_columns(s.task, t)
            if own is not None:
                out.update(own)
            elif np.isnan(t).any():
                out[s.task.label_columns[0]] = ""
            else:
                v = s.kind.predicted(s.task, t, [0.5] * s.kind.threshold_count(s.task))
                out[s.task.label_columns[0]] = ";".join(v) if isinstance(v, list) else v
        return out

    def part_views(self, task: Task, m: dict[str, Any]) -> dict[str, tuple[dict[str, Any], TaskKind]]:
        return {s.name: (_view(m, s.name), s.kind) for s in slots(task)}

    def output_columns(self, task: Task) -> list[str]:
        return [c for s in slots(task) for c in ([f"{s.kind.column_prefix}{n}" for n in output_names(s.task)]
                                                 if s.kind.class_call else s.kind.output_columns(s.task))]

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        if task is None:
            return []
        out: list[Question] = []
        for s in slots(task):
            for label, qids, y, names in s.kind.questions(s.task, ids, np.asarray(t)[:, s.tgt]):
                out.append((s.name if label is None else f"{s.name}: {label}", qids, y, names))
        return out

    def output_names(self, task: Task) -> list[str]:
        return []  # (the checks after training read one output against the rest; per target: not yet)

    def confusion_classes(self, task: Task) -> list[str]:
        return []

    def plots(self, task: Task, out: Any, y: npt.NDArray[Any], p: npt.NDArray[Any], where: str,
              thresholds: Sequence[Any] = ()) -> list[str]:
        """Each target's figures in targets/<name>/ (a binary target's ROC curve there too)."""
        from wsi_mil.eval.plots import roc_plot

        names = []
        for s in slots(task):
            k = _known(y[:, s.tgt])
            if not k.any():
                continue
            folder = Path(out) / "targets" / s.name
            folder.mkdir(parents=True, exist_ok=True)
            yt, pt = y[k][:, s.tgt], p[k][:, s.out]
            files = s.kind.plots(s.task, folder, yt, pt, where, _thr(thresholds, s, k))
            if s.kind.single_positive and len(np.unique(yt[:, 0])) == 2:
                roc_plot(folder / "roc.png", {where: (yt[:, 0], pt[:, 0])}, f"{s.name}: ROC")
                files.append("roc.png")
            names += [f"targets/{s.name}/{f}" for f in files]
        return names

    def calibration_lines(self, task: Task, ys: npt.NDArray[Any], ps: npt.NDArray[Any],
                          where: str) -> dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
        lines: dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]] = {}
        for s in slots(task):
            k = _known(ys[:, s.tgt])
            yt, pt = ys[k][:, s.tgt], ps[k][:, s.out]
            if s.kind.single_positive and len(yt):
                lines[f"{s.name} ({where})"] = (yt[:, 0], pt[:, 0])
            lines.update({f"{s.name}: {n}": v for n, v in s.kind.calibration_lines(s.task, yt, pt, where).items()})
        return lines

    # ---- report
    def threshold_rule(self, rule: str, task: Task | None = None) -> str:
        parts = task.parts if task is not None else ()
        return "per target: " + "; ".join(f"{part_name(p)}: {p.kind_obj.threshold_rule(rule, p)}" for p in parts)

    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        lines = ["Each target on the slides that have it (a blank cell masks the target for that slide). Skill: "
                 "(score - chance) / (1 - chance) of the target's score (AUC, Harrell's C: chance 0.5; R²: 0); model "
                 "selection follows the mean skill weighted by the targets' loss weights.", "",
                 "| set | " + " | ".join(f"{s.name} ({s.task.kind}, weight {s.weight:g}): {s.kind.score_name}"
                                         for s in slots(task)) + " | weighted mean skill |",
                 "|---|" + "---|" * (len(task.parts) + 1)]
        from wsi_mil.tasks.base import fmt, report_sets

        for name, mm in report_sets(m):
            parts = mm.get("parts", {})
            lines.append(f"| {name} | " + " | ".join(fmt((parts.get(s.name) or {}).get(s.kind.score_key))
                                                     for s in slots(task)) + f" | {fmt(mm.get('skill'))} |")
        for s in slots(task):
            lines += ["", f"### Target {s.name}: {s.task.describe()}", ""]
            lines += s.kind.report_table(s.task, _view(m, s.name))
        return lines

    def summary_line(self, head: dict[str, Any]) -> str:
        from wsi_mil.tasks import kind_of

        parts = head.get("parts", {})
        lines = [f"  weighted mean skill over chance {head.get('skill') if head.get('skill') is None else round(head['skill'], 3)}"]
        lines += [f"  {name}:{kind_of(mm['kind']).summary_line(mm)}" for name, mm in parts.items() if mm.get("kind")]
        return "\n".join(lines)

    def what(self, task: Task) -> str:
        return "; ".join(f"{part_name(p)}: {p.kind_obj.what(p)}" for p in task.parts)

    def value_text(self, probability: dict[str, float], digits: int = 2) -> str:
        return ", ".join(f"{k} = {v:.{digits}f}" for k, v in probability.items())


def _combine(task: Task, skills: dict[str, float | None]) -> float | None:
    pairs = [(s.weight, skills[s.name]) for s in slots(task) if skills.get(s.name) is not None]
    if not pairs:
        return None
    return float(sum(w * v for w, v in pairs if v is not None) / sum(w for w, _ in pairs))
