"""Image readers on real radiographs: PNG 8/16-bit, JPEG, DICOM (rescale, VOI, MONOCHROME1,
refusals), MedMNIST NPZ; consensus labels and reader agreement against reference code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.data.images import (
    ImageReadError,
    cohen_kappa,
    consensus,
    fleiss_kappa,
    npz_entries,
    read_image,
    read_image_manifest,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr"
NIH = DATA / "nih1000"
XRAY = NIH / "NIH1000" / "train" / "0_normal"


def _real() -> np.ndarray:
    path = sorted(XRAY.glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("L"))


def test_png_8_and_16_bit_and_jpeg_read_to_the_same_grey_image(tmp_path: Path) -> None:
    grey = _real()
    rgb = sorted(XRAY.glob("*.png"))[0]  # stored as RGB with equal channels
    assert np.allclose(read_image(rgb), grey / 255.0, atol=1 / 255)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "x16.png")  # full 16-bit range
    Image.fromarray(grey.astype(np.uint16) * 16).save(tmp_path / "x12.png")  # a 12-bit detector in 16 bits
    Image.fromarray(grey).save(tmp_path / "x.jpg", quality=95)
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    for name in ("x16.png", "x12.png"):
        img = read_image(tmp_path / name)
        assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
        assert np.allclose(img, grey / 255.0, atol=0.01), name
    assert np.abs(read_image(tmp_path / "x.jpg") - grey / 255.0).mean() < 0.01


def _dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags: object) -> Path:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1 if photometric.startswith("MONO") else 3
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if ds.SamplesPerPixel == 3:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    assert pydicom.dcmread(str(path)).PhotometricInterpretation == photometric
    return path


def test_dicom_rescale_window_and_monochrome1(tmp_path: Path) -> None:
    grey = _real().astype(np.uint16) * 16  # 12-bit stored values 0..4080
    # modality LUT: HU-like values = 2 * stored - 1024, spanning -1024..7136
    plain = read_image(_dicom(tmp_path / "a.dcm", grey, RescaleSlope=2, RescaleIntercept=-1024))
    assert np.allclose(plain, (grey - grey.min()) / (grey.max() - grey.min()), atol=1e-5)  # own range when no window
    # an explicit window in modality units: centre 1024, width 2048 -> values -> [0, 2048] mapped to [0, 1]
    win = read_image(_dicom(tmp_path / "b.dcm", grey, RescaleSlope=2, RescaleIntercept=-1024), window=(1024.0, 2048.0))
    expected = np.clip((2.0 * grey - 1024 - 0) / 2048, 0, 1)
    assert np.allclose(win, expected, atol=1e-5)
    # the file's own window is used (VOI), and --no-use-voi ignores it
    voi = _dicom(tmp_path / "c.dcm", grey, WindowCenter=1000, WindowWidth=1000)
    in_file = read_image(voi)
    assert in_file[grey <= 500].max() == 0 and in_file[grey >= 1500].min() == 1
    assert not np.allclose(read_image(voi, use_voi=False), in_file)
    # MONOCHROME1: low values are bright; the output is inverted so bone is bright in both
    m1 = read_image(_dicom(tmp_path / "d.dcm", grey.max() - grey, "MONOCHROME1"))
    m2 = read_image(_dicom(tmp_path / "e.dcm", grey, "MONOCHROME2"))
    assert np.allclose(m1, m2, atol=1e-5)


def test_colour_and_multiframe_dicoms_are_refused_by_name(tmp_path: Path) -> None:
    rgb = np.repeat(_real()[..., None], 3, axis=2).astype(np.uint8)
    with pytest.raises(ImageReadError, match="RGB is not supported"):
        read_image(_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    grey = _real().astype(np.uint16)
    frames = np.stack([grey, grey])
    with pytest.raises(ImageReadError, match="multi-frame"):
        read_image(_dicom(tmp_path / "mf.dcm", frames.reshape(-1, grey.shape[1]), NumberOfFrames=2,
                          Rows=grey.shape[0]))
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom")
    with pytest.raises(ImageReadError, match="junk.dcm"):
        read_image(tmp_path / "junk.dcm")


def test_medmnist_npz_keeps_the_official_splits() -> None:
    entries = npz_entries(DATA / "pneumoniamnist.npz")
    counts = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
    assert counts == {"train": 4708, "val": 524, "test": 624}
    test = [e for e in entries if e.split == "test"]
    assert sum(e.labels["label"] == "0" for e in test) == 234
    assert test[0].pixels is not None and test[0].pixels.shape == (28, 28) and test[0].pixels.max() <= 1


def test_cohen_and_fleiss_kappa_match_reference_implementations() -> None:
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    readers = [np.where(rng.random(200) < q, truth, 1 - truth).astype(str).tolist() for q in (0.9, 0.8, 0.75)]
    assert cohen_kappa(readers[0], readers[1]) == pytest.approx(cohen_kappa_score(readers[0], readers[1]))
    statsmodels = pytest.importorskip("statsmodels.stats.inter_rater")
    rows = [list(r) for r in zip(*readers, strict=True)]
    table, _ = statsmodels.aggregate_raters(np.asarray(rows))
    assert fleiss_kappa(rows, ["0", "1"]) == pytest.approx(statsmodels.fleiss_kappa(table, method="fleiss"))
    # a textbook case (Fleiss 1971 style): perfect agreement is 1, chance-level near 0
    assert fleiss_kappa([["a", "a", "a"], ["b", "b", "b"]], ["a", "b"]) == pytest.approx(1.0)


def test_consensus_majority_with_ties_left_unlabelled(tmp_path: Path) -> None:
    labels, record = consensus([["1", "1", "0"], ["0", "0", "0"], ["1", "0", ""], ["", "", ""]])
    assert labels == ["1", "0", "", ""]
    assert record["ties"] == [2] and record["n_all_readers"] == 2 and record["unanimous_share"] == 0.5
    manifest = tmp_path / "m.csv"
    img = sorted(XRAY.glob("*.png"))[0]
    manifest.write_text("path,patient_id,r1,r2\n" + f"{img},p1,1,1\n{img},p2,0,1\n".replace(f"{img},p2", f"{img},p2"))
    with pytest.raises(Exception, match="duplicate ids"):
        read_image_manifest(manifest, readers=["r1", "r2"])


def test_a_multi_page_tiff_is_refused_not_read_as_its_first_page(tmp_path: Path) -> None:
    grey = _real()
    pages = [Image.fromarray(grey), Image.fromarray(255 - grey)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with Image.open(tmp_path / "stack.tif") as check:
        assert check.n_frames == 2  # what a peer reader sees
    with pytest.raises(ImageReadError, match=r"stack.tif: a multi-page file \(2 pages\)"):
        read_image(tmp_path / "stack.tif")
    pages[0].save(tmp_path / "one.tif")  # a single page still reads
    assert np.allclose(read_image(tmp_path / "one.tif"), grey / 255.0)


@pytest.mark.parametrize(("orientation", "turn"), [(6, "cw"), (8, "ccw"), (3, "180")])
def test_jpeg_exif_orientation_is_honoured(tmp_path: Path, orientation: int, turn: str) -> None:
    """A phone photo of a film is stored sideways with an EXIF orientation tag: the reader
    returns it upright, as every image viewer shows it."""
    grey = _real()[:, : _real().shape[1] * 2 // 3]  # not square, so a wrong turn cannot pass
    upright = grey
    # stored pixels: the upright picture turned the other way, so that applying the tag turns it back
    stored = {"cw": np.rot90(upright, 1), "ccw": np.rot90(upright, -1), "180": np.rot90(upright, 2)}[turn]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "photo.jpg", quality=98, exif=exif.tobytes())
    out = read_image(tmp_path / "photo.jpg")
    assert out.shape == upright.shape
    assert np.abs(out - upright / 255.0).mean() < 0.01
    # PIL's own exif_transpose (the reference users trust) gives the same picture
    from PIL import ImageOps

    with Image.open(tmp_path / "photo.jpg") as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("L"), np.float32) / 255.0
    assert np.array_equal(out, ref)
