"""The audit gallery shows each slide as a thumbnail of its tissue (before: a 1 x 1 average,
drawn as a flat square, because the thumbnail was asked for at 10^6 µm per pixel), and
captions keep a long patient id readable (before: "pt patient-")."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from wsi_mil.cli import main
from wsi_mil.eval.audit_run import _fit, sample_picture


def test_a_slides_gallery_picture_is_a_thumbnail_of_its_tissue(tmp_path: Path, cmu_slide: Path) -> None:
    assert main(["tile", str(cmu_slide), "--out", str(tmp_path / "tiles"), "--no-progress", "-q"]) == 0
    store = next((tmp_path / "tiles" / "patches").glob("*.h5"))
    bag = SimpleNamespace(slide_id="cmu", store=tmp_path / "features" / "cmu.h5", meta={"source_store": str(store)})
    pic = sample_picture(bag)
    assert pic is not None
    assert max(pic.shape[:2]) >= 200 and min(pic.shape[:2]) >= 50  # the slide, not a pixel
    assert float(np.asarray(pic, np.float32).std()) > 10  # tissue and glass, not a flat square


def test_captions_keep_both_ends_of_long_ids() -> None:
    assert _fit("pt patient-0042") == "pt patient-0042"
    long = _fit("pt patient-2024-0000123")
    assert len(long) <= 21 and long.startswith("pt patie") and long.endswith("0000123")
