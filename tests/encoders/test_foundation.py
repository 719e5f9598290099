"""Foundation encoders by name (wsi_mil/encoders/foundation.py): each recipe's architecture, loaded from a
checkpoint written in the authors' key layout (timm's) through --weights (a file, or a Hugging Face cache
folder, offline), gives value for value what a direct timm forward with the recipe's preprocessing and
pooling gives; a checkpoint of another architecture is refused naming the mismatch. Built at a reduced depth
(the same keys and shapes per block) to stay quick on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_mil.encoders.foundation import RECIPES, build_architecture, build_named, recipe_table
from wsi_mil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _hf_cache(tmp_path: Path, name: str, net: torch.nn.Module) -> Path:
    """A Hugging Face cache folder (models--org--name/snapshots/<rev>/<file>) holding ``net``'s weights."""
    recipe = RECIPES[name]
    folder = tmp_path / f"models--org--{name}" / "snapshots" / "0123abc"
    folder.mkdir(parents=True)
    file = recipe.files[0]
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / file))
    else:
        torch.save(net.state_dict(), folder / file)
    return tmp_path / f"models--org--{name}"


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_loads_its_published_layout_and_embeds_as_its_authors_do(tmp_path, name) -> None:
    torch.manual_seed(0)
    recipe = RECIPES[name]
    net = build_architecture(recipe, for_tests=True).eval()
    encoder = build_named(name, weights=_hf_cache(tmp_path, name, net), for_tests=True)
    assert encoder.dim == recipe.dim and encoder.weights.endswith(recipe.files[0])
    patches = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 256, 256), dtype=np.uint8))
    with torch.no_grad():
        ours = encoder.forward_normalised(encoder.normalise(encoder.preprocess.resize_batch(patches)))
        # the recipe by hand: resize (and crop), /255, mean / std, the network, the pooling
        size = recipe.resize_to or recipe.input_size
        x = torch.nn.functional.interpolate(patches, size=(size, size), mode=recipe.interpolation, antialias=True)
        top = (size - recipe.input_size) // 2
        x = x[..., top:top + recipe.input_size, top:top + recipe.input_size].float() / 255.0
        x = (x - torch.tensor(recipe.mean).view(1, 3, 1, 1)) / torch.tensor(recipe.std).view(1, 3, 1, 1)
        out = net(x)
        if recipe.embedding == "cls+mean":
            prefix = 1 + int(recipe.kwargs.get("reg_tokens", 0))
            out = torch.cat([out[:, 0], out[:, prefix:].mean(dim=1)], dim=-1)
    assert ours.shape == (2, recipe.dim)
    torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_mismatch(tmp_path) -> None:
    uni = build_architecture(RECIPES["uni"], for_tests=True)
    torch.save(uni.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"(?s)for Virchow .*do not fit the model: .*shape mismatch.*cls_token: file "
                                          r"\(1, 1, 1024\) vs model \(1, 1, 1280\)"):
        build_named("virchow", weights=tmp_path / "pytorch_model.bin", for_tests=True)


def test_no_weights_no_network_and_a_folder_without_the_file_says_what_it_looked_for(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"needs its weights: .*--weights"):
        build_named("uni", for_tests=True)
    with pytest.raises(ConfigError, match=r"no pytorch_model.bin in this folder"):
        build_named("uni", weights=tmp_path, for_tests=True)


def test_the_docs_table_is_the_recipes() -> None:
    assert (ROOT / "docs" / "encoders.md").read_text() == recipe_table(), (
        "regenerate: python -c \"from wsi_mil.encoders.foundation import recipe_table; "
        "open('docs/encoders.md','w').write(recipe_table())\"")


def test_resize_then_crop_is_a_resize_and_torchvisions_centre_crop() -> None:
    import torchvision.transforms.functional as TF

    from wsi_mil.encoders.base import Preprocess

    p = Preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 256)
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 3, 300, 300), dtype=np.uint8))
    resized = torch.nn.functional.interpolate(x, size=(256, 256), mode="bicubic", antialias=True)
    assert torch.equal(p.resize_batch(x), TF.center_crop(resized, [224]))
    assert "resize_to" not in Preprocess(224, (0.5,) * 3, (0.5,) * 3).to_dict()  # earlier stores keep their fingerprint


def test_patches_tiled_at_another_resolution_than_the_encoder_are_said(monkeypatch, caplog) -> None:
    import wsi_mil.commands.extract_features as ef

    mpps = {"a": 0.5, "b": 1.0}
    todo = [ef.SlideSpec(s, f"/x/{s}.h5", f"/y/{s}.h5", 1, mpp) for s, mpp in mpps.items()]
    assert ef.warn_resolution(todo, "uni") == ["b (1 µm/px)"]
    assert "trained at 0.5 µm/px" in caplog.text and "--mpp 0.5" in caplog.text
    assert ef.warn_resolution(todo, "efficientnet_lite0") == []  # no recipe: nothing said
