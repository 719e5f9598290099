"""Pathology foundation encoders by name, each with its authors' recipe.

Every recipe here was checked against the authors' model card and the code of tools that
load the published checkpoints (TRIDENT, Slideflow, the timm configs on the Hugging Face
hub); ``docs/encoders.md`` renders :data:`RECIPES` (a test keeps the two equal). Weights
come from disk only (``--weights`` a file, or a Hugging Face cache / download folder),
in the key layout the authors publish (timm's), loaded as weights only; a checkpoint of
another architecture is refused naming the first mismatching keys and shapes.

A new timm-built encoder is one :class:`Recipe` in :data:`RECIPES`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_mil.encoders.base import Encoder, Preprocess, state_dict_sha256
from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Recipe:
    """How an encoder's authors embed a patch."""

    name: str
    title: str
    architecture: str  # the timm model the weights fit
    kwargs: dict[str, Any]  # its constructor arguments (layers by name: see _LAYERS)
    embedding: str  # "cls": the class token (timm's token pooling); "cls+mean": class token ++ mean of patch tokens
    dim: int
    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float  # the resolution it was trained at (µm/px)
    licence: str
    source: str  # where the recipe was checked
    resize_to: int | None = None  # resize first, then centre-crop input_size
    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # the published file names
    notes: str = ""
    test_kwargs: dict[str, Any] = field(default_factory=dict)  # a reduced depth for tests (same key layout per block)


#: constructor arguments that name a layer class (written by name so the table can show them)
_LAYERS = {"SwiGLUPacked": "timm.layers.SwiGLUPacked", "SiLU": "torch.nn.SiLU"}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("uni", "UNI (MahmoodLab)", "vit_large_patch16_224",
           {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
           "cls", 1024, 224, "bilinear", *IMAGENET, 0.5, "CC-BY-NC-ND 4.0, gated (Hugging Face MahmoodLab/UNI)",
           "model card MahmoodLab/UNI; TRIDENT patch_encoder_models/load.py", files=("pytorch_model.bin",),
           notes="resize 224 (the card's resize + centre crop 224 is the identity on square patches)",
           test_kwargs={"depth": 2}),
    Recipe("uni2_h", "UNI2-h (MahmoodLab)", "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536, "init_values": 1e-5,
            "mlp_ratio": 2.66667 * 2, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8,
            "no_embed_class": True, "dynamic_img_size": True},
           "cls", 1536, 224, "bilinear", *IMAGENET, 0.5, "CC-BY-NC-ND 4.0, gated (Hugging Face MahmoodLab/UNI2-h)",
           "model card MahmoodLab/UNI2-h; TRIDENT", files=("pytorch_model.bin",), test_kwargs={"depth": 2}),
    Recipe("virchow", "Virchow (Paige)", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
            "global_pool": "", "dynamic_img_size": True},
           "cls+mean", 2560, 224, "bicubic", *IMAGENET, 0.5, "Apache-2.0 with gated access terms (paige-ai/Virchow)",
           "model card paige-ai/Virchow; TRIDENT; Slideflow", files=("pytorch_model.bin",),
           test_kwargs={"depth": 2}),
    Recipe("virchow2", "Virchow2 (Paige)", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
            "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True},
           "cls+mean", 2560, 224, "bicubic", *IMAGENET, 0.5, "CC-BY-NC-ND 4.0, gated (paige-ai/Virchow2)",
           "model card paige-ai/Virchow2 (the 4 register tokens left out of the mean); TRIDENT; Slideflow",
           files=("pytorch_model.bin",), notes="trained on mixed magnifications; 20x here",
           test_kwargs={"depth": 2}),
    Recipe("h_optimus_0", "H-optimus-0 (Bioptimus)", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False},
           "cls", 1536, 224, "bicubic", (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 0.5,
           "Apache-2.0 (bioptimus/H-optimus-0)", "model card and timm config of bioptimus/H-optimus-0",
           files=("model.safetensors", "pytorch_model.bin", "checkpoint.pth"), test_kwargs={"depth": 2}),
    Recipe("h_optimus_1", "H-optimus-1 (Bioptimus)", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False},
           "cls", 1536, 224, "bicubic", (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), 0.5,
           "CC-BY-NC-ND 4.0, gated (bioptimus/H-optimus-1)", "model card bioptimus/H-optimus-1 (as H-optimus-0)",
           files=("model.safetensors", "pytorch_model.bin"), test_kwargs={"depth": 2}),
    Recipe("gigapath", "Prov-GigaPath tile encoder (Providence / Microsoft)", "vit_giant_patch14_dinov2",
           {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
            "init_values": 1e-5, "mlp_ratio": 5.33334, "global_pool": "token"},
           "cls", 1536, 224, "bicubic", *IMAGENET, 0.5, "Prov-GigaPath licence, gated (prov-gigapath/prov-gigapath)",
           "model card prov-gigapath/prov-gigapath (transform: resize 256 bicubic, centre crop 224); TRIDENT",
           resize_to=256, files=("pytorch_model.bin",), test_kwargs={"depth": 2}),
)}


