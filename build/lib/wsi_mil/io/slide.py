"""Open a slide and resolve its resolution (microns per pixel) with provenance.

All coordinates are level-0 pixels. The mpp of a slide is never guessed: it comes
from the slide's metadata, a manifest column or an explicit override, and where it
came from travels with every output (``mpp_source``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import MissingMppError, SlideOpenError

if TYPE_CHECKING:
    from openslide import AbstractSlide

logger = logging.getLogger(__name__)

MppSource = Literal["override", "manifest", "metadata"]

#: Largest relative difference between two mpp values that still counts as "the same
#: magnification" (0.499 µm/px scanned is read as 0.5 µm/px without resampling).
MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class SlideMpp:
    """Microns per pixel at level 0 and where that number came from."""

    mpp: float
    source: MppSource


@contextmanager
def open_slide(path: str | Path) -> Iterator[AbstractSlide]:
    """Open a slide with OpenSlide (plain TIFF/PNG/JPEG through its image fallback).

    Args:
        path: Slide file.

    Yields:
        An ``openslide.OpenSlide`` or ``openslide.ImageSlide``; closed on exit.

    Raises:
        SlideOpenError: missing file, not a slide, or an unreadable/truncated file.
    """
    import openslide
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: file not found. Check the path (or the manifest's 'path' column).")
    if not path.is_file():
        raise SlideOpenError(f"{path}: not a file. Give slide files, a folder of slides or a manifest CSV.")
    # a TIFF-based slide cut short (a broken copy) is said to be so, whatever OpenSlide and Pillow make of it:
    # it reads as "unsupported" to both, or still opens (Pillow reads a cut SVS's first page as the slide)
    cut = tiff_truncation(path)  # (half a millisecond for a 30k px slide)
    try:
        if cut:
            raise SlideOpenError(f"{path}: the file is truncated: {cut}. It was cut short while being copied or "
                                 "downloaded: copy it again.")
        slide = openslide.open_slide(str(path))
    except SlideOpenError:
        raise
    except (openslide.OpenSlideUnsupportedFormatError, UnidentifiedImageError) as exc:
        said = "Pillow" if isinstance(exc, UnidentifiedImageError) else "OpenSlide"
        raise SlideOpenError(
            f"{path}: not a slide format OpenSlide or Pillow can read (OpenSlide does not recognise it; {said} says: "
            f"{str(exc)!r}). Convert it to a pyramidal TIFF/SVS or remove it from the input."
        ) from exc
    except Exception as exc:  # openslide raises OpenSlideError / PIL raises OSError on damaged files
        raise SlideOpenError(_open_failure(path, exc)) from exc
    try:
        _probe_readable(slide, path)
        yield slide
    finally:
        slide.close()


#: OpenSlide messages that mean "a variant of the format it does not read", not damage
_UNSUPPORTED_HINTS = ("flavor", "flavour", "unsupported", "not supported", "no pyramid levels", "unknown",
                      "unexpected", "unrecognized", "unrecognised", "not implemented")
#: ... and messages that point at a file cut short
_TRUNCATED_HINTS = ("truncat", "premature end", "short read", "unexpected end", "eof", "end of file", "incomplete")


def _open_failure(path: Path, exc: BaseException) -> str:
    """Tell an unsupported variant of a format from a damaged file, quoting OpenSlide."""
    said = str(exc).replace(str(path), path.name)
    low = said.lower()
    if any(h in low for h in _TRUNCATED_HINTS):
        return (f"{path}: the file looks truncated or damaged (OpenSlide says: {said!r}). Re-copy or re-export "
                "the slide.")
    if any(h in low for h in _UNSUPPORTED_HINTS):
        return (f"{path}: OpenSlide recognises the format but cannot read this variant of it (OpenSlide says: "
                f"{said!r}); the file is probably not damaged. Convert it with the scanner's software or a converter "
                "(e.g. to a pyramidal TIFF), or leave it out.")
    return (f"{path}: OpenSlide cannot read this file (OpenSlide says: {said!r}). If it was copied or downloaded "
            "it may be incomplete: re-copy it; if it is complete, this variant of its format is not supported: "
            "convert it to a pyramidal TIFF.")


#: TIFF tags whose values locate the pixel data (offsets, byte counts), strips or tiles
_DATA_TAGS = {273: "offsets", 279: "counts", 324: "offsets", 325: "counts"}
#: bytes per value of each TIFF field type (TIFF 6.0 and BigTIFF) ...
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
#: ... and how the unsigned integer types that can locate data are unpacked
_INT_FORMATS = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}


def tiff_truncation(path: str | Path, *, max_directories: int = 4096) -> str | None:
    """Evidence that a TIFF-based file (SVS, NDPI, pyramidal TIFF ...) was cut short: an
    image directory, a tag's value or the pixel data a directory points to lies past the
    end of the file. None when the file is not TIFF-based or everything it points to is there."""
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:4] in (b"II*\0", b"MM\0*"):
            big = False
        elif head[:4] in (b"II+\0", b"MM\0+"):
            big = True
        else:
            return None
        order = "<" if head[:2] == b"II" else ">"
        # classic TIFF: 4-byte offsets, 2-byte entry counts; BigTIFF: 8 and 8
        ptr, ptr_len, count_fmt, count_len = ("Q", 8, "Q", 8) if big else ("I", 4, "H", 2)
        first = 8 if big else 4
        if len(head) < first + ptr_len:
            return f"the file ends inside its {len(head)}-byte header"
        offset = struct.unpack(order + ptr, head[first:first + ptr_len])[0]
        entry_len = 4 + 2 * ptr_len
        seen: set[int] = set()
        n = 0
        while offset and offset not in seen and n < max_directories:
            seen.add(offset)
            n += 1
            if offset + count_len > size:
                return (f"its image directory {n} should start at byte {offset:,}, past the end of the file "
                        f"({size:,} bytes)")
            fh.seek(offset)
            entries = struct.unpack(order + count_fmt, fh.read(count_len))[0]
            end = offset + count_len + entries * entry_len + ptr_len
            if end > size:
                return f"its image directory {n} runs to byte {end:,}, past the end of the file ({size:,} bytes)"
            raw = fh.read(entries * entry_len)
            next_offset = struct.unpack(order + ptr, fh.read(ptr_len))[0]
            arrays: dict[str, npt.NDArray[np.int64]] = {}
            for k in range(entries):
                e = raw[k * entry_len:(k + 1) * entry_len]
                tag, typ = struct.unpack(order + "HH", e[:4])
                num = struct.unpack(order + ptr, e[4:4 + ptr_len])[0]
                value_bytes = num * _TIFF_TYPE_BYTES.get(typ, 1)
                inline = e[4 + ptr_len:]
                at, data = 0, inline[:value_bytes]
                if value_bytes > ptr_len:  # the value lives elsewhere in the file: is it there?
                    at = struct.unpack(order + ptr, inline)[0]
                    if at + value_bytes > size:
                        return (f"its image directory {n} keeps tag {tag}'s value at bytes {at:,}-{at + value_bytes:,}, "
                                f"past the end of the file ({size:,} bytes)")
                if tag in _DATA_TAGS and typ in _INT_FORMATS:
                    if value_bytes > ptr_len:
                        fh.seek(at)
                        data = fh.read(value_bytes)
                    arrays.setdefault(_DATA_TAGS[tag], np.frombuffer(data, np.dtype(order + _INT_FORMATS[typ]))
                                      .astype(np.int64))
            offsets, counts = arrays.get("offsets"), arrays.get("counts")
            if offsets is not None and counts is not None and len(offsets) and len(offsets) == len(counts):
                data_end = int((offsets + counts).max())
                if data_end > size:
                    return (f"image {n}'s pixel data runs to byte {data_end:,}, past the end of the file "
                            f"({size:,} bytes)")
            offset = next_offset
    return None


def _probe_readable(slide: object, path: Path) -> None:
    """Read a pixel from each corner of the coarsest level to catch truncated files early."""
    import openslide

    level = slide.level_count - 1  # type: ignore[attr-defined]
    w, h = slide.level_dimensions[level]  # type: ignore[attr-defined]
    ds = slide.level_downsamples[level]  # type: ignore[attr-defined]
    try:
        for x, y in ((0, 0), (w - 1, h - 1)):
            slide.read_region((int(x * ds), int(y * ds)), level, (1, 1))  # type: ignore[attr-defined]
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideOpenError(
            f"{path}: the slide opens but its pixels cannot be read (OpenSlide says: {str(exc)!r}); the file is "
            "probably truncated or its pixel data is missing. Re-copy or re-export the slide."
        ) from exc


def metadata_mpp(slide: object) -> float | None:
    """The slide's level-0 mpp from its metadata, or None when absent/invalid."""
    import openslide

    props = slide.properties  # type: ignore[attr-defined]
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            return None
        if not np.isfinite(value) or value <= 0:
            return None
        values.append(value)
    return float(np.mean(values))


