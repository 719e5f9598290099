from __future__ import annotations

import subprocess

import yaml

from tests.conftest import WSI_MIL


def _run(args, **kw):
    return subprocess.run(WSI_MIL + args, capture_output=True, text=True, timeout=300, **kw)


def test_help_lists_every_tile_option() -> None:
    proc = _run(["tile", "--help"])
    assert proc.returncode == 0
    for flag in ("--mpp", "--patch-size", "--stride", "--overlap", "--min-tissue", "--slide-mpp", "--save-patches",
                 "--format", "--workers", "--scheduler", "--config", "--overwrite"):
        assert flag in proc.stdout


def test_recipe_is_applied_and_unknown_keys_refused(tmp_path, cmu_slide) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tile:\n  patch_size: 128\n  min_tissue: 0.8\n")
    out = tmp_path / "o"
    proc = _run(["tile", str(cmu_slide), "--out", str(out), "--config", str(recipe), "--min-tissue", "0.6",
                 "--workers", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load((out / "tile_config.yaml").read_text())["tile"]
    assert resolved["patch_size"] == 128 and resolved["min_tissue"] == 0.6  # flag beats recipe
    recipe.write_text("tile:\n  patch_sise: 128\n")
    proc = _run(["tile", str(cmu_slide), "--out", str(out), "--config", str(recipe)])
    assert proc.returncode == 2 and "patch_sise" in proc.stderr


def test_conflicting_options_exit_2(tmp_path, cmu_slide) -> None:
    proc = _run(["tile", str(cmu_slide), "--out", str(tmp_path), "--stride", "128", "--overlap", "0.5"])
    assert proc.returncode == 2 and "--stride or --overlap" in proc.stderr
