"""The positive class of a binary task comes from what the label values mean, never from
the alphabet (before, ``abnormal`` / ``normal`` made ``normal`` the positive class: its
probability, its sensitivity, the tumour slide's overlay faded as a negative call)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.data.bags import infer_task
from wsi_mil.data.manifest import read_manifest
from wsi_mil.errors import ManifestError


def _manifest(tmp_path: Path, a: str, b: str, n: int = 6) -> Path:
    """A manifest as a spreadsheet saves it (CRLF, a BOM), n slides of each label."""
    rows = ["slide_id,patient_id,label"] + [f"s{i},p{i},{a if i % 2 else b}" for i in range(2 * n)]
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    return path


@pytest.mark.parametrize(("a", "b", "positive"), [
    ("abnormal", "normal", "abnormal"),
    ("malignant", "normal", "malignant"),
    ("cancer", "normal", "cancer"),
    ("metastasis", "normal", "metastasis"),
    ("benign", "malignant", "malignant"),
    ("Normal", "Tumour", "Tumour"),
    ("healthy", "disease", "disease"),
    ("control", "case", "case"),  # one named value is enough: the other is the positive class
    ("0", "1", "1"),
    ("0.0", "1.0", "1.0"),  # as pandas writes a 0/1 column that has empty cells
])
def test_the_positive_class_is_the_one_the_names_mean(tmp_path: Path, a: str, b: str, positive: str) -> None:
    task = infer_task(read_manifest(_manifest(tmp_path, a, b), require_path=False))
    assert task.kind == "binary" and task.outputs == (positive,)
    assert task.classes[1] == positive and task.classes[0] == ({a, b} - {positive}).pop()


def test_two_values_that_cannot_be_ordered_are_refused_until_classes_says(tmp_path: Path) -> None:
    entries = read_manifest(_manifest(tmp_path, "subtypeA", "subtypeB"), require_path=False)
    with pytest.raises(ManifestError, match=r"which is the positive class cannot be told.*--classes NEG,POS"):
        infer_task(entries)
    task = infer_task(entries, classes=["subtypeB", "subtypeA"])
    assert task.outputs == ("subtypeA",)
