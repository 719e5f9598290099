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
    assert "trunc" not in truncated_slide.name.lower()  # the diagnosis, not the file name, must say it
    with pytest.raises(SlideOpenError, match=r"the file is truncated: its image directory 1 should start at byte "
                                             r"1,275,950, past the end of the file \(969,477 bytes\)"):
        with open_slide(truncated_slide):
            pass


@pytest.mark.parametrize("share", [0.9, 0.99, 0.9999])
def test_a_slide_cut_anywhere_is_called_truncated_not_unsupported(tmp_path, cmu_slide, share) -> None:
    """Before: "not a slide format OpenSlide or Pillow can read (OpenSlide says: 'cannot
    identify image file ...')" — Pillow's words, and the wrong diagnosis."""
    data = cmu_slide.read_bytes()
    cut = tmp_path / "copy.svs"
    cut.write_bytes(data[: int(len(data) * share)])
    with pytest.raises(SlideOpenError) as info, open_slide(cut):
        pass
    msg = str(info.value)
    assert "the file is truncated" in msg and "past the end of the file" in msg and "copy it again" in msg
    assert "not a slide format" not in msg


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


def test_raw_region_read_equals_openslides_rgba_on_white(cmu_slide, kidney_slide) -> None:
    """The thumbnail reader takes OpenSlide's premultiplied BGRA words straight into numpy:
    on the real SVS the pixels equal read_region's composited on white, exactly where the
    region is opaque and within rounding where it hangs off the slide (transparent there);
    a plain image (ImageSlide) has no raw path and is read through Pillow."""
    from wsi_mil.io.slide import on_white, read_region_bgra
    from wsi_mil.io.thumbnail import read_thumbnail

    with open_slide(cmu_slide) as slide:
        w, _h = slide.level_dimensions[0]
        for x, y, level, size in ((100, 200, 0, (300, 200)), (w - 150, -40, 0, (300, 120)), (-64, 0, 1, (200, 90))):
            bgra = read_region_bgra(slide, x_px=x, y_px=y, level=level, width=size[0], height=size[1])
            ref = np.asarray(on_white(slide.read_region((x, y), level, size)))
            assert bgra is not None and bgra.shape == (size[1], size[0], 4)
            rgb = bgra[..., 2::-1]
            assert np.abs(rgb.astype(int) - ref).max() <= 1, (x, y, level)
            opaque = np.asarray(slide.read_region((x, y), level, size))[..., 3] == 255
            assert np.array_equal(rgb[opaque], ref[opaque])
            if x < 0 or y < 0 or x + size[0] > w:  # off the slide: white, not black
                assert not opaque.all() and (ref[~opaque] == 255).all() and (rgb[~opaque] == 255).all()
        thumb, _, _ = read_thumbnail(slide, slide_mpp=0.499, pixel_um=4.0)
        assert thumb.shape[:2] == (370, 277) and 100 < thumb.mean() < 250
    with open_slide(kidney_slide) as slide:
        assert read_region_bgra(slide, x_px=0, y_px=0, level=0, width=10, height=10) is None
        thumb, _, _ = read_thumbnail(slide, slide_mpp=0.5, pixel_um=8.0)
        assert thumb.shape == (56, 93, 3) and thumb.min() < 200 < thumb.max()
