"""What every task kind provides, and what the kinds with one sigmoid output per label
(binary, multi-label) share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from wsi_mil.data.bags import Task


#: (label name or None, ids with a known value, their class index, class names or None)
Question = tuple[str | None, list[str], list[int], list[str] | None]


def fmt(v: Any) -> str:
    """A figure in a report table ('–' when undefined)."""
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def single_column_target(task: Task, labels: dict[str, str], where: str) -> tuple[str, tuple[str, ...]] | None:
    """(the sample's label value, the task's values) of a one-column task; None when the
    sample is not labelled; an unknown value is an error naming the sample."""
    from wsi_mil.errors import ManifestError

    value = labels.get(task.label_columns[0], "").strip()
    if not value:
        return None
    values = task.label_values
    if value not in values:
        raise ManifestError(f"{where}: label {value!r} is not one of {list(values)}")
    return value, values


def single_column_describe(task: Task, entries: Sequence[Any] | None, role: str) -> str:
    """The description of a one-column task: each class (and its label value when it was
    named with --classes) with its count of samples."""
    parts = []
    for name, value in zip(task.classes, task.label_values, strict=True):
        shown = name if name == value else f"{name} (label {value})"
        if entries is not None:
            n = sum(e.labels.get(task.label_columns[0], "").strip() == value for e in entries)
            shown += f": {n} slide(s)"
        parts.append(shown)
    return f"{task.kind} task on column {task.label_columns[0]!r}, classes ({role}{'; '.join(parts)})"


class TaskKind:
    """One kind of target. The methods take the run's :class:`wsi_mil.data.bags.Task` (its
    outputs, classes and label columns) where they need it. Defaults are those of the kinds
    with one sigmoid output per label; :class:`~wsi_mil.tasks.multiclass.Multiclass`
    overrides them."""

    name = ""
    #: a single positive class: one ROC curve, operating points, prevalence reweighting and
    #: the audit's list of errors apply
    single_positive = False
    #: the report states the expected calibration error (probabilities per output)
    calibrated_per_output = True
    #: the call is the most probable output (no thresholds)
    argmax_call = False
    #: the prefix of the output columns of predictions.csv
    column_prefix = "prob_"
    #: the validation score model selection maximises (``--monitor auc``), its key in the metrics, and
    #: the value at which a fold counts as failed (chance)
    score_name = "AUC"
    score_key = "auc"
    chance = 0.5
    #: train-mil's default bags per optimisation step, the fewest allowed, and why
    bags_per_batch = 1
    min_bags_per_batch = 1
    why_batches = ""

    # ---- targets
    def encode(self, task: Task, labels: dict[str, str], where: str) -> npt.NDArray[np.float32]:
        """The float target vector of one sample (NaN: not labelled)."""
        raise NotImplementedError

    def describe(self, task: Task, entries: Sequence[Any] | None = None) -> str:
        """One line: the task, its classes and (given the entries) samples per class."""
        raise NotImplementedError

    # ---- training
    def activation(self, logits: torch.Tensor, task: Task | None = None) -> torch.Tensor:
        """Probabilities (a regression: values in the target's units) from the model's logits."""
        return torch.sigmoid(logits.float())

    def weight_shape(self, task: Task) -> tuple[int, ...]:
        """The shape of :meth:`loss_weights`."""
        return (2, task.n_outputs)

    def loss_weights(self, targets: npt.NDArray[np.float32], task: Task | None = None) -> torch.Tensor:
        """(2, C) [negative, positive] weights per output from the training targets."""
        t = np.asarray(targets, dtype=np.float64)
        pos = np.nan_to_num(np.nanmean(t, axis=0), nan=0.5)  # blank labels (NaN) do not count
        # positive weight = negatives / total, negative weight = positives / total; x2 so that
        # a balanced set gets weight 1 for both
        return torch.tensor(np.stack([2 * pos, 2 * (1 - pos)]).clip(min=1e-3), dtype=torch.float32)

    def sample_weights(self, targets: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Drawing probability per bag, inverse to the frequency of its class."""
        t = np.nan_to_num(np.asarray(targets, dtype=float), nan=0.0) > 0.5
        cls = t.argmax(axis=1) if t.shape[1] > 1 else t[:, 0].astype(int)
        counts = np.bincount(cls, minlength=2).astype(float)
        w = 1.0 / counts[cls]
        return w / w.sum()

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, mode: str,
             gamma: float, task: Task | None = None) -> torch.Tensor:
        """Mean loss over the labelled entries: a NaN target (a blank label) is masked out,
        never counted as negative; a batch with no labelled entry gives 0."""
        logits = logits.float()
        known = ~torch.isnan(y)
        y = torch.nan_to_num(y, nan=0.0)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if weights is not None:
            bce = bce * (y * weights[1] + (1 - y) * weights[0])
        if mode == "focal":
            p = torch.sigmoid(logits)
            pt = y * p + (1 - y) * (1 - p)
            bce = bce * (1 - pt) ** gamma
        return (bce * known).sum() / known.sum().clamp(min=1)

    def score(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float | None:
        """The validation metric: the mean AUC over the outputs (None: undefined, one class)."""
        from wsi_mil.eval.metrics import auc

        known = ~np.isnan(targets)
        aucs = [auc(targets[known[:, c], c], probs[known[:, c], c]) for c in range(task.n_outputs)]
        defined = [a for a in aucs if a is not None]
        return float(np.mean(defined)) if defined else None

    def covariate_model(self, task: Task, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Any:
        """A model of the covariates alone (the report's ablation), fitted on ``x`` (n, k) and targets ``y``: a
        function from covariates to outputs. Here a logistic regression per output (scikit-learn) on the
        samples where it is known (an output with one class: its frequency)."""
        from sklearn.linear_model import LogisticRegression

        fits: list[Any] = []
        for c in range(y.shape[1]):
            k = ~np.isnan(y[:, c])
            yc = y[k, c].astype(int)
            fits.append(LogisticRegression(max_iter=2000).fit(x[k], yc) if len(np.unique(yc)) == 2
                        else float(yc.mean()) if len(yc) else 0.5)
        return lambda z: np.stack([np.full(len(z), f) if isinstance(f, float) else f.predict_proba(z)[:, 1]
                                   for f in fits], axis=1)

    # ---- evaluation
    def thresholds(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], rule: str,
                   target_sensitivity: float) -> list[float]:
        """One decision threshold per output, chosen on validation by ``rule``."""
        from wsi_mil.eval.metrics import choose_threshold

        known = ~np.isnan(y)
        return [choose_threshold(y[known[:, c], c], p[known[:, c], c], rule, target_sensitivity)
                for c in range(task.n_outputs)]

    def per_output_metrics(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any],
                           config: Any, weights: npt.NDArray[Any] | None, ci: bool) -> dict[str, dict[str, Any]]:
        """Binary metrics of each output at its threshold, with the expected calibration error."""
        from wsi_mil.eval.metrics import binary_metrics, expected_calibration_error

        known = ~np.isnan(y)
        per = {}
        for c, name in enumerate(task.outputs):
            k = known[:, c]
            thr = thresholds[c] if np.ndim(thresholds[c]) == 0 else np.asarray(thresholds[c])[k]
            m = binary_metrics(y[k, c], p[k, c], thr, weights=None if weights is None else weights[k], ci=ci,
                               n_boot=config.bootstrap, seed=config.seed)
            m["ece"] = expected_calibration_error(y[k, c], p[k, c])
            if not k.all():
                m["n_not_labelled"] = int((~k).sum())
            per[name] = m
        return per

    def evaluate(self, task: Task, y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: Sequence[Any], config: Any,
                 weights: npt.NDArray[Any] | None = None, ci: bool = True) -> dict[str, Any]:
        """Metrics of predictions ``p`` (n, C) against targets ``y`` (n, C) (non-empty)."""
        raise NotImplementedError

    def predicted(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> Any:
        """The predicted label of one sample (as predictions.csv writes it)."""
        raise NotImplementedError

    def output_names(self, task: Task) -> list[str]:
        """The outputs judged one against the rest (the shortcut checks after training)."""
        return list(task.outputs)

    def one_vs_rest(self, y: npt.NDArray[Any], c: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int_]]:
        """(samples with a target, their 0/1 target) for output ``c``."""
        ok = np.isin(y[:, c], (0.0, 1.0))
        return ok, y[ok, c].astype(int)

    def confusion_classes(self, task: Task) -> list[str]:
        return list(task.outputs)

    def questions(self, task: Task | None, ids: list[str], t: npt.NDArray[Any]) -> list[Question]:
        """What the shortcut checks before training ask: (label name or None, ids with a
        known value, their class index, class names) per question; ``t``: (n, C) targets."""
        raise NotImplementedError

    #: the loss compares samples with each other (a validation loss over the whole set, not per bag)
    loss_over_set = False
    #: a heatmap's slide call is a positive / negative class call (its colours fade on a negative one)
    class_call = True
    #: the options of classifiers (--threshold, --imbalance sampler / focal ...) apply
    has_classes = True
    #: --survival-loss chooses the loss (a survival target)
    loss_choice = False
    #: train-mil settings only this kind of target reads, with their defaults (refused away from the
    #: default in a run without such a target: they would be ignored)
    own_settings: tuple[tuple[str, Any], ...] = ()

    #: what a patch's share of the output is measured in (its heatmap's legend)
    contribution_unit = "logit"

    def contribution_units(self, task: Task, shares: torch.Tensor) -> torch.Tensor | None:
        """The instances' shares of the logits (N, C) in the output's units: logits for the classifiers (None:
        the output is not a sum of shares of the logits)."""
        return shares

    def value_text(self, probability: dict[str, float], digits: int = 2) -> str:
        """The slide's outputs as a heatmap's caption shows them."""
        return ", ".join(f"p({k}) = {v:.{digits}f}" for k, v in probability.items())

    def truth_columns(self, task: Task, target: npt.NDArray[Any]) -> dict[str, Any] | None:
        """predictions.csv's truth columns of one sample (None: one ``label`` column, the predicted-label text)."""
        return None

    def threshold_rule(self, rule: str, task: Task | None = None) -> str:
        """How the report says thresholds were chosen (``rule``: the classifiers' text)."""
        return rule

    def threshold_count(self, task: Task) -> int:
        """How many thresholds :meth:`thresholds` gives (one per output)."""
        return task.n_outputs

    def ensemble_thresholds(self, task: Task, per_fold: list[list[float]]) -> list[float]:
        """The fold ensemble's thresholds from each fold's (:meth:`ensemble_threshold` of each)."""
        return [self.ensemble_threshold([t[c] for t in per_fold]) for c in range(len(per_fold[0]))] if per_fold else []

    def score_parts(self, task: Task, targets: npt.NDArray[Any], probs: npt.NDArray[Any]) -> dict[str, float | None]:
        """Validation scores of the task's parts (a multi-task's targets; none otherwise)."""
        return {}

    def part_views(self, task: Task, m: dict[str, Any]) -> dict[str, tuple[dict[str, Any], TaskKind]]:
        """Each part's view of the run's metrics with its kind (a multi-task's targets; none otherwise)."""
        return {}

    def output_columns(self, task: Task) -> list[str]:
        """predictions.csv's column of each output."""
        return [f"{self.column_prefix}{name}" for name in task.outputs]

    def prediction_columns(self, task: Task, probs: npt.NDArray[Any], thresholds: Sequence[float]) -> dict[str, Any]:
        """predictions.csv's columns of the calls beside ``prediction`` (a multi-task: one per target)."""
        return {}

    def configured(self, task: Task, config: Any) -> Task:
        """The task with the run's settings of its kind (a regression's loss and standardisation)."""
        return task

    def fitted(self, task: Task, targets: npt.NDArray[Any]) -> Task:
        """The task with what it learns from the development samples' targets (a regression's scale)."""
        return task

    def ensemble_threshold(self, thresholds: list[float]) -> float:
        """The threshold of the fold ensemble (its output: the mean of the folds'): the folds'
        thresholds averaged in logit space (probabilities)."""
        from wsi_mil.eval.metrics import ensemble_threshold

        return ensemble_threshold(thresholds)

    def strata(self, task: Task, targets: npt.NDArray[Any]) -> list[str] | None:
        """One stratum per sample for the splits (None: by class, the default)."""
        return None

    def plots(self, task: Task, out: Any, y: npt.NDArray[Any], p: npt.NDArray[Any], where: str,
              thresholds: Sequence[Any] = ()) -> list[str]:
        """The kind's own figures of the headline set, written into ``out``; their file names."""
        return []

    def calibration_lines(self, task: Task, ys: npt.NDArray[Any], ps: npt.NDArray[Any],
                          where: str) -> dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
        """Reliability-plot lines beyond the single-positive ones (one per label)."""
        return {}

    # ---- report
    def report_table(self, task: Task, m: dict[str, Any]) -> list[str]:
        """The report's table of figures (report.md)."""
        raise NotImplementedError

    def summary_line(self, head: dict[str, Any]) -> str:
        """The headline figures printed at the end of a run."""
        raise NotImplementedError

    def what(self, task: Task) -> str:
        """What is predicted, in a few words."""
        return ", ".join(task.outputs)


