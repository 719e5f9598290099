"""The package's layers, bottom to top: a module imports only from its own layer or below.

An import up the layers is allowed only inside a function and only where listed in
``UPWARD`` with its reason; an import at module top never goes up. Internal imports inside
functions are otherwise the project's way of keeping start-up quick (``wsi-mil --help``
imports no torch, OpenSlide or OpenCV): they are counted, not forbidden."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_mil"

#: bottom to top; each name is a sub-package or a top-level module of wsi_mil ("" is the package itself)
LAYERS: list[set[str]] = [
    {"", "errors", "choices", "runtime", "parallel"},
    {"io", "logs"},
    {"config"},
    {"data", "mil", "viz", "tasks"},
    {"tiling"},
    {"encoders", "synth"},
    {"train", "eval"},
    {"commands"},
    {"review"},
    {"cli"},
    {"__main__"},
]

#: (importing file, imported unit) -> why the import goes up (all inside functions)
UPWARD: dict[tuple[str, str], str] = {
    ("io/store.py", "tiling"): "a stored patch is decoded by the tiler's JPEG codec (one codec for writing and reading)",
    ("config.py", "tiling"): "TileConfig.tissue_params builds the tiler's TissueParams from the settings",
    ("config.py", "data"): "VolumeTrainConfig.prep builds the volume reader's VolumePrep from the settings",
    ("config.py", "mil"): "--model-options is checked against the MIL model's constructor",
    ("config.py", "encoders"): "tile --encoder: --mpp defaults to the encoder's training resolution (its recipe)",
    ("config.py", "tasks"): "train-mil's --bags-per-batch default and minimum are the task kind's (survival: 16, at least 4)",
    ("config.py", "synth"): "synth's settings are checked by the generator's own checks (one message for code and flags)",
    ("data/patient_bags.py", "tiling"): "a patient bag's tissue colour is the mean of its slides' (the tiler's stain names)",
    ("data/bags.py", "tiling"): "old feature stores without the patch geometry get it from their patch store",
    ("eval/localisation.py", "commands"): "localisation finds each attention store's slide as heatmap does",
    ("tasks/base.py", "eval"): "a task kind's metrics and thresholds are the evaluation layer's functions",
    ("tasks/binary.py", "eval"): "the binary report's AUC with its interval is the evaluation layer's text",
    ("tasks/multiclass.py", "eval"): "the multi-class metrics are the evaluation layer's",
    ("tasks/regression.py", "eval"): "the regression metrics and calibration plot are the evaluation layer's",
    ("tasks/survival.py", "eval"): "the survival metrics (scikit-survival) and Kaplan-Meier plot are the evaluation layer's",
    ("tasks/multitask.py", "eval"): "a binary target's ROC curve is the evaluation layer's plot",
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(unit: str) -> int:
    for i, members in enumerate(LAYERS):
        if unit in members:
            return i
    raise AssertionError(f"wsi_mil.{unit} is in no layer: add it to LAYERS in tests/test_layers.py")


def _imports() -> list[tuple[str, str, int, bool]]:
    """(file relative to the package, imported unit, line, inside a function) for every internal import."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "wsi_mil":
                targets = [node.module] if node.module != "wsi_mil" else [f"wsi_mil.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "wsi_mil"]
            else:
                continue
            for target in targets:
                unit = _unit(target)
                if unit == "__version__":
                    unit = ""
                out.append((rel, unit, node.lineno, id(node) in in_function))
    return out


def _own_unit(rel: str) -> str:
    first = rel.split("/")[0]
    if first == "__init__.py":
        return ""
    return first[:-3] if first.endswith(".py") else first


def test_no_import_goes_up_the_layers_unless_listed_with_its_reason() -> None:
    found = _imports()
    assert len(found) > 300  # the walk sees the package's imports
    wrong, used = [], set()
    for rel, unit, line, in_function in found:
        own = _own_unit(rel)
        if _layer(unit) <= _layer(own):
            continue
        if in_function and (rel, unit) in UPWARD:
            used.add((rel, unit))
            continue
        where = "inside a function" if in_function else "at module top"
        wrong.append(f"wsi_mil/{rel}:{line} imports wsi_mil.{unit} {where} (layer {_layer(unit)} > {_layer(own)})")
    assert not wrong, "imports up the layers:\n" + "\n".join(wrong)
    assert used == set(UPWARD), f"listed but no longer made (remove them): {set(UPWARD) - used}"


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {_own_unit(p.relative_to(PACKAGE).as_posix()) for p in PACKAGE.rglob("*.py")}
    for unit in units:
        _layer(unit)
