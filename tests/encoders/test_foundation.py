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

from wsi_mil.encoders.foundation import RECIPES, build_architecture, build_named, embedding_width, recipe_table
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


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "conch_v1_5"])  # (its position embeddings: below)
def test_each_recipe_loads_its_published_layout_and_embeds_as_its_authors_do(tmp_path, name) -> None:
    torch.manual_seed(0)
    recipe = RECIPES[name]
    net = build_architecture(recipe, for_tests=True).eval()
    encoder = build_named(name, weights=_hf_cache(tmp_path, name, net), for_tests=True)
    assert encoder.dim == embedding_width(recipe, net) and encoder.weights.endswith(recipe.files[0])
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
    assert ours.shape == (2, encoder.dim)
    torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_at_full_size_gives_the_dimension_it_lists(name) -> None:
    with torch.device("meta"):  # (the architecture without its memory)
        net = build_architecture(RECIPES[name])
    assert embedding_width(RECIPES[name], net) == RECIPES[name].dim


TRANSFORMERS = [n for n, r in RECIPES.items() if r.layout == "transformers"]


def _transformers_model(name: str, *, image_size: int | None = None) -> torch.nn.Module:
    """The model the authors publish, built by ``transformers`` itself from the recipe's published
    configuration (two layers, random weights; layer scales and norms drawn away from their defaults)."""
    import transformers

    published = dict(RECIPES[name].published)
    cls = getattr(transformers, published.pop("model"))
    config = getattr(transformers, cls.__name__.replace("Model", "Config"))(
        **{**published, "num_hidden_layers": 2, "image_size": image_size or RECIPES[name].input_size})
    model = cls(config, add_pooling_layer=False) if cls.__name__ == "ViTModel" else cls(config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lambda1" in key or "layernorm" in key or "norm1" in key or "norm2" in key:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(("name", "published_size"), [(n, None) for n in TRANSFORMERS] + [("phikon_v2", 518)])
def test_transformers_checkpoints_load_as_published_and_embed_as_transformers_does(tmp_path, name,
                                                                                   published_size) -> None:
    """Phikon, Phikon-v2 and Hibou are published in transformers' layout: the file save_pretrained writes
    (the hub's key names) loads by --weights and gives, value for value, the class token transformers gives
    (Hibou's pooler_output) on the recipe's preprocessing; DINOv2 position embeddings published for another
    grid are resampled as transformers resamples them."""
    torch.manual_seed(0)
    recipe = RECIPES[name]
    reference = _transformers_model(name, image_size=published_size)
    folder = tmp_path / "download"
    reference.save_pretrained(folder)
    assert "encoder.layer.0.attention.attention.query.weight" in _keys(folder / "model.safetensors")  # the hub's layout
    encoder = build_named(name, weights=folder, for_tests=True)
    patches = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 256, 256), dtype=np.uint8))
    with torch.no_grad():
        ours = encoder.forward_normalised(encoder.normalise(encoder.preprocess.resize_batch(patches)))
        x = torch.nn.functional.interpolate(patches, size=(224, 224), mode=recipe.interpolation, antialias=True)
        x = (x.float() / 255.0 - torch.tensor(recipe.mean).view(1, 3, 1, 1)) / torch.tensor(recipe.std).view(1, 3, 1, 1)
        theirs = reference(pixel_values=x).last_hidden_state[:, 0]
    assert ours.shape == (2, recipe.dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_a_transformers_checkpoint_of_another_model_is_refused_naming_the_mismatch(tmp_path) -> None:
    _transformers_model("hibou_b").save_pretrained(tmp_path / "hibou")
    with pytest.raises(ConfigError, match=r"(?s)for Phikon .*do not fit the model: .*unexpected key.*reg_token"):
        build_named("phikon", weights=tmp_path / "hibou", for_tests=True)
    state = _transformers_model("phikon").state_dict()  # (in memory: transformers 5's own names)
    del state["layers.1.attention.v_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"blocks\.1\.attn\.qkv\.weight \(no value\)"):
        build_named("phikon", weights=tmp_path / "pytorch_model.bin", for_tests=True)


def test_ctranspath_loads_the_authors_timm_0_5_layout_and_gives_what_their_timm_gave(tmp_path) -> None:
    """The reference was built by timm 0.5.4 (the authors' timm) with their stem, and saved as their release
    is (``{"model": ...}``, downsampling at each stage's end, attention masks and indices saved):
    benchmarks/make_ctranspath_reference.py. A reduced width and depth; the key layout of the release."""
    from safetensors.torch import load_file

    stored = load_file(str(ROOT / "tests" / "encoders" / "data" / "ctranspath_reference.safetensors"))
    state = {k.removeprefix("model."): (v.float() if v.is_floating_point() else v)
             for k, v in stored.items() if k.startswith("model.")}
    assert "layers.0.downsample.reduction.weight" in state and "layers.0.blocks.1.attn_mask" in state
    torch.save({"model": state}, tmp_path / "ctranspath.pth")
    encoder = build_named("ctranspath", weights=tmp_path, for_tests=True)
    x = torch.from_numpy(np.random.default_rng(int(stored["reference.input_seed"][0])).normal(
        size=(2, 3, 224, 224)).astype("float32"))
    with torch.no_grad():
        ours = encoder.forward_normalised(x)
    torch.testing.assert_close(ours, stored["reference.output"], rtol=1e-4, atol=1e-4)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention written out: (B, n, D) each -> (B, n, D), heads split width-wise in order."""
    b, n, d = q.shape
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    sim = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
    return (sim.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("name", ["conch_v1", "conch_v1_5"])
def test_conch_loads_its_published_file_and_pools_as_its_authors_do(tmp_path, name) -> None:
    """CONCH v1's file is the whole CoCa model (``visual.`` image tower beside a text tower, a caption
    pooler and the contrastive projection); CONCH v1.5's holds the tower with the trunk built at 224 px
    (14x14 positions), which the authors' code resamples bilinearly at load and by DINO's bicubic
    interpolation (scale 28.1 / 14) at 448 px. The embedding is the contrastive pooler's query output
    after ``ln_contrast``, here written out from the published tensors."""
    import timm.layers

    torch.manual_seed(0)
    recipe = RECIPES[name]
    net = build_architecture(recipe, for_tests=True)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if "ln_" in key or "norm" in key or "gamma" in key:
                p.uniform_(0.5, 1.5)
            elif key.endswith("query") or "bias" in key:
                p.normal_(0, 0.5)
    state = dict(net.state_dict())
    if name == "conch_v1":
        published = {f"visual.{k}": v for k, v in state.items()}
        published |= {"visual.proj_contrast": torch.randn(512, 512), "visual.attn_pool_caption.query": torch.randn(256, 768),
                      "visual.ln_caption.weight": torch.ones(768), "text.token_embedding.weight": torch.randn(10, 768),
                      "logit_scale": torch.tensor(2.0)}
    else:
        published = {**state, "trunk.pos_embed": torch.randn(1, 1 + 14 * 14, state["trunk.pos_embed"].shape[-1])}
    torch.save(published, tmp_path / recipe.files[0])
    encoder = build_named(name, weights=tmp_path, for_tests=True)
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        ours = encoder.forward_normalised(x)
        trunk = net.trunk
        if name == "conch_v1_5":  # the authors' position embeddings at 448 px
            pos = timm.layers.resample_abs_pos_embed(published["trunk.pos_embed"], [14, 14], num_prefix_tokens=1,
                                                     interpolation="bilinear", antialias=False)
            grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
            grid = torch.nn.functional.interpolate(grid, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic")
            trunk.pos_embed.copy_(torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 28 * 28, -1)], 1))
        tokens = trunk.forward_features(x)
        pool, heads = net.attn_pool_contrast, recipe.head["heads"]
        keys = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:], pool.ln_k.weight, pool.ln_k.bias, 1e-5)
        query = torch.nn.functional.layer_norm(pool.query, pool.query.shape[-1:], pool.ln_q.weight, pool.ln_q.bias,
                                               1e-5).expand(2, 1, -1)
        if name == "conch_v1":  # torch's MultiheadAttention with separate key / value widths
            a = pool.attn
            out = _attention(query @ a.q_proj_weight.T + a.in_proj_bias[:512], keys @ a.k_proj_weight.T
                             + a.in_proj_bias[512:1024], keys @ a.v_proj_weight.T + a.in_proj_bias[1024:], heads)
            out = out @ a.out_proj.weight.T + a.out_proj.bias
        else:  # the bias-free packed projections
            k, v = (keys @ pool.to_kv.weight.T).chunk(2, dim=-1)
            out = _attention(query @ pool.to_q.weight.T, k, v, heads) @ pool.to_out.weight.T
        ln = net.ln_contrast
        theirs = torch.nn.functional.layer_norm(out[:, 0], out.shape[-1:], ln.weight, ln.bias, 1e-5)
    assert ours.shape == (2, recipe.dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


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
