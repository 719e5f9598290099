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


def _slide_stats(path) -> tuple[int, int, float, np.ndarray]:
    """(repeated tissue patches, tissue patches, CIELAB distance between the mean colours of
    tumour and normal tissue, mean normal colour) of a generated slide's level 0."""
    import hashlib

    from wsi_mil.synth.mosaic import _rgb_to_lab, tissue_pixels

    s = openslide.OpenSlide(str(path))
    w, h = s.dimensions
    img = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    seen: set[str] = set()
    repeated = total = 0
    for y in range(0, h - 255, 256):
        for x in range(0, w - 255, 256):
            patch = img[y:y + 256, x:x + 256]
            if tissue_pixels(patch[::4, ::4]).mean() < 0.5:
                continue
            digest = hashlib.md5(patch.tobytes()).hexdigest()
            repeated += digest in seen
            total += 1
            seen.add(digest)
    mask, ds = read_truth_mask(path)
    tumour = np.kron(mask, np.ones((int(ds), int(ds)), bool))[:h, :w][::2, ::2]
    small = img[::2, ::2]
    tissue, lab = tissue_pixels(small), _rgb_to_lab(small)
    normal = lab[tissue & ~tumour].mean(axis=0)
    return repeated, total, float(np.linalg.norm(lab[tissue & tumour].mean(axis=0) - normal)), normal


def test_hard_preset_mixes_sources_without_repeats_and_hides_the_tumour_colour(tmp_path, textures) -> None:
    """The hard cohort: several real sources per slide, no repeated patch, stain varying
    between slides, and tumour whose mean colour is the slide's own (the easy style's tumour
    stands out by colour alone, which is what made it a novelty-detection task)."""
    from wsi_mil.synth.cohort import make_cohort
    from wsi_mil.synth.slide import SlideSpec, write_slide

    manifest = make_cohort(tmp_path / "hard", n_slides=3, preset="hard", positive_fraction=1.0, size_px=3072, seed=0,
                           tumour_size_um=(400.0, 600.0))
    rows = list(csv.DictReader(open(manifest)))
    stats, sources = [], set()
    for r in rows:
        meta = json.loads((manifest.parent / r["path"]).with_suffix(".json").read_text())
        assert meta["spec"]["style"] == "hard" and meta["label"] == 1
        assert len(meta["sources"]["normal_sources"]) >= 2 and meta["sources"]["tumour_source"]
        sources.update(meta["sources"]["normal_sources"])
        stats.append(_slide_stats(manifest.parent / r["path"]))
    assert len(sources) >= 3
    for repeated, total, colour_gap, _ in stats:
        assert total >= 20 and repeated == 0
        assert colour_gap < 6.0, stats  # measured 1.1-5.0 (CIELAB ΔE of the means)
    assert np.std([s[3] for s in stats], axis=0).max() > 3.0  # the stain differs between slides
    # the same measure on the easy style: its tumour stands out (measured ΔE 12.7-17.1)
    easy = tmp_path / "easy.tiff"
    write_slide(easy, SlideSpec(3072, 3072, seed=0, tissue_cover=0.6, tumour_regions=2, tumour_size_um=(400, 600)),
                normal=textures[0], tumour=textures[1])
    assert _slide_stats(easy)[2] > 10.0


