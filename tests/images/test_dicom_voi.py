"""A DICOM's own VOI (window or LUT) is applied once, as pydicom applies it, and its output
range becomes [0, 1] — checked value for value against pydicom on files written with
pydicom: linear, narrow, LINEAR_EXACT and SIGMOID windows, a VOI LUT sequence, with and
without rescale, unsigned and signed pixels. (Before, the file's window was applied a
second time to pydicom's output: a 12-bit ramp at C 2000 / W 2000 came out 0.27 off.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.images.test_readers import XRAY, _dicom
from wsi_mil.data.images import read_image


def _reference(path: Path, y_range: tuple[float, float]) -> np.ndarray:
    """pydicom's own modality + VOI output, scaled from the range the DICOM standard gives
    that output (PS3.3 C.11.2.1) to [0, 1]."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    ds = pydicom.dcmread(str(path))
    values = apply_modality_lut(pixel_array(ds), ds)  # the function: wsidicom (imported by other tests) hooks ds
    if "VOILUTSequence" in ds:
        values = np.rint(values).astype(np.int64)
    out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    lo, hi = y_range
    return np.clip((out - lo) / (hi - lo), 0, 1)


def _ramp() -> np.ndarray:
    """A 12-bit ramp over 0..4095 (every value, 64 x 64)."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _real12() -> np.ndarray:
    path = sorted(XRAY.glob("*.png"))[1]
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16


@pytest.mark.parametrize(("name", "tags", "y_range"), [
    ("linear C2000 W2000", {"WindowCenter": 2000, "WindowWidth": 2000}, (0, 4095)),
    ("narrow C1500 W200", {"WindowCenter": 1500, "WindowWidth": 200}, (0, 4095)),
    ("linear_exact", {"WindowCenter": 1800, "WindowWidth": 900, "VOILUTFunction": "LINEAR_EXACT"}, (0, 4095)),
    ("sigmoid", {"WindowCenter": 2100, "WindowWidth": 1200, "VOILUTFunction": "SIGMOID"}, (0, 4095)),
    # with a rescale the window is in modality units and its output range goes through the rescale
    ("rescaled", {"WindowCenter": 1000, "WindowWidth": 3000, "RescaleSlope": 2, "RescaleIntercept": -1024},
     (-1024, 4095 * 2 - 1024)),
    ("rescaled sigmoid", {"WindowCenter": 0, "WindowWidth": 2000, "RescaleSlope": 1, "RescaleIntercept": -2048,
                          "VOILUTFunction": "SIGMOID"}, (-2048, 4095 - 2048)),
])
@pytest.mark.parametrize("pixels", ["ramp", "radiograph"])
def test_the_files_window_is_applied_once_as_pydicom_does(tmp_path: Path, name: str, tags: dict, y_range: tuple,
                                                         pixels: str) -> None:
    arr = _ramp() if pixels == "ramp" else _real12()
    path = _dicom(tmp_path / "w.dcm", arr, **tags)
    ours = read_image(path)
    expected = _reference(path, y_range)
    assert np.abs(ours - expected).max() < 1e-5, name
    if name == "linear C2000 W2000" and pixels == "ramp":  # the numbers: 44 % white, not 61 %
        assert (ours >= 1.0).mean() == pytest.approx(1095 / 4096, abs=1e-3)  # stored > 2999.5 -> white
        assert (ours >= 1.0).mean() < 0.3


def test_signed_pixels_window_range_is_the_signed_stored_range(tmp_path: Path) -> None:
    arr = (_ramp().astype(np.int32) - 2048).astype(np.int16)  # -2048..2047, signed 12-bit
    path = _dicom(tmp_path / "s.dcm", arr, PixelRepresentation=1, WindowCenter=0, WindowWidth=1000)
    ours = read_image(path)
    assert np.abs(ours - _reference(path, (-2048, 2047))).max() < 1e-5
    assert ours.min() == 0 and ours.max() == 1


@pytest.mark.parametrize("rescale", [False, True])
def test_voi_lut_sequence_maps_its_output_range_without_a_float_warning(tmp_path: Path, rescale: bool) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    arr = _real12()
    # a gamma-like LUT over 0..4095 into 12 bits, whose entries for this image span less than the range:
    # the output range (0..4095) becomes [0, 1], not the image's own min..max
    first = -1024 if rescale else 0
    entries = (np.linspace(0, 1, 4096) ** 0.6 * 3000 + 500).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "SS" if first < 0 else "US", [4096, first, 12])  # LUTDescriptor
    item.add_new(0x00283006, "OW", entries.astype("<u2").tobytes())  # LUTData
    tags: dict = {"VOILUTSequence": Sequence([item])}
    if rescale:
        tags.update(RescaleSlope=1.0, RescaleIntercept=-1024.0)  # float modality values: pydicom warns on those
    path = _dicom(tmp_path / "lut.dcm", arr, **tags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = read_image(path)
    expected = _reference(path, (0, 4095))
    assert np.abs(ours - expected).max() < 1e-5
    assert ours.min() >= 500 / 4095 - 1e-6  # the LUT's floor stays grey: no stretching to the image's own range