def resolve_mpp(
    slide: object,
    *,
    slide_name: str,
    override_mpp: float | None = None,
    manifest_mpp: float | None = None,
) -> SlideMpp:
    """Decide the level-0 mpp of a slide, most explicit source first.

    Order: ``--slide-mpp`` > manifest ``mpp`` column > slide metadata.

    Raises:
        MissingMppError: none of the three is available.
    """
    if override_mpp is not None:
        meta = metadata_mpp(slide)
        if meta is not None and abs(meta / override_mpp - 1) > MPP_TOLERANCE:
            logger.warning(
                "%s: --slide-mpp %.4g differs from the slide's metadata mpp %.4g; using --slide-mpp",
                slide_name, override_mpp, meta,
            )
        return SlideMpp(float(override_mpp), "override")
    if manifest_mpp is not None:
        return SlideMpp(float(manifest_mpp), "manifest")
    meta = metadata_mpp(slide)
    if meta is not None:
        return SlideMpp(meta, "metadata")
    raise MissingMppError(
        f"{slide_name}: the slide has no microns-per-pixel in its metadata. Give it with "
        "--slide-mpp MPP (e.g. 0.25 for a 40x scan, 0.5 for 20x) or an 'mpp' column in the "
        "manifest; wsi-mil never assumes a resolution."
    )


