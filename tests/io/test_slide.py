from __future__ import annotations

import pytest

from wsi_mil.errors import MissingMppError, SlideOpenError
from wsi_mil.io.slide import file_sha256, open_slide, resolve_mpp


def test_mpp_from_metadata(cmu_slide) -> None:
    with open_slide(cmu_slide) as slide:
        assert resolve_mpp(slide, slide_name="cmu") == (0.499, "metadata") or resolve_mpp(slide, slide_name="cmu").mpp == pytest.approx(0.499)
        assert resolve_mpp(slide, slide_name="cmu").source == "metadata"
        assert resolve_mpp(slide, slide_name="cmu", manifest_mpp=0.5).source == "manifest"
        got = resolve_mpp(slide, slide_name="cmu", override_mpp=0.25, manifest_mpp=0.5)
        assert (got.mpp, got.source) == (0.25, "override")


def test_missing_mpp_is_refused_with_the_fix(kidney_slide) -> None:
    with open_slide(kidney_slide) as slide:
        with pytest.raises(MissingMppError, match="kidney.*--slide-mpp"):
            resolve_mpp(slide, slide_name="kidney-48-5")
        assert resolve_mpp(slide, slide_name="k", override_mpp=0.5).source == "override"


def test_truncated_slide_is_a_clear_error(truncated_slide) -> None:
    with pytest.raises(SlideOpenError, match="truncated|damaged"):
        with open_slide(truncated_slide):
            pass


def test_missing_and_non_slide_files(tmp_path) -> None:
    with pytest.raises(SlideOpenError, match="not found"):
        with open_slide(tmp_path / "nope.svs"):
            pass
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide")
    with pytest.raises(SlideOpenError, match="not a slide"):
        with open_slide(text):
            pass


def test_file_hash_is_sha256(tmp_path) -> None:
    import hashlib

    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_sha256(p, chunk_bytes=7) == hashlib.sha256(b"abc" * 1000).hexdigest()
