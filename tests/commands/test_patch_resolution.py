"""Runs record the patches' resolution and size; a cohort that mixes them is refused, and
so is predicting a slide tiled at another scale (before: exit 0 and a flipped call)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import pytest

from tests.conftest import shared
from wsi_mil.cli import main


def _cohort(tmp_path: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    from wsi_mil.data.mil_import import import_classic

    manifest = import_classic("musk1", shared("mil"), tmp_path / "musk")
    feats = tmp_path / "musk" / "features"
    rows = list(csv.DictReader(open(manifest)))
    for r in rows:  # as extract-features records them from the patch stores
        with h5py.File(feats / f"{r['slide_id']}.h5", "r+") as f:
            f.attrs["effective_mpp"] = 0.5
            f.attrs["patch_size_px"] = 256
    return manifest, feats, rows


def _train(manifest: Path, feats: Path, out: Path) -> int:
    return main(["train-mil", str(manifest), "--features", str(feats), "--out", str(out), "--folds", "2",
                 "--epochs", "1", "--bootstrap", "20", "--no-progress", "-q"])


def test_a_cohort_of_two_resolutions_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, feats, rows = _cohort(tmp_path)
    for r in rows[:5]:
        with h5py.File(feats / f"{r['slide_id']}.h5", "r+") as f:
            f.attrs["effective_mpp"] = 1.0  # tiled at 10x instead of 20x
    out = tmp_path / "run"
    code = _train(manifest, feats, out)
    err = capsys.readouterr().err
    assert code == 2, err[-1500:]
    assert "tiled at different resolutions or patch sizes (" in err
    assert "0.5 µm/px, 256 px patches" in err and "1.0 µm/px, 256 px patches" in err and "(5)" in err
    assert not out.exists()


def test_predict_refuses_a_store_of_another_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, feats, rows = _cohort(tmp_path)
    run = tmp_path / "run"
    assert _train(manifest, feats, run) == 0
    spec = json.loads((run / "models" / "fold0.json").read_text())
    assert spec["encoder"]["effective_mpp"] == 0.5 and spec["encoder"]["patch_size_px"] == 256
    new = tmp_path / "new"
    new.mkdir()
    for name, mpp, size in (("same", 0.51, 256), ("coarse", 1.0, 256), ("small", 0.5, 128)):
        shutil.copy(feats / f"{rows[0]['slide_id']}.h5", new / f"{name}.h5")
        with h5py.File(new / f"{name}.h5", "r+") as f:
            f.attrs["effective_mpp"], f.attrs["patch_size_px"], f.attrs["slide_id"] = mpp, size, name
    code = main(["predict", str(run), str(new), "--out", str(tmp_path / "pred")])
    assert code == 1  # the batch goes on past the two stores of another scale and reports them
    report = json.loads((tmp_path / "pred" / "predict_report.json").read_text())
    failed = {f["slide_id"]: f["error"] for f in report["failed"]}
    assert set(failed) == {"coarse", "small"}
    assert "tiled at 1.000 µm/px (the run: 0.500)" in failed["coarse"]
    assert "128 px patches (the run: 256)" in failed["small"] and "--patch-size 256" in failed["small"]


def test_absurd_features_are_blamed_on_the_store_not_the_model(tmp_path: Path) -> None:
    manifest, feats, rows = _cohort(tmp_path)
    run = tmp_path / "run"
    assert _train(manifest, feats, run) == 0
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(feats / f"{rows[0]['slide_id']}.h5", new / "rotten.h5")
    with h5py.File(new / "rotten.h5", "r+") as f:
        x = f["features"][...]
        x[0, :] = 3e38  # finite, absurd: a damaged store
        f["features"][...] = x
        f.attrs["slide_id"] = "rotten"
    assert main(["predict", str(run), str(new), "--out", str(tmp_path / "pred")]) == 1
    failed = json.loads((tmp_path / "pred" / "predict_report.json").read_text())["failed"]
    assert "its features reach 3e+38" in failed[0]["error"] and "extract this slide's features again" in failed[0]["error"]
    assert "a model is damaged" not in failed[0]["error"]


def test_a_store_another_program_holds_open_says_so(tmp_path: Path) -> None:
    """HDF5's raw "unable to lock file, errno = 11" reached the user; now it says what it
    means and what to do."""
    import subprocess
    import sys

    manifest, feats, rows = _cohort(tmp_path)
    run = tmp_path / "run"
    assert _train(manifest, feats, run) == 0
    new = tmp_path / "new"
    new.mkdir()
    store = new / "held.h5"
    shutil.copy(feats / f"{rows[0]['slide_id']}.h5", store)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(120)", str(store)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert main(["predict", str(run), str(new), "--out", str(tmp_path / "pred")]) == 1
    finally:
        holder.kill()
        holder.wait()
    error = json.loads((tmp_path / "pred" / "predict_report.json").read_text())["failed"][0]["error"]
    assert "HDF5 could not lock the file" in error and "HDF5_USE_FILE_LOCKING=FALSE" in error


def test_the_refusal_of_another_scale_names_only_what_the_run_recorded(tmp_path: Path) -> None:
    """A run that recorded its mpp but not its patch size (older stores: "none"): building the refusal's advice
    raised ValueError (int("none")), so the store failed with a bare error instead of the advice."""
    from wsi_mil.commands.predict import check_resolution
    from wsi_mil.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tiled at 1\.000 µm/px \(the run: 0\.500\).*--mpp 0\.5 and extract") as err:
        check_resolution({"effective_mpp": 1.0, "patch_size_px": "none"}, {"effective_mpp": 0.5, "patch_size_px": None},
                         tmp_path / "s.h5")
    assert "--patch-size" not in str(err.value)


def test_predict_names_a_missing_input_and_a_patch_store_for_what_they_are(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A stranger's trial: a missing input read "nosuch: nosuch: no such store. Run `wsi-mil tile` first"
    (exit 1, a folder left); a patch store given instead of a feature store read "encoder mismatch: the store
    was made with None"."""
    manifest, feats, rows = _cohort(tmp_path)
    run = tmp_path / "run"
    assert _train(manifest, feats, run) == 0
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "nosuch"), "--out", str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err
    assert "nosuch: no such file or folder; give extract-features output folders" in err and "tile" not in err
    assert not (tmp_path / "p1").exists()
    patch_like = tmp_path / "stores" / "patchy.h5"
    patch_like.parent.mkdir()
    shutil.copy(feats / f"{rows[0]['slide_id']}.h5", patch_like)
    with h5py.File(patch_like, "r+") as f:
        del f.attrs["encoder"]
    assert main(["predict", str(run), str(patch_like.parent), "--out", str(tmp_path / "p2")]) == 1
    failed = json.loads((tmp_path / "p2" / "predict_report.json").read_text())["failed"]
    assert "is a patch store (tile's output), not a feature store" in failed[0]["error"]
