"""Truncated timm encoders (``model@stage``): CLAM-style ResNet-50 cut after layer3."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.encoders.registry import build_encoder
from wsi_mil.errors import ConfigError


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A whole ResNet-50's weights in a file, as a user brings them offline (random values:
    what is tested is where the network is cut, not what it learned)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet50", num_classes=0).state_dict().items()}
    path = tmp_path_factory.mktemp("w") / "resnet50.safetensors"
    save_file(state, str(path))
    return str(path), state


def test_layer3_features_equal_timms_own_intermediate_output_pooled(resnet50_weights) -> None:
    import timm

    path, state = resnet50_weights
    enc = build_encoder("resnet50.tv_in1k@layer3", weights=path)
    assert enc.name == "timm:resnet50.tv_in1k@layer3" and enc.dim == 1024
    ref = timm.create_model("resnet50", features_only=True, out_indices=(3,))
    missing, _ = ref.load_state_dict(state, strict=False)
    assert not missing
    ref.eval()
    patches = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(enc.normalise(patches))[-1].mean(dim=(-2, -1))
        got = enc(patches)
    assert got.shape == (3, 1024)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the same stage by index, and the cut is in the provenance and the fingerprint
    by_index = build_encoder("resnet50.tv_in1k@3", weights=path)
    assert by_index.name == enc.name and by_index.fingerprint() == enc.fingerprint()
    whole = build_encoder("resnet50.tv_in1k", weights=path)
    assert whole.dim == 2048 and whole.fingerprint() != enc.fingerprint()
    assert enc.describe()["encoder"].endswith("@layer3") and enc.describe()["weights"] == whole.describe()["weights"]


def test_an_unknown_stage_lists_the_stages() -> None:
    with pytest.raises(ConfigError, match=r"stages are 0: act1, 1: layer1, 2: layer2, 3: layer3, 4: layer4"):
        build_encoder("resnet50@layer9", allow_random_init=True)