def finite_number(value: str) -> float | None:
    """A finite number, or None (not a number, NaN or infinite): a manifest's numeric cell."""
    try:
        v = float(value)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def report_sets(m: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(row name, figures) of every set a run reports, headline sets first; sets without figures left out."""
    sets = [("ensemble of folds, test", m.get("ensemble_test")), ("pooled out-of-fold validation", m.get("pooled_validation"))]
    sets += [(f"fold {f['fold']}, {s}", f[s]) for f in m["folds"] for s in ("test", "val") if f.get(s)]
    return [(name, mm) for name, mm in sets if mm]


class NoClassKind(TaskKind):
    """What the kinds without classes share (regression, survival): no class weights or balanced
    drawing, no class outputs for the shortcut checks after training, no confusion matrix, no
    class call on a heatmap, no calibration per output."""

    calibrated_per_output = False
    class_call = False
    has_classes = False

    def weight_shape(self, task: Task) -> tuple[int, ...]:
        return (1,)

    def loss_weights(self, targets: npt.NDArray[np.float32], task: Task | None = None) -> torch.Tensor:
        return torch.ones(1)

    def threshold_count(self, task: Task) -> int:
        return 0

    def sample_weights(self, targets: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.full(len(targets), 1.0 / max(len(targets), 1))

    def output_names(self, task: Task) -> list[str]:
        return []

    def confusion_classes(self, task: Task) -> list[str]:
        return []
