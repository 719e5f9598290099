from __future__ import annotations

import pytest

from wsi_mil.data.manifest import read_manifest, resolve_inputs
from wsi_mil.errors import ManifestError


def _write(tmp_path, text: str):
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_valid_manifest_resolves_relative_paths(tmp_path, cmu_slide) -> None:
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(cmu_slide.read_bytes())
    entries = read_manifest(_write(tmp_path, "slide_id,path,patient_id,mpp,label,label_grade\na,slides/a.svs,p1,0.25,1,high\n"))
    (e,) = entries
    assert e.path == tmp_path / "slides" / "a.svs" and e.patient_id == "p1" and e.mpp == 0.25
    assert e.labels == {"label": "1", "label_grade": "high"}


@pytest.mark.parametrize("text, match", [
    ("slide_id,path\na,x.svs\na,y.svs\n", r"duplicate slide_id.*\['a'\]"),
    ("slide_id,path,patientid\na,x.svs,p\n", r"misspelt.*'patientid' \(did you mean 'patient_id'\?\)"),
    ("slide_id,path,Label\na,x.svs,1\n", r"misspelt.*'Label'"),
    ("slide_id,path,lable\na,x.svs,1\n", r"misspelt.*'lable' \(did you mean 'label'\?\)"),
    ("slide_id,path,labels\na,x.svs,1\n", r"misspelt.*'labels'"),
    ("slide_id,path,slideid\na,x.svs,1\n", r"did you mean 'slide_id'"),
    ("slide,path\na,x.svs\n", r"missing required column.*slide_id"),
    ("slide_id,path,mpp\na,x.svs,-1\n", r"mpp '-1'"),
    ("slide_id,path\n../evil,x.svs\n", r"not file-name safe"),
    ("slide_id,path\n", r"no slides"),
])
def test_malformed_manifests_are_refused_with_reason(tmp_path, text: str, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        read_manifest(_write(tmp_path, text))


def test_metadata_columns_are_kept_for_subgroups(tmp_path) -> None:
    from wsi_mil.data.manifest import entry_columns

    path = _write(tmp_path, "slide_id,path,patient_id,label,site,scanner,age\na,x.svs,p1,1,B,GT450,61\n")
    (e,) = read_manifest(path)
    assert e.labels == {"label": "1"}  # metadata are not labels
    columns = entry_columns([e])  # the slide's manifest columns, as the audit reads them
    assert columns["a"]["site"] == "B" and columns["a"]["age"] == "61"


def test_missing_slide_file_is_not_fatal(tmp_path) -> None:
    (e,) = read_manifest(_write(tmp_path, "slide_id,path\nghost,ghost.svs\n"))
    assert not e.path.exists()


def test_folder_and_file_inputs(tmp_path, cmu_slide) -> None:
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("ignored")
    entries = resolve_inputs([tmp_path, cmu_slide])
    assert [e.slide_id for e in entries] == ["a", "cmu-1-small-region"]
    # one file given twice is one slide (tiled once), and the second mention is reported
    from wsi_mil.data.manifest import resolve_inputs_reporting

    twice = resolve_inputs_reporting([tmp_path / "a.svs", tmp_path / "a.svs"])
    assert [e.slide_id for e in twice.entries] == ["a"] and "the same file as slide a" in twice.skipped[0]["reason"]
    # two different files of one name are still refused (their stores would share a name)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.svs").write_bytes(b"y")
    with pytest.raises(ManifestError, match="duplicate"):
        resolve_inputs([tmp_path / "a.svs", tmp_path / "other" / "a.svs"])
