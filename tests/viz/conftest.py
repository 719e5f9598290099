"""Attention stores over real slides, written the way train-mil writes them: the real
CMU slide (which carries a label and a macro image) and a generated slide whose planted
tumour is known, with attention that follows the tumour."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.io.attention import write_attention

EXTENT = 256


def grid_over(width: int, height: int, step: int, offset: tuple[int, int] = (37, 53)) -> np.ndarray:
    xs = np.arange(offset[0], width - EXTENT, step)
    ys = np.arange(offset[1], height - EXTENT, step)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


@pytest.fixture(scope="session")
def attention_run(tmp_path_factory, cmu_slide, textures):
    """(attention folder, manifest, {slide_id: (coords, attention, slide path)})."""
    import openslide

    from wsi_mil.eval.localisation import patch_tumour_share
    from wsi_mil.synth.slide import SlideSpec, read_truth_mask, write_slide

    root = tmp_path_factory.mktemp("attn")
    synth = root / "slides" / "tumour-slide.tiff"
    synth.parent.mkdir()
    write_slide(synth, SlideSpec(4096, 3072, seed=5, tissue_cover=0.6, tumour_regions=1, tumour_size_um=(600, 700)),
                normal=textures[0], tumour=textures[1])
    rng = np.random.default_rng(0)
    made = {}
    for sid, path in (("cmu-1", cmu_slide), ("tumour-slide", synth)):
        with openslide.OpenSlide(str(path)) as s:
            w, h = s.dimensions
            thumb = np.asarray(s.get_thumbnail((w // 16, h // 16)).convert("L"), float)
        coords = grid_over(w, h, EXTENT)
        # patches on tissue only, as the tiler would keep them
        cy = np.clip((coords[:, 1] + EXTENT // 2) * thumb.shape[0] // h, 0, thumb.shape[0] - 1)
        cx = np.clip((coords[:, 0] + EXTENT // 2) * thumb.shape[1] // w, 0, thumb.shape[1] - 1)
        coords = coords[thumb[cy, cx] < 225]
        if sid == "tumour-slide":
            mask, ds = read_truth_mask(path)
            share = patch_tumour_share(coords, EXTENT, mask, ds)
            logits = 4.0 * share + rng.normal(0, 0.3, len(coords))
        else:
            logits = rng.normal(0, 1, len(coords))
        att = np.exp(logits - logits.max())
        att = (att / att.sum()).astype(np.float32)
        write_attention(root / "attention" / f"{sid}.h5", coords=coords, attention=att, attrs={
            "slide_id": sid, "fold": "ensemble", "split": "test", "model": "abmil", "outputs": ["tumour"],
            "probability": [0.91 if sid == "tumour-slide" else 0.12], "prediction": "tumour" if sid == "tumour-slide" else "normal",
            "feature_store": str(root / "missing.h5"), "patch_extent_level0_px": EXTENT,
            "attention_kind": "normalised attention (sums to 1)"})
        made[sid] = (coords, att, path)
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["slide_id", "path", "patient_id", "label"])
        wr.writerow(["cmu-1", str(cmu_slide), "p1", "0"])
        wr.writerow(["tumour-slide", str(synth), "p2", "1"])
    return root / "attention", manifest, made


def source_identity_strings(slide_path: Path) -> list[str]:
    """Values of the slide's own metadata that could identify it (Aperio description,
    file name, scan date, user...), long enough not to occur by chance."""
    import openslide

    with openslide.OpenSlide(str(slide_path)) as s:
        props = dict(s.properties)
    keep = [v for k, v in props.items() if not k.startswith("openslide.") and len(v) >= 6
            and not v.replace(".", "").replace("-", "").isdigit()]
    return keep
