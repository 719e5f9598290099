"""A re-run of an unchanged road rewrites nothing: tile, extract-features, train-mil and
heatmap each find their outputs up to date (by content: settings, inputs and stores, not
file times) and leave every file as it was, so nothing downstream is redone."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import WSI_MIL


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))  # a command's log is appended to, a lock file rewritten: neither is output
            if p.is_file() and p.name != ".wsi-mil.lock" and not p.name.endswith(".log")}


def _road(root: Path) -> list[str]:
    """synth (once) -> tile -> extract-features -> train-mil -> heatmap; what each printed."""
    q = ["--no-progress"]
    if not (root / "slides").exists():
        subprocess.run(WSI_MIL + ["synth", "--preset", "balanced", "--n-slides", "12", "--size", "1536", "--out",
                                  str(root / "slides"), "-q", *q], check=True, capture_output=True, timeout=300)
    steps = [["tile", str(root / "slides" / "manifest.csv"), "--out", str(root / "tiles"), "--workers", "1"],
             ["extract-features", str(root / "tiles"), "--out", str(root / "tiles")],
             ["train-mil", str(root / "slides" / "manifest.csv"), "--features", str(root / "tiles" / "features"),
              "--out", str(root / "run"), "--epochs", "3", "--folds", "2", "--bootstrap", "20"],
             ["heatmap", str(root / "run"), "--out", str(root / "heatmaps")]]
    out = []
    for step in steps:
        res = subprocess.run(WSI_MIL + step + q, capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, f"{step[0]}: {res.stderr[-2000:]}"
        out.append(res.stdout + res.stderr)
    return out


def test_a_rerun_of_an_unchanged_road_rewrites_no_file(tmp_path) -> None:
    _road(tmp_path)
    before = _files(tmp_path)
    printed = _road(tmp_path)
    after = _files(tmp_path)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert changed == [] and sorted(after.keys() - before.keys()) == []
    for step, said in zip(("tile", "extract-features", "train-mil", "heatmap"), printed, strict=True):
        assert "up to date" in said, f"{step}: {said[-1500:]}"
    # extract-features decided before building the encoder (whose build reports the weights it ignores)
    assert "classifier-head" not in printed[1] and "classifier-head" in _first_extract_log(tmp_path)
    assert "trained model found" not in printed[2]  # not even loaded: nothing to evaluate again


def _first_extract_log(root: Path) -> str:
    """What extract-features says when it has work: the same command into a fresh folder."""
    res = subprocess.run(WSI_MIL + ["extract-features", str(root / "tiles"), "--out", str(root / "again"),
                                    "--no-progress"], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout + res.stderr


def test_features_embedded_again_into_the_same_folder_are_another_run(tmp_path) -> None:
    """The run's identity holds its feature stores' content (each store's fingerprint):
    features re-extracted with other settings into the same folder make train-mil refuse
    the old run's folder, never resume it with models trained on the old features."""
    _road(tmp_path)
    res = subprocess.run(WSI_MIL + ["extract-features", str(tmp_path / "tiles"), "--out", str(tmp_path / "tiles"),
                                    "--overwrite", "--tta-flips", "--no-progress"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run(WSI_MIL + ["train-mil", str(tmp_path / "slides" / "manifest.csv"), "--features",
                                    str(tmp_path / "tiles" / "features"), "--out", str(tmp_path / "run"), "--epochs",
                                    "3", "--folds", "2", "--bootstrap", "20", "--no-progress"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 2 and "input stores changed" in res.stderr, res.stderr[-2000:]
