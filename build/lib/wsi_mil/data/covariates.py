"""Clinical covariates (``--covariates age,sex,stage``) as the numbers a model is given.

A column whose every given value is a finite number is numeric: standardised by the training
slides' mean and standard deviation. Any other column is categorical: one-hot over the values
the training slides hold. Every covariate also has a **missing** indicator: a blank (or a
missing-value marker) sets it and leaves the value at the training mean (0 after standardising)
or at no category, so a missing value is never read as a real zero. A category the training
slides never held counts as missing (and is logged). The encoding is fitted on each fold's
training slides only and stored with that fold's model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import ConfigError, ManifestError
from wsi_mil.tasks.base import finite_number

logger = logging.getLogger(__name__)

_WARNED: set[tuple[str, str, str]] = set()
_MISSING = {"", "nan", "na", "n/a", "none", "null", "?", "-", "unknown"}


def _blank(value: str | None) -> bool:
    return value is None or value.strip().lower() in _MISSING


@dataclass
class CovariateEncoder:
    """The fitted encoding of the named covariates (see the module docstring)."""

    names: list[str]
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (mean, sd)
    categories: dict[str, list[str]] = field(default_factory=dict)  # name -> the training slides' values

    @classmethod
    def fit(cls, names: list[str], rows: list[dict[str, str]]) -> CovariateEncoder:
        """Fitted on ``rows`` (the training slides' manifest columns)."""
        enc = cls(list(names))
        for name in names:
            given = [r.get(name, "").strip() for r in rows if not _blank(r.get(name))]
            if not given:
                raise ManifestError(f"covariate {name!r}: no training slide has a value")
            numbers = [finite_number(v) for v in given]
            if all(v is not None for v in numbers):
                arr = np.asarray(numbers, dtype=float)
                sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
                enc.numeric[name] = (float(arr.mean()), sd if sd > 0 else 1.0)
            else:
                enc.categories[name] = sorted(set(given))
        return enc

    @property
    def width(self) -> int:
        return sum(2 if n in self.numeric else len(self.categories[n]) + 1 for n in self.names)

    def columns(self) -> list[str]:
        """What each number of :meth:`encode` stands for."""
        out = []
        for n in self.names:
            out += [n, f"{n} missing"] if n in self.numeric else [f"{n}={c}" for c in self.categories[n]] + [f"{n} missing"]
        return out

    def encode(self, row: dict[str, str], where: str = "") -> npt.NDArray[np.float32]:
        out: list[float] = []
        for n in self.names:
            raw = row.get(n)
            if n in self.numeric:
                mean, sd = self.numeric[n]
                v = None if _blank(raw) else finite_number(str(raw))
                if not _blank(raw) and v is None:
                    raise ManifestError(f"{where}: covariate {n!r} is {raw!r}, not a number (the training slides' "
                                        "values are numbers)")
                out += [0.0, 1.0] if v is None else [(v - mean) / sd, 0.0]
            else:
                cats = self.categories[n]
                value = "" if _blank(raw) else str(raw).strip()
                if value and value not in cats:
                    if (where, n, value) not in _WARNED:  # (once, not once per fold model)
                        _WARNED.add((where, n, value))
                        logger.warning("%s: covariate %r = %r was not among the training slides' values %s: counted "
                                       "as missing", where, n, value, cats)
                    value = ""
                out += [float(value == c) for c in cats] + [float(not value)]
        return np.asarray(out, np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "numeric": {k: list(v) for k, v in self.numeric.items()},
                "categories": self.categories, "columns": self.columns()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CovariateEncoder:
        return cls(list(d["names"]), {k: (float(v[0]), float(v[1])) for k, v in d["numeric"].items()},
                   {k: list(v) for k, v in d["categories"].items()})


def check_values(names: list[str], rows: dict[str, dict[str, str]]) -> None:
    """Before any folder: each covariate has values, and a column of numbers holds only numbers
    (one ``>90`` or ``12,5`` would otherwise turn age into categories)."""
    for name in names:
        given = {sid: r[name].strip() for sid, r in rows.items() if not _blank(r.get(name))}
        if not given:
            raise ManifestError(f"covariate {name!r}: no slide has a value")
        words = {sid: v for sid, v in given.items() if finite_number(v) is None}
        if words and len(words) < len(given):
            shown = ", ".join(f"{sid}={v!r}" for sid, v in list(words.items())[:5])
            raise ManifestError(f"covariate {name!r} holds numbers and {len(words)} value(s) that are not: {shown}"
                                f"{' ...' if len(words) > 5 else ''}. Fix them, or blank them (a missing value)")


def parse_covariates(text: str | None, available: list[str], label_columns: list[str],
                     id_columns: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The names of ``--covariates`` checked against the manifest's columns (a typo or a label column
    is refused by name, never dropped)."""
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"--covariates {text}: a column is named twice")
    labels = [n for n in names if n in label_columns]
    if labels:
        raise ConfigError(f"--covariates {text}: {labels} are label columns (a model given a target learns nothing "
                          "from the slide)")
    ids = [n for n in names if n in id_columns]
    if ids:
        raise ConfigError(f"--covariates {text}: {ids} identify or place a slide; they are not clinical values")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ManifestError(f"--covariates {text}: {unknown} not in the manifest (its other columns: "
                            f"{sorted(available) or 'none'})")
    return names
