"""A folder scan says what it leaves out (before: slides in subfolders, dangling links and
link loops vanished with an empty skipped list), and a link to a slide beside the slide is
one slide, tiled once (before: twice)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from wsi_mil.data.manifest import resolve_inputs_reporting


def test_every_entry_left_out_is_listed_and_aliases_are_one_slide(tmp_path: Path, cmu_slide: Path) -> None:
    folder = tmp_path / "slides"
    (folder / "batch2").mkdir(parents=True)
    shutil.copy(cmu_slide, folder / "a.svs")
    shutil.copy(cmu_slide, folder / "batch2" / "b.svs")  # a slide one level down
    os.symlink(folder / "a.svs", folder / "alias.svs")  # the same file under another name
    os.symlink(tmp_path / "gone.svs", folder / "dangling.svs")  # a link to nothing
    os.symlink(folder / "loop2.svs", folder / "loop1.svs")
    os.symlink(folder / "loop1.svs", folder / "loop2.svs")  # a link loop
    (folder / ".DS_Store").write_bytes(b"\0")
    resolved = resolve_inputs_reporting([folder])
    assert [e.slide_id for e in resolved.entries] == ["a"]
    reasons = {Path(s["path"]).name: s["reason"] for s in resolved.skipped}
    assert "subfolder" in reasons["batch2"] and "not scanned recursively" in reasons["batch2"]
    assert "does not exist" in reasons["dangling.svs"]
    assert "loop" in reasons["loop1.svs"] and "loop" in reasons["loop2.svs"]
    assert "the same file as slide a" in reasons["alias.svs"]
    assert reasons[".DS_Store"] == "a hidden file"
    # the file given twice (a folder and the file itself) is one slide too
    again = resolve_inputs_reporting([folder / "a.svs", folder / "alias.svs"])
    assert [e.slide_id for e in again.entries] == ["a"]
