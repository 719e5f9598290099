"""Task kinds as objects: each kind of target (binary, multi-class, multi-label, regression,
survival, and several of them at once: multi-task) owns its
target encoding, output activation, loss, class weights, validation score, threshold rule,
metrics, predicted label and report section, so that the trainer, the runner, the report
and the audit ask the kind instead of testing its name. A new kind (survival, regression)
is one module here plus its line in ``KINDS`` and its name in :data:`wsi_mil.choices.TASKS`."""

from __future__ import annotations

from wsi_mil.tasks.base import TaskKind
from wsi_mil.tasks.binary import Binary
from wsi_mil.tasks.multiclass import Multiclass
from wsi_mil.tasks.multilabel import Multilabel
from wsi_mil.tasks.multitask import Multitask
from wsi_mil.tasks.regression import Regression
from wsi_mil.tasks.survival import Survival

#: every task kind by name (``--task auto`` picks one of these from the label columns)
KINDS: dict[str, TaskKind] = {k.name: k for k in (Binary(), Multiclass(), Multilabel(), Regression(), Survival(),
                                               Multitask())}


def kind_of(name: str) -> TaskKind:
    """The task kind called ``name``."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; one of {sorted(KINDS)}") from None


__all__ = ["KINDS", "Binary", "Multiclass", "Multilabel", "Multitask", "Regression", "Survival", "TaskKind", "kind_of"]
