"""A refused run leaves nothing behind and costs seconds: every check that can stop it
(duplicates across the given splits, options that do not apply) comes before the output
folder exists and before any feature is computed. (Before, the README's first chest X-ray
example wrote features for ~15 minutes, then stopped on MedMNIST's 10 duplicate pairs,
leaving train.log, train_config.yaml and features/ behind.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import shared
from wsi_mil.cli import main


def test_medmnist_duplicates_stop_the_run_in_seconds_before_any_feature(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pneumonia"
    t0 = time.perf_counter()
    code = main(["train-image", str(shared("cxr", "pneumoniamnist.npz")), "--out", str(out), "--mode", "linear",
                 "--image-size", "64", "--classes", "normal,pneumonia", "--no-progress"])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "10 near-duplicate image pair(s) of different patients cross train / validation / test" in err
    assert "train_01435 (patient train_01435, train) ~ val_00172" in err  # the pairs are named
    assert "--duplicates allow" in err  # and the way to keep a published split
    assert not out.exists()  # no train.log, train_config.yaml or features/
    assert seconds < 120  # reading 5,856 small images, not embedding them


def test_volume_options_that_do_not_apply_are_refused_before_the_run_folder(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vol"
    code = main(["train-volume", str(shared("vol3d", "adrenalmnist3d.npz")), "--out", str(out), "--labels", "label",
                 "--no-progress"])
    assert code == 2 and "--readers / --labels apply to manifest CSVs" in capsys.readouterr().err
    assert not out.exists()


def test_a_refused_prediction_leaves_no_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    for command, out in (("predict-image", tmp_path / "pi"), ("predict-volume", tmp_path / "pv")):
        code = main([command, str(not_a_run), str(shared("cxr", "pneumoniamnist.npz")), "--out", str(out),
                     "--no-progress"])
        assert code == 2, capsys.readouterr().err
        assert not out.exists(), command  # before: predict.log left in a new folder
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("the user's")
    assert main(["predict-image", str(not_a_run), str(shared("cxr", "pneumoniamnist.npz")), "--out", str(kept)]) == 2
    assert (kept / "mine.txt").read_text() == "the user's"  # a folder that was there is never touched


def test_two_files_with_one_stem_in_a_folder_are_refused(tmp_path: Path) -> None:
    """x.png and x.jpg (or v.nii and v.nii.gz) in one input folder would give two rows with
    one id and one map silently overwritten; a manifest refuses this, and so does a folder."""
    from PIL import Image

    from wsi_mil.commands.predict_volume import _entries
    from wsi_mil.data.images import unique_file_ids
    from wsi_mil.errors import ManifestError

    pic = Image.open(sorted((shared("cxr", "nih1000") / "NIH1000" / "train" / "0_normal").glob("*.png"))[0])
    pic.save(tmp_path / "x.png")
    pic.convert("L").save(tmp_path / "x.jpg")
    pic.save(tmp_path / "y.png")
    with pytest.raises(ManifestError, match=r"1 image id\(s\) are shared by several files \(x: x.jpg, x.png\)"):
        unique_file_ids(sorted(tmp_path.glob("*.*")))
    assert unique_file_ids([tmp_path / "x.png", tmp_path / "y.png"]) == ["x", "y"]
    vols = tmp_path / "vols"
    vols.mkdir()
    (vols / "v2.nii").write_bytes(b"")
    (vols / "v2.nii.gz").write_bytes(b"")
    with pytest.raises(ManifestError, match=r"volume id\(s\) are shared by several files \(v2: v2.nii, v2.nii.gz\)"):
        _entries(vols, None)
