"""A blank patient_id is missing data, not a patient of its own (before, it silently became
the slide id and the report still said no patient is in two sets)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from wsi_mil.data.images import read_image_manifest
from wsi_mil.data.manifest import read_manifest
from wsi_mil.data.splits import check_blank_patients
from wsi_mil.errors import ManifestError


def test_a_partly_blank_patient_column_is_refused_unless_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.csv"
    # as a spreadsheet saves it: CRLF, the second slide of patient P7 with its cell left empty
    path.write_bytes(b"slide_id,patient_id,label\r\nA1,P7,tumour\r\nA2,,tumour\r\nB1,P8,normal\r\nB2,,normal\r\n")
    entries = read_manifest(path, require_path=False)
    with pytest.raises(ManifestError, match=r"2 of 4 slide\(s\) have a blank patient_id \(A2, B2\).*--blank-patient own"):
        check_blank_patients(entries, "refuse", "slide")
    with caplog.at_level(logging.WARNING):
        note = check_blank_patients(entries, "own", "slide")
    assert note is not None and note["n_blank"] == 2 and note["of"] == 4
    assert "2 of 4 slide(s) have no patient_id" in caplog.text


def test_no_patient_column_at_all_is_warned_with_the_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr" / "nih1000" / "NIH1000" / "train"
    pngs = sorted((img / "0_normal").glob("*.png"))[:3]
    path = tmp_path / "images.csv"
    path.write_text("path,label\n" + "".join(f"{p},0\n" for p in pngs))
    entries, _ = read_image_manifest(path)
    with caplog.at_level(logging.WARNING):
        note = check_blank_patients(entries, "refuse", "image")  # no column: nothing to refuse, but said
    assert note["n_blank"] == 3 and "3 of 3 image(s) have no patient_id" in caplog.text


def test_train_mil_refuses_partly_blank_patients_before_the_run_folder(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import shutil

    from tests.conftest import shared
    from wsi_mil.cli import main
    from wsi_mil.data.mil_import import import_classic

    manifest = import_classic("musk1", shared("mil"), tmp_path / "musk")
    rows = list(csv.DictReader(open(manifest)))
    for r in rows[::10]:
        r["patient_id"] = ""
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    code = main(["train-mil", str(manifest), "--features", str(tmp_path / "musk" / "features"), "--out", str(out),
                 "--folds", "2", "--epochs", "1", "--bootstrap", "20", "--no-progress", "-q"])
    assert code == 2 and "have a blank patient_id" in capsys.readouterr().err and not out.exists()
    code = main(["train-mil", str(manifest), "--features", str(tmp_path / "musk" / "features"), "--out", str(out),
                 "--folds", "2", "--epochs", "1", "--bootstrap", "20", "--no-progress", "-q", "--blank-patient", "own"])
    assert code == 0
    assert "each counted as its own patient" in (out / "report.md").read_text()
    shutil.rmtree(out)


def test_spreadsheet_csv_quirks(tmp_path: Path) -> None:
    """Rows of empty cells after the data (as spreadsheets save them) are skipped, not
    errors; a semicolon CSV is told to use commas; a row with extra cells is refused."""
    path = tmp_path / "m.csv"
    path.write_bytes(b"slide_id,path,patient_id,label\r\ns1,a.svs,p1,tumour\r\ns2,b.svs,p2,normal\r\n,,,\r\n,,,,\r\n")
    entries = read_manifest(path, require_path=False)
    assert [e.slide_id for e in entries] == ["s1", "s2"]
    path.write_text("slide_id;path;patient_id\ns1;a.svs;p1\n")
    with pytest.raises(ManifestError, match="separated by semicolons"):
        read_manifest(path, require_path=False)
    path.write_text("slide_id,path,patient_id\ns1,a.svs,p1,extra\n")
    with pytest.raises(ManifestError, match="line 2 has 1 more cell"):
        read_manifest(path, require_path=False)
    images = tmp_path / "images.csv"
    images.write_text("path;label\nx.png;1\n")
    with pytest.raises(ManifestError, match="separated by semicolons"):
        read_image_manifest(images)