def file_sha256(path: str | Path, *, chunk_bytes: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes (streamed; constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


#: how :func:`file_fingerprint` samples a file (recorded beside the fingerprint)
FINGERPRINT_METHOD = "sha256 of the file size and 64 evenly spaced 64 KiB blocks (first and last included)"


def file_fingerprint(path: str | Path, *, blocks: int = 64, block_bytes: int = 64 << 10) -> str:
    """SHA-256 of a file's size and ``blocks`` evenly spaced blocks: reads 4 MiB of a
    slide of any size, and changes when the file is replaced, truncated or rewritten
    (not guaranteed for an edit inside an unsampled stretch: use :func:`file_sha256`)."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= blocks * block_bytes:
            digest.update(fh.read())
        else:
            last = size - block_bytes
            for i in range(blocks):
                fh.seek(last * i // (blocks - 1))
                digest.update(fh.read(block_bytes))
    return digest.hexdigest()


def changed_since(attrs: dict[str, Any], path: str | Path) -> bool:
    """Whether the slide file at ``path`` differs from the one a store was made from: its
    size, or — when its modification time moved — its sampled content
    (:func:`file_fingerprint`; a file only touched or copied keeps it). Stores without a
    recorded time are judged by their size."""
    st = Path(path).stat()
    if attrs.get("slide_size_bytes") is not None and int(attrs["slide_size_bytes"]) != st.st_size:
        return True
    recorded = attrs.get("slide_mtime_ns")
    if recorded in (None, "none") or int(recorded) == st.st_mtime_ns or not attrs.get("slide_fingerprint"):
        return False
    return file_fingerprint(path) != attrs["slide_fingerprint"]


def read_region_image(slide: object, *, x_px: int, y_px: int, level: int, width: int, height: int) -> Any:
    """Read a region as an RGB Pillow image, compositing transparent pixels on white.

    ``x_px``/``y_px`` are level-0 coordinates; ``width``/``height`` are at ``level``. The
    common, fully opaque case stays in Pillow (no numpy round trip).
    """
    region = slide.read_region((int(x_px), int(y_px)), int(level), (int(width), int(height)))  # type: ignore[attr-defined]
    return on_white(region)


def on_white(region: Any) -> Any:
    """A Pillow image as RGB, transparent pixels composited on white (OpenSlide returns
    transparent pixels outside the scanned area)."""
    from PIL import Image

    if region.mode != "RGBA" or region.getchannel("A").getextrema()[0] == 255:
        return region.convert("RGB")
    return Image.fromarray(rgba_on_white(np.asarray(region)))


def read_region_bgra(slide: object, *, x_px: int, y_px: int, level: int, width: int, height: int
                     ) -> npt.NDArray[np.uint8] | None:
    """A region as OpenSlide decodes it, (H, W, 4) uint8 in B, G, R, A order (its
    premultiplied ARGB words, little-endian), with transparent pixels composited on white.

    Read straight into a numpy array: no conversion to straight-alpha RGBA and no Pillow
    image, which ``read_region`` spends ~20 % of a low-resolution read on. ``None`` where
    ``slide`` is not an OpenSlide handle or this openslide-python lacks the raw call (then
    read with :func:`read_region_image`). Read errors raise ``OpenSlideError`` as usual.
    """
    import ctypes
    import sys

    if width <= 0 or height <= 0 or sys.byteorder != "little":
        return None
    try:
        from openslide import lowlevel

        raw_read = lowlevel._read_region  # the binding's ctypes call (errors are checked by it)
        handle = slide._osr  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return None
    words = np.empty((int(height), int(width)), dtype=np.uint32)
    raw_read(handle, words.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), int(x_px), int(y_px), int(level),
             int(width), int(height))
    bgra = words.view(np.uint8).reshape(int(height), int(width), 4)
    if not bool((words >= 0xFF000000).all()):  # some alpha < 255: premultiplied, so white shows through as + (255 - a)
        white = (255 - bgra[..., 3:4]).astype(np.uint16)
        bgra[..., :3] = np.minimum(bgra[..., :3] + white, 255)  # (saturating, should a colour exceed its alpha)
        bgra[..., 3] = 255
    return bgra


def rgba_on_white(rgba: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """An (H, W, 4) straight-alpha array as contiguous (H, W, 3) RGB on white (the opaque
    case is a plain channel copy)."""
    alpha = rgba[..., 3]
    if alpha.size == 0 or int(alpha.min()) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint16)
    return ((rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a)) // 255).astype(np.uint8)


def read_region_rgb(
    slide: object, *, x_px: int, y_px: int, level: int, width: int, height: int
) -> npt.NDArray[np.uint8]:
    """Like :func:`read_region_image`, as an (H, W, 3) uint8 array."""
    return np.asarray(read_region_image(slide, x_px=x_px, y_px=y_px, level=level, width=width, height=height))
