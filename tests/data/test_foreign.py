"""Features made by other tools: CLAM and TRIDENT feature files, written here by a script with h5py
in each tool's layout (as their code writes them: CLAM's h5_files/<slide>.h5 with features +
int32 coords and no attributes, its patches/<slide>.h5 whose coords carry patch_size / patch_level /
downsample; TRIDENT's features_<encoder>/<slide>.h5 with float16 features and coords carrying
patch_size_level0), holding the real UCSB breast-cancer MIL bags (histopathology patch features).
Imported stores train exactly as the same bags imported natively; what cannot be trusted is refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.cli import main
from wsi_mil.data.mil_import import load_classic

STEP = 256


def _grid(n: int) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    return np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * STEP + 1000


def _clam(root: Path, bags: list, patch_size: int = STEP) -> tuple[Path, Path]:
    h5s, patches = root / "h5_files", root / "patches"
    h5s.mkdir(parents=True)
    patches.mkdir()
    for b in bags:
        coords = _grid(len(b.features))
        with h5py.File(h5s / f"{b.slide_id}.h5", "w") as f:  # CLAM's save_hdf5: no attributes
            f.create_dataset("features", data=b.features.astype(np.float32), maxshape=(None, b.features.shape[1]))
            f.create_dataset("coords", data=coords.astype(np.int32), maxshape=(None, 2))
        with h5py.File(patches / f"{b.slide_id}.h5", "w") as f:
            c = f.create_dataset("coords", data=coords.astype(np.int64))
            c.attrs.update({"patch_size": patch_size, "patch_level": 0, "downsample": [1.0, 1.0],
                            "downsampled_level_dim": [20000, 20000], "level_dim": [20000, 20000],
                            "name": b.slide_id, "save_path": str(patches)})
    return h5s, patches


def _trident(root: Path, bags: list, encoder: str | None) -> Path:
    folder = root / "20x_256px_0px_overlap" / "features_uni_v1"
    folder.mkdir(parents=True)
    for b in bags:
        with h5py.File(folder / f"{b.slide_id}.h5", "w") as f:
            feats = f.create_dataset("features", data=b.features.astype(np.float16))
            feats.attrs.update({"name": b.slide_id, "savetodir": str(folder)})
            if encoder:
                feats.attrs["encoder"] = encoder
            c = f.create_dataset("coords", data=_grid(len(b.features)) * 2)  # level 0 is 40x: 512 px patches
            c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                            "target_magnification": 20, "overlap": 0, "name": b.slide_id, "savetodir": str(folder)})
    return folder


@pytest.fixture(scope="module")
def bags() -> list:
    return load_classic("ucsb_breast_cancer", shared("mil"))


def _manifest(path: Path, bags: list, folder: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "patient_id", "label"])
        for b in bags:
            w.writerow([b.slide_id, folder / f"{b.slide_id}.h5", b.patient_id, int(b.target[0])])
    return path


def test_clam_features_train_exactly_as_the_same_bags_imported_natively(bags, tmp_path, capsys) -> None:
    from wsi_mil.data.mil_import import import_classic

    h5s, patches = _clam(tmp_path / "clam", bags)
    out = tmp_path / "imported"
    # no encoder named: refused, nothing written
    assert main(["import-features", str(h5s), "--out", str(out), "--no-progress", "-q"]) == 2
    assert "does not say which encoder made its features; give --encoder" in capsys.readouterr().err
    assert not list((out / "features").glob("*.h5")) if (out / "features").exists() else True
    # no patch size: refused naming the two ways to give it
    assert main(["import-features", str(h5s), "--out", str(out), "--encoder", "ucsb-708", "--no-progress", "-q"]) == 2
    assert "--clam-patches DIR" in capsys.readouterr().err
    assert main(["import-features", str(h5s), "--out", str(out), "--encoder", "ucsb-708", "--clam-patches",
                 str(patches), "--no-progress", "-q"]) == 0
    store = out / "features" / f"{bags[0].slide_id}.h5"
    with h5py.File(store, "r") as f:
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
        np.testing.assert_array_equal(f["features"][:], bags[0].features)
        np.testing.assert_array_equal(f["coords"][:], _grid(len(bags[0].features)))
        a = dict(f.attrs)
    assert (a["encoder"], a["encoder_source"], a["imported_from"]) == ("ucsb-708", "named by the user", "clam")
    assert a["extent_level0_px"] == STEP and a["step_level0_px"] == STEP
    report = json.loads((out / "import_report.json").read_text())
    assert len(report["imported"]) == len(bags) and not report["failed"]
    # a second run keeps what is done
    assert main(["import-features", str(h5s), "--out", str(out), "--encoder", "ucsb-708", "--clam-patches",
                 str(patches), "--no-progress", "-q"]) == 0
    assert len(json.loads((out / "import_report.json").read_text())["kept"]) == len(bags)
    # trained on the imported stores and on the same bags imported natively: the same figures
    native = import_classic("ucsb_breast_cancer", shared("mil"), tmp_path / "native")
    runs = {}
    for name, manifest, feats in (("clam", _manifest(tmp_path / "m.csv", bags, out / "features"), out / "features"),
                                  ("native", native, tmp_path / "native" / "features")):
        assert main(["train-mil", str(manifest), "--features", str(feats), "--out", str(tmp_path / f"run_{name}"),
                     "--folds", "3", "--test-fraction", "0", "--epochs", "3", "--bootstrap", "20",
                     "--duplicates", "allow", "--no-progress", "-q"]) == 0
        runs[name] = json.loads((tmp_path / f"run_{name}" / "metrics.json").read_text())["pooled_validation"]
    assert runs["clam"]["auc"] == pytest.approx(runs["native"]["auc"], abs=1e-9) and runs["clam"]["n"] == len(bags)
    from sklearn.metrics import roc_auc_score

    val = [r for r in csv.DictReader(open(tmp_path / "run_clam" / "predictions.csv")) if r["split"] == "val"]
    # probabilities written in full: the AUC recomputed from the file is the report's, not one moved by rounding ties
    assert roc_auc_score([int(r["label"]) for r in val], [float(r["prob_1"]) for r in val]) == \
        pytest.approx(runs["clam"]["auc"], abs=1e-12)
    # predict reads them too, and the run's encoder is checked against the store's
    assert main(["predict", str(tmp_path / "run_clam"), str(out / "features"), "--out", str(tmp_path / "pred"),
                 "--no-progress", "-q"]) == 0
    assert main(["predict", str(tmp_path / "run_native"), str(out / "features"), "--out", str(tmp_path / "pred2"),
                 "--no-progress", "-q"]) == 1  # every store refused: another encoder
    assert "encoder mismatch" in json.loads((tmp_path / "pred2" / "predict_report.json").read_text())["failed"][0]["error"]


def test_a_patch_file_of_another_size_or_slide_fails_that_slide_alone(bags, tmp_path, capsys) -> None:
    h5s, patches = _clam(tmp_path / "clam", bags[:6])
    with h5py.File(patches / f"{bags[0].slide_id}.h5", "r+") as f:  # patches of 512 px on a 256 px grid
        f["coords"].attrs["patch_size"] = 512
    with h5py.File(patches / f"{bags[1].slide_id}.h5", "r+") as f:  # another slide's coordinates
        del f["coords"]
        c = f.create_dataset("coords", data=_grid(len(bags[1].features) + 3))
        c.attrs.update({"patch_size": STEP, "patch_level": 0, "downsample": [1.0, 1.0]})
    with h5py.File(h5s / f"{bags[2].slide_id}.h5", "r+") as f:  # a NaN feature row
        f["features"][0, 0] = np.nan
    code = main(["import-features", str(h5s), "--out", str(tmp_path / "out"), "--encoder", "ucsb-708",
                 "--clam-patches", str(patches), "--no-progress", "-q"])
    assert code == 1
    failed = {f["slide_id"]: f["error"] for f in json.loads((tmp_path / "out" / "import_report.json").read_text())["failed"]}
    assert set(failed) == {bags[0].slide_id, bags[1].slide_id, bags[2].slide_id}
    assert "lie on a 256 px grid, but the patches are 512 level-0 px" in failed[bags[0].slide_id]
    assert "are not those of the patch file" in failed[bags[1].slide_id]
    assert "not finite" in failed[bags[2].slide_id]
    assert len(list((tmp_path / "out" / "features").glob("*.h5"))) == 3


def test_trident_encoder_from_the_file_or_its_folder_and_a_contradiction_refused(bags, tmp_path, capsys) -> None:
    folder = _trident(tmp_path / "with", bags[:5], encoder="uni_v1")
    assert main(["import-features", str(folder), "--out", str(tmp_path / "a"), "--no-progress", "-q"]) == 0
    with h5py.File(tmp_path / "a" / "features" / f"{bags[0].slide_id}.h5", "r") as f:
        assert f["features"].dtype == np.float32 and f.attrs["encoder_source"] == "file attribute"
        assert f.attrs["extent_level0_px"] == 512 and f.attrs["source_target_magnification"] == 20
        np.testing.assert_allclose(f["features"][:], bags[0].features.astype(np.float16).astype(np.float32))
    older = _trident(tmp_path / "without", bags[:5], encoder=None)  # older TRIDENT: the encoder is the folder's name
    assert main(["import-features", str(older), "--out", str(tmp_path / "b"), "--no-progress", "-q"]) == 0
    with h5py.File(tmp_path / "b" / "features" / f"{bags[0].slide_id}.h5", "r") as f:
        assert (f.attrs["encoder"], f.attrs["encoder_source"]) == ("uni_v1", "folder name")
    assert main(["import-features", str(folder), "--out", str(tmp_path / "c"), "--encoder", "conch_v15",
                 "--no-progress", "-q"]) == 2
    assert "says the features were made by 'uni_v1', but --encoder says 'conch_v15'" in capsys.readouterr().err


def test_clam_features_of_a_real_slide_are_predicted_and_drawn_on_it(cmu_slide, tmp_path) -> None:
    """The real CMU slide tiled by wsi-mil for its coordinates; CLAM-layout files made from them by h5py
    (features with a planted signal, no attributes, int32 coords) for 10 slide ids that are all this
    slide; imported, trained, predicted, and the heatmap drawn on the slide at the imported patch size."""
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import TileConfig
    from wsi_mil.data.manifest import SlideEntry

    run_tile([SlideEntry("cmu", cmu_slide)], out_dir=tmp_path / "tiles", config=TileConfig(), workers=1, progress=False)
    with h5py.File(tmp_path / "tiles" / "patches" / "cmu.h5", "r") as f:
        coords = f["coords"][:]
        size = float(f.attrs["extent_level0_px"])
    h5s = tmp_path / "h5_files"
    h5s.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        x = rng.normal(size=(len(coords), 32)).astype(np.float32)
        if i % 2:
            x[: len(x) // 4, :4] += 2.0  # the "lesion": a quarter of the patches
        with h5py.File(h5s / f"cmu{i}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=coords.astype(np.int32))
        rows.append([f"cmu{i}", str(cmu_slide), f"p{i}", i % 2])
    assert main(["import-features", str(h5s), "--out", str(tmp_path / "imp"), "--encoder", "toy-32",
                 "--patch-size-level0", str(size), "--mpp", "0.5", "--no-progress", "-q"]) == 0
    m = tmp_path / "m.csv"
    with open(m, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "path", "patient_id", "label"], *rows])
    assert main(["train-mil", str(m), "--features", str(tmp_path / "imp" / "features"), "--out", str(tmp_path / "run"),
                 "--folds", "2", "--test-fraction", "0", "--epochs", "2", "--bootstrap", "10", "--duplicates", "allow",
                 "--no-progress", "-q"]) == 0
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "imp" / "features" / "cmu1.h5"), "--out",
                 str(tmp_path / "pred"), "--no-progress", "-q"]) == 0
    assert main(["heatmap", str(tmp_path / "pred"), "--out", str(tmp_path / "hm"), "--no-progress", "-q"]) == 1
    assert main(["heatmap", str(tmp_path / "pred"), "--slides", str(m), "--out", str(tmp_path / "hm"),
                 "--formats", "png", "geojson", "--no-progress", "-q"]) == 0
    drawn = json.loads((tmp_path / "hm" / "cmu1" / "heatmap.json").read_text())
    assert (tmp_path / "hm" / "cmu1" / "overlay.png").stat().st_size > 1000
    features = json.loads((tmp_path / "hm" / "cmu1" / "patches.geojson").read_text())["features"]
    xs = sorted({round(pt[0]) for f in features for pt in f["geometry"]["coordinates"][0]})
    assert min(np.diff(xs)) >= size - 1  # squares of the imported patch size, on the slide's own grid
    top = drawn["top_patches"][0]
    assert [top["x"], top["y"]] in coords.tolist()  # the slide's own patch positions


def test_fixes_from_a_strangers_trial_of_the_import(bags, tmp_path, capsys) -> None:
    """Refused before any store is written: mixed encoders, a file without an encoder among named ones,
    features of two widths, a file whose recorded encoder --encoder or its folder contradicts; per file: a
    patch file with the y column reversed, coordinates that are not whole pixels, a file of 0 rows; a
    re-run with another --mpp imports again; an encoder recorded as a one-element array is read as text."""
    def trident(folder: Path, name: str, b, encoder, dim: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / f"{name}.h5", "w") as f:
            x = b.features[:, :dim] if dim else b.features
            d = f.create_dataset("features", data=x.astype(np.float32))
            if encoder is not None:
                d.attrs["encoder"] = encoder
            c = f.create_dataset("coords", data=_grid(len(x)))
            c.attrs.update({"patch_size": 256, "patch_size_level0": STEP, "overlap": 0})

    def refused(folder: Path, text: str, *extra: str) -> None:
        out = tmp_path / f"out_{folder.name}"
        assert main(["import-features", str(folder), "--out", str(out), *extra, "--no-progress", "-q"]) == 2
        assert text in capsys.readouterr().err
        assert not list(out.glob("features/*.h5"))  # nothing written

    mixed = tmp_path / "mixed"
    trident(mixed, "a", bags[0], "uni_v1")
    trident(mixed, "b", bags[1], "conch_v15")
    refused(mixed, "made by different encoders (conch_v15, uni_v1)")
    noname = tmp_path / "noname"
    trident(noname, "a", bags[0], "uni_v1")
    trident(noname, "b", bags[1], None)
    refused(noname, "does not say which encoder made its features")
    widths = tmp_path / "widths"
    trident(widths, "a", bags[0], "uni_v1")
    trident(widths, "b", bags[1], "uni_v1")
    trident(widths, "c", bags[2], "uni_v1", dim=32)
    refused(widths, "features of different widths (32, 708: c.h5)")
    contra = tmp_path / "features_uni_v1"
    trident(contra, "a", bags[0], "conch_v15")
    refused(contra, "the file says its features were made by 'conch_v15', its folder 'features_uni_v1' says 'uni_v1'")
    named = tmp_path / "named"
    trident(named, "a", bags[0], "conch_v15")
    refused(named, "its file attribute says the features were made by 'conch_v15', but --encoder says 'uni_v1'",
            "--encoder", "uni_v1")
    # per file
    h5s, patches = _clam(tmp_path / "clam", bags[:5])
    with h5py.File(patches / f"{bags[0].slide_id}.h5", "r+") as f:  # two rows' y swapped: each column holds the
        c = f["coords"][:]                                            # same values, the patches are others
        c[0, 1], c[-1, 1] = c[-1, 1], c[0, 1]
        f["coords"][...] = c
    with h5py.File(h5s / f"{bags[1].slide_id}.h5", "r+") as f:
        c = f["coords"][:].astype(np.float64) + 0.5
        del f["coords"]
        f.create_dataset("coords", data=c)
    with h5py.File(h5s / f"{bags[2].slide_id}.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((0, 708), np.float32))
        f.create_dataset("coords", data=np.zeros((0, 2), np.int32))
    with h5py.File(h5s / f"{bags[3].slide_id}.h5", "r+") as f:
        f["features"].attrs["encoder"] = np.array([b"ucsb-708"])
    out = tmp_path / "per_file"
    args = ["import-features", str(h5s), "--out", str(out), "--clam-patches", str(patches), "--encoder", "ucsb-708",
            "--mpp", "0.5", "--no-progress", "-q"]
    assert main(args) == 1
    failed = {f["slide_id"]: f["error"] for f in json.loads((out / "import_report.json").read_text())["failed"]}
    assert "are not those of the patch file" in failed[bags[0].slide_id]
    assert "not whole pixels" in failed[bags[1].slide_id]
    assert "holds no patches (0 rows)" in failed[bags[2].slide_id]
    assert set(failed) == {bags[0].slide_id, bags[1].slide_id, bags[2].slide_id}
    with h5py.File(out / "features" / f"{bags[3].slide_id}.h5", "r") as f:
        assert f.attrs["encoder"] == "ucsb-708" and f.attrs["encoder_source"] == "file attribute"
    assert main([*args[:-4], "--mpp", "0.25", "--no-progress", "-q"]) == 1  # other settings: imported again
    report = json.loads((out / "import_report.json").read_text())
    assert not report["kept"] and len(report["imported"]) == 2
    with h5py.File(out / "features" / f"{bags[4].slide_id}.h5", "r") as f:
        assert f.attrs["effective_mpp"] == 0.25
