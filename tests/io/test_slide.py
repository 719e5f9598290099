from __future__ import annotations

import numpy as np
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


def test_fingerprint_samples_the_file(tmp_path) -> None:
    import hashlib

    from wsi_mil.io.slide import file_fingerprint

    small = tmp_path / "small.bin"
    small.write_bytes(b"xyz" * 100)  # smaller than the sample: hashed whole, with its size
    assert file_fingerprint(small) == hashlib.sha256(b"300" + b"xyz" * 100).hexdigest()
    data = bytearray(np.random.default_rng(0).integers(0, 256, 10 << 20, dtype=np.uint8).tobytes())
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(data))
    base = file_fingerprint(big)
    (tmp_path / "copy.bin").write_bytes(bytes(data))
    assert file_fingerprint(tmp_path / "copy.bin") == base  # content, not name or time
    for offset in (0, len(data) - 1, (len(data) - (64 << 10)) * 31 // 63 + 5):  # first, last, a middle block
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        big.write_bytes(bytes(changed))
        assert file_fingerprint(big) != base, offset
    big.write_bytes(bytes(data[:-1]))  # truncated by one byte
    assert file_fingerprint(big) != base
