"""Shared fixtures: real data from ../shared/data and small slides generated from real tissue."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_MIL_SHARED_DATA", ROOT.parent / "shared" / "data"))
WSI_MIL = [sys.executable, "-m", "wsi_mil.cli"]


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data {path} not found (set WSI_MIL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """Real Aperio SVS, 2220x2967, 0.499 µm/px, with label and macro images."""
    return shared("wsi", "cmu-1-small-region.svs")


@pytest.fixture(scope="session")
def kidney_slide() -> Path:
    """Real plain TIFF without mpp, almost no tissue."""
    return shared("wsi", "kidney-48-5.tif")


@pytest.fixture(scope="session")
def truncated_slide(tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path) -> Path:
    """The CMU slide cut in half (a neutral name: a test must not pass on its file name)."""
    data = cmu_slide.read_bytes()
    path = tmp_path_factory.mktemp("inputs") / "slide-0042.svs"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def textures():
    from wsi_mil.synth.textures import load_texture

    normal = load_texture(shared("wsi", "cmu-1-small-region.svs"))
    tumour = load_texture(shared("tiles", "tcga", "TCGA-HE-7130-01Z-00-DX1.png"), mpp=0.5, crop_to_tissue=False)
    return normal, tumour


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory, textures) -> Path:
    """Four 4096x3072 pyramidal slides (2 levels) of real tissue, two with tumour; returns the manifest."""
    from wsi_mil.synth.cohort import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(out, n_slides=4, preset="easy", positive_fraction=0.5, size_px=(4096, 3072), seed=3, textures=textures)


@pytest.fixture(scope="session")
def big_slide(tmp_path_factory: pytest.TempPathFactory, textures) -> Path:
    """A 3-level 12288x9216 slide with one tumour region."""
    from wsi_mil.synth.slide import SlideSpec, write_slide

    path = tmp_path_factory.mktemp("big") / "big.tiff"
    write_slide(path, SlideSpec(12288, 9216, seed=11, tumour_regions=1, tumour_size_um=(800, 1000)),
                normal=textures[0], tumour=textures[1])
    return path


@pytest.fixture(scope="session")
def elephant_predictions():
    """Real out-of-fold predictions: (labels, probabilities) of the 200 Elephant bags from a
    logistic regression on bag-mean features, 5-fold cross-validated."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    with np.load(shared("mil") / "elephant.npz") as z:
        x, bag, labels = z["X"], z["bag_id"], dict(zip(z["bag_ids"], z["bag_label"], strict=True))
    ids = np.unique(bag)
    means = np.stack([x[bag == b].mean(axis=0) for b in ids])
    y = np.asarray([int(labels[b]) for b in ids])
    p = cross_val_predict(LogisticRegression(C=0.05, max_iter=3000), means, y, cv=5, method="predict_proba")[:, 1]
    return y, p
