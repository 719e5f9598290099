from __future__ import annotations

import csv
import json

import numpy as np
import openslide

from wsi_mil.synth.slide import read_truth_mask


def test_generated_slide_is_an_openslide_pyramid(big_slide) -> None:
    s = openslide.OpenSlide(str(big_slide))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.dimensions == (12288, 9216) and s.level_count == 3
    assert s.level_downsamples == (1.0, 4.0, 16.0)
    assert float(s.properties["openslide.mpp-x"]) == 0.5
    assert s.associated_images == {} or "label" not in s.associated_images


def test_tumour_ground_truth_marks_the_planted_texture(big_slide) -> None:
    mask, ds = read_truth_mask(big_slide)
    meta = json.loads(big_slide.with_suffix(".json").read_text())
    assert meta["label"] == 1 and mask.any() and ds == 32
    s = openslide.OpenSlide(str(big_slide))
    ys, xs = np.nonzero(mask)
    i = len(ys) // 2
    inside = np.asarray(s.read_region((int(xs[i] * ds), int(ys[i] * ds)), 0, (64, 64)).convert("RGB"), float)
    assert inside.std() > 10  # tissue, not glass, where the mask says tumour


def test_cohort_labels_and_manifest(cohort) -> None:
    rows = list(csv.DictReader(open(cohort)))
    assert len(rows) == 4 and sum(int(r["label"]) for r in rows) == 2
    assert len({r["patient_id"] for r in rows}) == 4
    for r in rows:
        truth = json.loads((cohort.parent / r["path"]).with_suffix(".json").read_text())
        assert truth["label"] == int(r["label"]) and (truth["tumour_area_mm2"] > 0) == bool(truth["label"])


def test_same_spec_same_bytes(tmp_path, textures) -> None:
    from wsi_mil.synth.slide import SlideSpec, write_slide

    paths = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        paths.append(tmp_path / f"{name}.tiff")
        write_slide(paths[-1], SlideSpec(2048, 2048, seed=seed, tumour_regions=1), normal=textures[0], tumour=textures[1])
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] and data[0] != data[2]
