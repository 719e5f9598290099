"""One slide file under several ids: `tile` reports the rows that share a file fingerprint
(before, a manifest of copies gave one store per row without a word), and `train-mil`
treats stores recording one fingerprint as the same slide — a leak when they land on both
sides of a split, whatever their embeddings."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.cli import main


def test_tile_reports_rows_that_are_one_slide_file(tmp_path: Path, cmu_slide: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "renamed_copy.svs"
    shutil.copy(cmu_slide, copy)  # the same bytes under another name: a re-export kept twice
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,patient_id\n"
                        f"a,{cmu_slide},p1\nb,{cmu_slide},p2\nc,{copy},p3\n"
                        f"kidney,{shared('wsi', 'kidney-48-5.tif')},p4\n")
    out = tmp_path / "tiles"
    code = main(["tile", str(manifest), "--out", str(out), "--workers", "1", "--executor", "threads",
                 "--no-progress", "--slide-mpp", "0.5"])
    printed = capsys.readouterr().out
    assert code in (0, 1)
    report = json.loads((out / "run_report.json").read_text())
    groups = report["identical_files"]
    assert [g["slides"] for g in groups] == [["a", "b", "c"]]
    assert "3 slide rows are 1 slide file(s) under several ids" in printed and "a, b, c (3 ids)" in printed
    # a re-run from the cache reports them too (the fingerprint comes from the stores)
    main(["tile", str(manifest), "--out", str(out), "--workers", "1", "--no-progress", "--slide-mpp", "0.5"])
    assert json.loads((out / "run_report.json").read_text())["identical_files"] == groups
    assert "3 slide rows are 1 slide file(s)" in capsys.readouterr().out


def test_train_mil_refuses_one_file_under_two_patients_across_splits(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A copy whose store records the source's file fingerprint but whose embeddings differ
    (re-extracted with another encoder seed, say) is still the same slide."""
    import h5py

    from wsi_mil.data.mil_import import import_classic

    manifest = import_classic("musk1", shared("mil"), tmp_path / "musk")
    feats = tmp_path / "musk" / "features"
    rows = list(csv.DictReader(open(manifest)))
    src = rows[3]
    with h5py.File(feats / f"{src['slide_id']}.h5", "r+") as f:
        f.attrs["slide_fingerprint"] = "sha256-of-one-file"
    shutil.copy(feats / f"{src['slide_id']}.h5", feats / "copy.h5")
    with h5py.File(feats / "copy.h5", "r+") as f:
        f.attrs["slide_id"] = "copy"
        x = f["features"][...]
        f["features"][...] = np.random.default_rng(0).permutation(x.ravel()).reshape(x.shape)  # unlike the source
    with open(manifest, "a", newline="") as fh:
        csv.writer(fh).writerow(["copy", str(feats / "copy.h5"), "patient-copy", src["label"]])
    out = tmp_path / "run"
    code = main(["train-mil", str(manifest), "--features", str(feats), "--out", str(out), "--folds", "3",
                 "--epochs", "2", "--no-progress", "-q", "--seed", "3"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]  # seed 3 puts the two in different sets
    assert f"{src['slide_id']} (patient" in err and "copy (patient patient-copy" in err
    assert "same file duplicate" in err
    assert not out.exists()
    merged = main(["train-mil", str(manifest), "--features", str(feats), "--out", str(tmp_path / "merged"),
                   "--folds", "3", "--epochs", "2", "--no-progress", "-q", "--seed", "3", "--duplicates", "merge"])
    assert merged == 0
    dup = json.loads((tmp_path / "merged" / "metrics.json").read_text())["audit"]["duplicates"]
    assert "copy" in dup["merged"] and dup["leaks"] == []