def _constructor(kwargs: dict[str, Any]) -> dict[str, Any]:
    import timm.layers

    resolved = dict(kwargs)
    for key in ("mlp_layer", "act_layer"):
        if key in resolved:
            resolved[key] = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU}[resolved[key]]
    return resolved


class ClassAndMeanTokens(nn.Module):
    """The class token concatenated with the mean of the patch tokens (register tokens,
    between them in timm's layout, are left out): Virchow's and Virchow2's embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model(x)  # (B, 1 + registers + patches, D): global_pool "" keeps every token
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(dim=1)], dim=-1)


def build_architecture(recipe: Recipe, *, for_tests: bool = False) -> nn.Module:
    """The recipe's network with random weights (``for_tests``: at the reduced test depth)."""
    import timm

    kwargs = _constructor({**recipe.kwargs, **(recipe.test_kwargs if for_tests else {})})
    return timm.create_model(recipe.architecture, pretrained=False, num_classes=0, **kwargs)


def checkpoint_file(weights: str | Path, recipe: Recipe) -> Path:
    """A weights file, or the published file inside a folder (a download, or a Hugging Face
    cache ``models--org--name`` folder, whose newest snapshot is used): offline, always."""
    path = Path(weights)
    if path.is_file():
        return path
    if path.is_dir():
        snapshots = sorted((path / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (path / "snapshots").is_dir() else []
        for folder in [*reversed(snapshots), path]:
            for name in recipe.files:
                if (folder / name).is_file():
                    return folder / name
        raise ConfigError(f"--weights {path}: no {' or '.join(recipe.files)} in this folder"
                          + (" or its snapshots/" if snapshots else "") + f" (the files {recipe.title} is published as)")
    raise ConfigError(f"--weights {path}: no such file or folder")


def build_named(name: str, *, weights: str | Path | None = None, allow_random_init: bool = False,
                for_tests: bool = False) -> Encoder:
    """The encoder of recipe ``name``: weights from ``weights`` (never the network), or a
    random initialisation when allowed (recorded as such)."""
    from wsi_mil.encoders.weights import load_into, read_state_dict

    recipe = RECIPES[name]
    net = build_architecture(recipe, for_tests=for_tests)
    if weights is not None:
        path = checkpoint_file(weights, recipe)
        state = read_state_dict(path)
        load_into(net, state, source=f"{path} (for {recipe.title}: {recipe.architecture})")
        source = str(path.resolve())
    elif allow_random_init:
        logger.warning("encoder %s: RANDOM initialisation (--random-init); features carry no pretrained meaning", name)
        source = "random-init"
    else:
        raise ConfigError(f"encoder {name} ({recipe.title}) needs its weights: download them ({recipe.licence}) and "
                          f"pass --weights FILE or the folder holding {' or '.join(recipe.files)} (a Hugging Face "
                          "cache folder works, offline)")
    model: nn.Module = ClassAndMeanTokens(net) if recipe.embedding == "cls+mean" else net
    return Encoder(name=name, dim=recipe.dim, model=model, weights=source,
                   preprocess=Preprocess(recipe.input_size, recipe.mean, recipe.std, recipe.interpolation,
                                         recipe.resize_to),
                   weights_sha256=state_dict_sha256(net.state_dict()))


def recipe_table() -> str:
    """``docs/encoders.md``: every recipe, one row each (a test keeps the file equal to this)."""
    def kw(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v!r}" if not isinstance(v, str) or k not in ("mlp_layer", "act_layer")
                         else f"{k}={_LAYERS[v]}" for k, v in d.items())

    lines = ["# Foundation encoders: the recipes", "",
             ("Generated from `wsi_mil/encoders/foundation.py` (`tests/encoders/test_foundation.py` keeps this page "
              "equal to it). Each row is the authors' recipe as checked against the source named; weights are "
              "read from disk only (`--weights FILE` or the folder a download or the Hugging Face cache holds), "
              "in the layout the authors publish."), "",
             "| name | model | architecture (timm) and arguments | input | mean / std | embedding | dim | trained at "
             "| licence and access | checked against |",
             "|---|---|---|---|---|---|---:|---|---|---|"]
    for r in RECIPES.values():
        resize = f"resize {r.resize_to} {r.interpolation}, centre crop {r.input_size}" if r.resize_to else \
            f"resize {r.input_size} {r.interpolation}"
        embed = "class token" if r.embedding == "cls" else "class token ++ mean of patch tokens (registers left out)"
        lines.append(f"| `{r.name}` | {r.title} | `{r.architecture}`: {kw(r.kwargs)} | {resize} | "
                     f"{r.mean} / {r.std} | {embed} | {r.dim} | {r.mpp} µm/px (20x) | {r.licence} | {r.source}"
                     + (f"; {r.notes}" if r.notes else "") + " |")
    lines += ["", "Tile at the encoder's resolution (the `--mpp` option of tile: 0.5 for every encoder here); "
              "extract-features warns when the patch stores were tiled at another.", ""]
    return "\n".join(lines)
