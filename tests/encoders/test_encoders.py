"""The encoder registry, the offline EfficientNet-Lite0 mapping, and weights-only loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_mil.encoders import available, build_encoder
from wsi_mil.encoders.base import Preprocess, state_dict_sha256
from wsi_mil.encoders.foundation import RECIPES
from wsi_mil.encoders.registry import imagenet_classifier_lite0
from wsi_mil.errors import ConfigError

# Every registered encoder that builds offline without a weights file, plus a timm model by name (random
# weights: only the contract is tested). The foundation encoders need their authors' weights: their recipes
# are tested at reduced depth against a direct forward (test_foundation.py); resnet50_trunc is
# resnet50.tv_in1k@layer3, whose cut is tested in test_truncated.py.
ENCODERS = [(name, {}) for name in available()
            if not name.startswith("timm:") and name not in RECIPES and name != "resnet50_trunc"] + [
    ("timm:resnet18", {"allow_random_init": True})]


@pytest.fixture(scope="module", params=ENCODERS, ids=[n for n, _ in ENCODERS])
def encoder(request):
    name, kw = request.param
    return build_encoder(name, **kw)


def _real_patches(n: int, size: int) -> torch.Tensor:
    """``n`` real H&E patches from the bundled sample, as a uint8 (n, 3, size, size) batch."""
    from wsi_mil.synth.textures import default_textures

    tex = default_textures()[0].rgb
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, tex.shape[0] - size), rng.integers(0, tex.shape[1] - size)
        out.append(tex[y:y + size, x:x + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def test_contract_dim_and_determinism(encoder) -> None:
    s = encoder.preprocess.input_size
    x = _real_patches(4, s)
    f1, f2 = encoder(x), encoder(x)
    assert f1.shape == (4, encoder.dim) and f1.dtype == torch.float32
    assert torch.isfinite(f1).all()
    assert torch.equal(f1, f2)
    assert not torch.allclose(f1[0], f1[1])  # different patches, different features
    d = encoder.describe()
    assert d["dim"] == encoder.dim and d["preprocess"]["input_size"] == s and len(d["weights_sha256"]) == 64


def test_a_patch_features_do_not_depend_on_its_batch(encoder) -> None:
    # Resumed runs cut slides into the same batches, but features must not depend on batch-mates anyway.
    x = _real_patches(6, encoder.preprocess.input_size)
    together = encoder(x)
    alone = torch.cat([encoder(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_channels_last_gives_the_same_features(encoder) -> None:
    x = _real_patches(3, encoder.preprocess.input_size)
    ref = encoder(x)
    encoder.to("cpu", channels_last=True)
    try:
        cl = encoder(x.contiguous(memory_format=torch.channels_last))
    finally:
        encoder.model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(cl, ref, rtol=1e-3, atol=1e-3)


def test_preprocess_resizes_patches_to_the_input_size(encoder) -> None:
    s = encoder.preprocess.input_size
    rgb = _real_patches(1, 256)[0].permute(1, 2, 0).numpy()
    out = encoder.preprocess.resize_uint8(rgb)
    assert out.shape == (s, s, 3) and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(rgb.mean())) < 3  # a resize, not a crop of background or a recolour


@pytest.mark.parametrize(("image", "classes"), [("chelsea", range(281, 286)), ("coffee", [967])])
def test_offline_lite0_weights_classify_imagenet_images(image: str, classes) -> None:
    import skimage.data

    enc = build_encoder("efficientnet_lite0")
    full = imagenet_classifier_lite0()
    rgb = getattr(skimage.data, image)()
    x = torch.from_numpy(np.array(enc.preprocess.resize_uint8(rgb))).permute(2, 0, 1)[None]
    with torch.inference_mode():
        probs = full(enc.normalise(x)).softmax(-1)[0]
        feats = enc(x)
    top = int(probs.argmax())
    assert top in classes, f"{image}: top class {top} ({float(probs[top]):.2f})"
    assert float(probs[list(classes)].sum()) > 0.5
    # the headless feature extractor is the same network up to the classifier
    torch.testing.assert_close(full.forward_head(full.forward_features(enc.normalise(x)), pre_logits=True), feats)


def test_weights_from_safetensors_and_pth_load_identically(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False)  # with its fc head: ignored, not an error
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    a = build_encoder("resnet18", weights=tmp_path / "w.safetensors")
    b = build_encoder("timm:resnet18", weights=tmp_path / "w.pth")
    assert a.weights_sha256 == b.weights_sha256 == state_dict_sha256({k: v for k, v in state.items() if not k.startswith("fc.")})
    x = _real_patches(2, a.preprocess.input_size)
    torch.testing.assert_close(a(x), b(x))


def test_weights_that_do_not_fit_are_refused_with_the_keys(tmp_path) -> None:
    import timm

    state = timm.create_model("resnet18", pretrained=False).state_dict()
    del state["layer1.0.conv1.weight"]
    state["layer9.bogus"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"1 missing key\(s\): layer1.0.conv1.weight.*1 unexpected key\(s\): layer9.bogus"):
        build_encoder("resnet18", weights=tmp_path / "partial.pth")
    wrong = timm.create_model("resnet18", pretrained=False).state_dict()
    wrong["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match=r"1 shape mismatch\(es\): conv1.weight: file \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        build_encoder("resnet18", weights=tmp_path / "wrong.pth")


def test_pickled_code_is_not_loaded(tmp_path) -> None:
    import timm

    torch.save(timm.create_model("resnet18", pretrained=False), tmp_path / "model.pth")  # a whole pickled module
    with pytest.raises(ConfigError, match="not a weights-only checkpoint"):
        build_encoder("resnet18", weights=tmp_path / "model.pth")


def test_no_silent_random_init(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on the offline machines: the hub cannot be reached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ConfigError, match="--weights FILE"):
        build_encoder("resnet18")
    enc = build_encoder("resnet18", allow_random_init=True)
    assert enc.weights == "random-init" and enc.describe()["weights"] == "random-init"


def test_unknown_encoder_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="not a registered encoder"):
        build_encoder("no_such_net_v9")


def test_reader_strips_equal_patch_by_patch_reads_on_a_real_slide(cmu_slide, tmp_path) -> None:
    """Adjacent patches read as one strip (and stored JPEGs read as one range) give the
    same pixels as reading every patch alone; the batch resize matches Pillow's."""
    import openslide
    from PIL import Image

    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import TileConfig
    from wsi_mil.data.manifest import resolve_inputs
    from wsi_mil.encoders.loader import SlideJob, _runs, read_batch
    from wsi_mil.io.store import PatchStore
    from wsi_mil.tiling.grid import PatchGeometry
    from wsi_mil.tiling.patches import decode_jpeg, read_patch

    run_tile(resolve_inputs([cmu_slide]), out_dir=tmp_path, config=TileConfig(save_patches=True), workers=1, progress=False)
    with PatchStore(tmp_path / "patches" / "cmu-1-small-region.h5") as ps:
        coords = ps.coords
        geometry = PatchGeometry.from_store_attrs(ps.attrs)
        jpegs = [ps.patch_jpeg(i) for i in range(len(ps))]
        assert ps.patch_jpegs(3, 11) == jpegs[3:11]
    job = SlideJob("cmu", "slide", str(cmu_slide), str(tmp_path / "patches" / "cmu-1-small-region.h5"), geometry, coords)
    runs = _runs(job, 0, len(coords))
    assert max(b - a for a, b in runs) > 1 and sum(b - a for a, b in runs) == len(coords)
    pre = Preprocess(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    n = min(len(coords), 40)
    got = read_batch(job, 0, n, pre)
    slide = openslide.open_slide(str(cmu_slide))
    want = np.stack([pre.resize_uint8(read_patch(slide, x_px=int(x), y_px=int(y), geometry=geometry)) for x, y in coords[:n]])
    np.testing.assert_array_equal(got["images"].permute(0, 2, 3, 1).numpy(), want)
    assert got["images"].is_contiguous(memory_format=torch.channels_last)
    pil = np.stack([np.asarray(Image.fromarray(decode_jpeg(j)).resize((224, 224), Image.Resampling.BILINEAR)) for j in jpegs[:n]])
    stored = read_batch(SlideJob("cmu", "store", None, job.store_path, geometry, coords), 0, n, pre)["images"]
    assert np.abs(stored.permute(0, 2, 3, 1).numpy().astype(int) - pil).max() <= 1