def test_hard_slide_levels_agree(tmp_path) -> None:
    from wsi_mil.synth.slide import SlideSpec, write_slide

    path = tmp_path / "h.tiff"
    write_slide(path, SlideSpec(8192, 4096, seed=2, style="hard", tumour_regions=1, tumour_size_um=(500, 600)))
    s = openslide.OpenSlide(str(path))
    assert s.level_count == 2 and s.level_downsamples[1] == 4.0
    lvl0 = np.asarray(s.read_region((2048, 1024), 0, (2048, 2048)).convert("RGB"), np.float32)
    lvl1 = np.asarray(s.read_region((2048, 1024), 1, (512, 512)).convert("RGB"), np.float32)
    down = lvl0.reshape(512, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(down - lvl1).mean() < 12, np.abs(down - lvl1).mean()
    import pytest

    with pytest.raises(ValueError, match="choose 'easy' or 'hard'"):
        write_slide(tmp_path / "x.tiff", SlideSpec(1024, 1024, style="medium"))


def test_synth_refuses_bad_options_before_making_the_folder(tmp_path) -> None:
    import subprocess

    from tests.conftest import WSI_MIL

    for bad, says in ((["--tumour-size-um", "nan", "300"], "--tumour-size-um must be MIN MAX"),
                      (["--tumour-size-um", "400", "100"], "0 < MIN <= MAX"),
                      (["--positive-fraction", "2"], "--positive-fraction must be in [0, 1]"),
                      (["--mpp", "nan"], "--mpp must be a positive number"),
                      (["--size", "10"], "--size must be at least 256 px")):
        out = tmp_path / "never"
        res = subprocess.run(WSI_MIL + ["synth", "--out", str(out), "--n-slides", "1", *bad], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
        assert not out.exists()


def test_synth_rerun_says_up_to_date_and_tqdm_disable_hides_the_bar(tmp_path) -> None:
    """A re-run said "written" though nothing was; TQDM_DISABLE=1 (the variable tqdm documents) was ignored
    because every bar passes disable= itself."""
    import os
    import subprocess

    from tests.conftest import WSI_MIL

    out = tmp_path / "c"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    runs = [subprocess.run(WSI_MIL + ["synth", "--out", str(out), "--n-slides", "2", "--size", "256"],
                           capture_output=True, text=True, timeout=300, env=env) for _ in range(2)]
    for res in runs:
        assert res.returncode == 0, res.stderr[-1500:]
        assert "generating slides" not in res.stderr and "slide/s" not in res.stderr and "written" not in res.stdout
    assert "2 slide(s) generated, 0 already up to date" in runs[0].stderr
    assert "0 slide(s) generated, 2 already up to date" in runs[1].stderr


def test_multicentre_presets_give_each_centre_its_stain_scanner_and_sources(tmp_path) -> None:
    """Four centres, each with its own stain, scanner resolution (its slides keep their physical size:
    twice the pixels at 0.25 µm/px, which OpenSlide reads from the file) and normal sources; the
    confounded preset puts 70 % of the positives and 10 % of the negatives in centre-B."""
    from wsi_mil.synth.cohort import CENTRES, make_cohort
    from wsi_mil.synth.mosaic import NORMAL_SOURCES

    source_name = {i: s.split("/")[-1].rsplit(".", 1)[0] for i, (s, _) in enumerate(NORMAL_SOURCES)}
    manifest = make_cohort(tmp_path / "mc", n_slides=20, preset="multicentre-confounded", size_px=768, seed=3)
    rows = list(csv.DictReader(open(manifest)))
    pos = [r for r in rows if r["label"] == "1"]
    neg = [r for r in rows if r["label"] == "0"]
    assert sum(r["site"] == "centre-B" for r in pos) == 7 and sum(r["site"] == "centre-B" for r in neg) == 1
    for r in rows:
        centre = CENTRES[r["site"]]
        meta = json.loads((manifest.parent / r["path"]).with_suffix(".json").read_text())
        assert set(meta["sources"]["normal_sources"]) <= {source_name[i] for i in centre["sources"]}
        assert tuple(meta["spec"]["stain_gain"]) == tuple(centre["stain_gain"])
        with openslide.OpenSlide(str(manifest.parent / r["path"])) as s:
            mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
            assert abs(mpp - 0.5 * centre["mpp_factor"]) < 1e-6 and float(r["scanner_mpp"]) == mpp
            assert s.dimensions[0] == round(768 / centre["mpp_factor"])
    even = list(csv.DictReader(open(make_cohort(tmp_path / "even", n_slides=16, preset="multicentre", size_px=768,
                                                seed=4))))
    for c in CENTRES:  # no confound: each centre holds 2 of the 8 slides of each class
        assert [sum(r["site"] == c and r["label"] == lab for r in even) for lab in ("0", "1")] == [2, 2]
