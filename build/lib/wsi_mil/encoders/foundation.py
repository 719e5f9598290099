"""Pathology foundation encoders by name, each with its authors' recipe.

Every recipe here was checked against the authors' model card and the code of tools that
load the published checkpoints (TRIDENT, Slideflow, the timm configs on the Hugging Face
hub); ``docs/encoders.md`` renders :data:`RECIPES` (a test keeps the two equal). Weights
come from disk only (``--weights`` a file, or a Hugging Face cache / download folder),
in the key layout the authors publish (timm's, or transformers' for Phikon and Hibou: see
encoders/hf_layout.py), loaded as weights only; a checkpoint of
another architecture is refused naming the first mismatching keys and shapes.

A new timm-built encoder is one :class:`Recipe` in :data:`RECIPES`.
"""

from __future__ import annotations

import itertools
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
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class Recipe:
    """How an encoder's authors embed a patch."""

    name: str
    title: str
    architecture: str  # the timm model the weights fit
    kwargs: dict[str, Any]  # its constructor arguments (layers by name: see _LAYERS)
    embedding: str  # "cls": the class token (timm's token pooling); "cls+mean": class token ++ mean of patch tokens;
    # "mean": the average of the last stage's tokens after the final norm (timm's average pooling);
    # "attn-pool": CONCH's contrastive head (a learned query attending over every token, then a layer norm)
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
    layout: str = "timm"  # the published key layout: "timm"; "timm-0.5" (Swin, stage-end downsampling, as timm 0.5.4
    # wrote it: renamed by timm's own checkpoint filter); "transformers" (read by encoders/hf_layout.py)
    published: dict[str, Any] = field(default_factory=dict)  # the published config.json's architecture values
    head: dict[str, Any] = field(default_factory=dict)  # "attn-pool": width, context width, heads, packed projections


#: constructor arguments that name a layer class (written by name so the table can show them)
_LAYERS = {"SwiGLUPacked": "timm.layers.SwiGLUPacked", "SiLU": "torch.nn.SiLU",
           "ConvStem": "wsi_mil.encoders.foundation.ConvStem"}

#: transformers' DINOv2 SwiGLU width: hidden = 8 * ceil(2/3 * 4 * dim / 8), packed in one projection
#: (timm's GluMlp width is int(dim * mlp_ratio): 2 * 2048 / 768 = 5.3334 rounds down to 4096)
_PHIKON2 = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
            "patch_size": 16, "layer_norm_eps": 1e-6, "use_swiglu_ffn": False}

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
    Recipe("ctranspath", "CTransPath (Wang et al. 2022, Swin-T with a convolutional stem)",
           "swin_tiny_patch4_window7_224", {"img_size": 224, "embed_layer": "ConvStem"},
           "mean", 768, 224, "bilinear", *IMAGENET, 1.0,
           "the authors' release (Xiyue-Wang/TransPath: ctranspath.pth); CHIEF's copy as CHIEF_CTransPath.pth",
           "Xiyue-Wang/TransPath ctran.py and get_features_CTransPath.py (Swin-T, ConvStem, head removed, "
           "resize 224, ImageNet mean / std; the README recommends 1.0 µm/px); TRIDENT",
           files=("ctranspath.pth", "CHIEF_CTransPath.pth", "pytorch_model.bin"), layout="timm-0.5",
           notes="published by the authors' timm 0.5.4 fork (downsampling at each stage's end, attention masks "
                 "saved): renamed by timm's own Swin checkpoint filter", test_kwargs={
               "embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}),
    Recipe("conch_v1", "CONCH v1 vision tower (MahmoodLab)", "vit_base_patch16_224",
           {"img_size": 448, "dynamic_img_size": True},
           "attn-pool", 512, 448, "bicubic", *OPENAI_CLIP, 0.5, "CC-BY-NC-ND 4.0, gated (MahmoodLab/CONCH)",
           "mahmoodlab/CONCH conch_ViT-B-16.json, coca_model.py, vision_tower.py (encode_image with proj_contrast=False, "
           "normalize=False: the contrastive pooler's output after ln_contrast), transform.py (resize 448 bicubic, "
           "centre crop 448, OpenAI CLIP mean / std)",
           files=("pytorch_model.bin",), layout="conch",
           head={"width": 512, "context": 768, "heads": 8, "packed": False},
           notes="the published file is the whole CoCa model: the text tower and caption pooler are left out; "
                 "magnification not stated by the authors (0.5 µm/px here)", test_kwargs={"depth": 2}),
    Recipe("conch_v1_5", "CONCH v1.5 vision tower (MahmoodLab, TITAN's patch encoder)", "vit_large_patch16_224",
           {"img_size": 448, "init_values": 1.0},
           "attn-pool", 768, 448, "bilinear", *IMAGENET, 0.5, "CC-BY-NC-ND 4.0, gated (MahmoodLab/conchv1_5)",
           "TRIDENT conchv1_5.py (ViT-L/16 with layer scale, attentional pooler 768 wide over 1024-wide tokens, 8 heads, "
           "ln_contrast; resize 448 bilinear, centre crop 448, ImageNet mean / std); TITAN README (512 px patches at 20x)",
           files=("pytorch_model_vision.bin",), layout="conch_v1_5",
           head={"width": 768, "context": 1024, "heads": 8, "packed": True},
           notes="tile 512 px at 0.5 µm/px (--patch-size 512), resized to 448; the position embeddings are "
                 "resampled once as the authors' loader and forward do (bilinear to 14x14, then DINO's bicubic to 28x28)",
           test_kwargs={"depth": 2}),
    Recipe("phikon", "Phikon (Owkin, iBOT ViT-B/16)", "vit_base_patch16_224",
           {"img_size": 224, "layer_norm_eps": 1e-12},
           "cls", 768, 224, "bilinear", *IMAGENET, 0.5, "Owkin non-commercial licence (owkin/phikon)",
           "config.json of owkin/phikon (ViTModel: 768 wide, 12 layers, 12 heads, patch 16, layer_norm_eps 1e-12); "
           "TRIDENT (last_hidden_state[:, 0]); owkin/HistoSSLscaling (224 px tiles at 0.5 µm/px)",
           files=("model.safetensors", "pytorch_model.bin"), layout="transformers",
           published={"model": "ViTModel", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-12},
           notes="transformers ViTModel layout, read into timm; the class token of the last hidden state "
                 "(not the pooler)", test_kwargs={"depth": 2}),
    Recipe("phikon_v2", "Phikon-v2 (Owkin, DINOv2 ViT-L/16)", "vit_large_patch16_224",
           {"img_size": 224, "init_values": 1.0},
           "cls", 1024, 224, "bilinear", *IMAGENET, 0.5, "Owkin non-commercial licence (owkin/phikon-v2)",
           "model card owkin/phikon-v2 (ViT-L/16 trained with DINOv2); TRIDENT (resize 224, centre crop 224, "
           "last_hidden_state[:, 0]); arXiv 2409.09173 (224 px tiles at 20x)",
           files=("model.safetensors", "pytorch_model.bin"), layout="transformers",
           published={"model": "Dinov2Model", **_PHIKON2},
           notes="transformers Dinov2Model layout, read into timm; position embeddings published for another "
                 "grid are resampled once as transformers does (bicubic)", test_kwargs={"depth": 2}),
    Recipe("hibou_b", "Hibou-B (HistAI)", "vit_base_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1.0, "mlp_ratio": 5.3334, "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU", "global_pool": "token"},
           "cls", 768, 224, "bicubic", (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816), 0.5,
           "Apache-2.0 (histai/hibou-b)",
           "config.json of histai/hibou-b (DINOv2 with 4 registers: 768 wide, 12 layers, 12 heads, patch 14, SwiGLU, "
           "layer_norm_eps 1e-6); HistAI/hibou example (resize 224 bicubic, centre crop 224, its mean / std, "
           "pooler_output = the normed class token); TRIDENT",
           files=("model.safetensors", "pytorch_model.bin"), layout="transformers",
           published={"model": "Dinov2WithRegistersModel", "hidden_size": 768, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14, "num_register_tokens": 4,
                      "use_swiglu_ffn": True, "layer_norm_eps": 1e-6},
           notes="transformers DINOv2-with-registers layout, read into timm; the authors do not state a "
                 "magnification: 0.5 µm/px (20x) as TRIDENT tiles", test_kwargs={"depth": 2}),
    Recipe("hibou_l", "Hibou-L (HistAI)", "vit_large_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1.0, "mlp_ratio": 5.34375, "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU", "global_pool": "token"},
           "cls", 1024, 224, "bicubic", (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816), 0.5,
           "Apache-2.0, gated by a contact form (histai/hibou-L)",
           "HistAI/hibou README and code (ViT-L/14, 4 registers, SwiGLU; as Hibou-B); the 1024 / 24 / 16 "
           "configuration from code that loads it (histai/hibou-L config.json not read)",
           files=("model.safetensors", "pytorch_model.bin"), layout="transformers",
           published={"model": "Dinov2WithRegistersModel", "hidden_size": 1024, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "mlp_ratio": 4, "patch_size": 14, "num_register_tokens": 4,
                      "use_swiglu_ffn": True, "layer_norm_eps": 1e-6},
           notes="as Hibou-B; magnification not stated by the authors (0.5 µm/px here)", test_kwargs={"depth": 2}),
)}


def _constructor(kwargs: dict[str, Any]) -> dict[str, Any]:
    from functools import partial

    import timm.layers

    resolved = dict(kwargs)
    if "layer_norm_eps" in resolved:  # (transformers' ViT uses 1e-12 where timm's default is 1e-6)
        resolved["norm_layer"] = partial(nn.LayerNorm, eps=resolved.pop("layer_norm_eps"))
    for key in ("mlp_layer", "act_layer", "embed_layer"):
        if key in resolved:
            resolved[key] = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU, "ConvStem": ConvStem}[resolved[key]]
    return resolved


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 convolutions (each with batch norm and ReLU, widths
    dim/8 and dim/4) and a 1x1 convolution to ``embed_dim``, then the layer norm; tokens as (B, H, W, C),
    the layout current timm's Swin expects (the authors' timm 0.5.4 fork flattened them). Its parameters
    keep the published names (``proj.0``, ``proj.1``, ``proj.3``, ``proj.4``, ``proj.6``, ``norm``)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: Any = None, **_: Any) -> None:
        super().__init__()
        side = img_size if isinstance(img_size, int) else img_size[0]
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 4 or embed_dim % 8:
            raise ConfigError("CTransPath's convolutional stem needs patch size 4 and a width divisible by 8")
        self.img_size, self.patch_size = (side, side), (patch, patch)
        self.grid_size = (side // patch, side // patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        widths = [in_chans, embed_dim // 8, embed_dim // 4]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(widths[-1], embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:  # (timm's Swin may call it)
        raise ConfigError("CTransPath's convolutional stem is built for one input size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


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
    net = timm.create_model(recipe.architecture, pretrained=False, num_classes=0, **kwargs)
    if recipe.embedding == "attn-pool":
        return PooledTrunk(net, **recipe.head)
    return net


class AttentionalPool(nn.Module):
    """CONCH's contrastive pooling head: one learned query (layer-normed) attends over the layer-normed
    tokens with ``heads`` heads. ``packed``: CONCH v1.5's bias-free ``to_q`` / ``to_kv`` / ``to_out``;
    otherwise CONCH v1's ``torch.nn.MultiheadAttention`` with key / value width ``context``. Parameter
    names are the published ones."""

    def __init__(self, width: int, context: int, heads: int, packed: bool) -> None:
        super().__init__()
        self.heads, self.packed = heads, packed
        self.query = nn.Parameter(torch.zeros(1, width))
        self.ln_q, self.ln_k = nn.LayerNorm(width), nn.LayerNorm(context)
        if packed:
            self.to_q = nn.Linear(width, width, bias=False)
            self.to_kv = nn.Linear(context, 2 * width, bias=False)
            self.to_out = nn.Linear(width, width, bias=False)
        else:
            self.attn = nn.MultiheadAttention(width, heads, kdim=context, vdim=context)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        query = self.ln_q(self.query).expand(tokens.shape[0], -1, -1)  # (B, 1, width)
        if not self.packed:  # (sequence-first, as CONCH calls it)
            return self.attn(query.transpose(0, 1), keys.transpose(0, 1), keys.transpose(0, 1),
                             need_weights=False)[0][0]
        k, v = self.to_kv(keys).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, n, head width)

        out = torch.nn.functional.scaled_dot_product_attention(split(self.to_q(query)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))[:, 0]


class PooledTrunk(nn.Module):
    """A ViT trunk's tokens (after its final norm) pooled by :class:`AttentionalPool`, then layer-normed:
    CONCH's image embedding (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``)."""

    def __init__(self, trunk: nn.Module, width: int, context: int, heads: int, packed: bool) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPool(width, context, heads, packed)
        self.ln_contrast = nn.LayerNorm(width)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.trunk.forward_features(x)  # type: ignore[operator]
        return self.ln_contrast(self.attn_pool_contrast(tokens))


def _conch_state(state: dict[str, torch.Tensor], recipe: Recipe, net: nn.Module) -> dict[str, torch.Tensor]:
    """CONCH v1's whole CoCa checkpoint reduced to its image embedding (``visual.`` left out; the text tower,
    the caption pooler and the contrastive projection, unused by the embedding, dropped), and CONCH v1.5's
    position embeddings as its authors' code uses them at 448 px: resampled to 14x14 at load (bilinear, no
    antialiasing), then to 28x28 at run time by DINO's interpolation (bicubic, scale (28 + 0.1) / 14)."""
    if recipe.layout == "conch":
        if any(k.startswith("visual.") for k in state):
            kept = ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast.")
            dropped = [k for k in state if not k.startswith(kept)]
            logger.info("CONCH checkpoint: %d tensor(s) outside the image embedding left out (%s ...)",
                        len(dropped), ", ".join(dropped[:3]))
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith(kept)}
        return state
    pos = state.get("trunk.pos_embed")
    target = getattr(getattr(net, "trunk"), "pos_embed")  # noqa: B009
    if pos is None or pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return state  # (refused by the loader, by name)
    from timm.layers import resample_abs_pos_embed

    pos = resample_abs_pos_embed(pos, new_size=[14, 14], num_prefix_tokens=1, interpolation="bilinear",
                                 antialias=False, verbose=False)
    grid = int(round((target.shape[1] - 1) ** 0.5))
    patch = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / 14
    patch = torch.nn.functional.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    return {**state, "trunk.pos_embed": torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)}


def embedding_width(recipe: Recipe, net: nn.Module) -> int:
    """The width of the embedding ``net`` gives by the recipe (its ``dim`` at full size)."""
    width: Any = net.num_features  # (timm models say their width here)
    return int(width) * (2 if recipe.embedding == "cls+mean" else 1)


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
        if recipe.layout == "timm-0.5":  # the authors' timm 0.5.4 Swin layout: timm's own filter renames it
            from timm.models.swin_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, net)
        if recipe.layout in ("conch", "conch_v1_5"):
            state = _conch_state(state, recipe, net)
        if recipe.layout == "transformers":
            from wsi_mil.encoders.hf_layout import to_timm

            grid = recipe.input_size // int(recipe.published["patch_size"])
            state = to_timm(state, patch_grid=grid)
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
    return Encoder(name=name, dim=embedding_width(recipe, net) if for_tests else recipe.dim, model=model, weights=source,
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
        embed = {"cls": "class token", "cls+mean": "class token ++ mean of patch tokens (registers left out)",
                 "mean": "mean of the last stage's tokens after the final norm",
                 "attn-pool": f"a learned query attending over every token ({r.head.get('heads')} heads), "
                              "then a layer norm (the contrastive embedding before its projection)"}[r.embedding]
        lines.append(f"| `{r.name}` | {r.title} | `{r.architecture}`: {kw(r.kwargs)} | {resize} | "
                     f"{r.mean} / {r.std} | {embed} | {r.dim} | {r.mpp} µm/px ({10 / r.mpp:g}x) | {r.licence} | {r.source}"
                     + (f"; {r.notes}" if r.notes else "") + " |")
    lines += ["", "Tile at the encoder's resolution: `wsi-mil tile SLIDES --out tiles --encoder uni` makes its `--mpp` the default "
              "and warns when a given `--mpp` differs; extract-features warns when the patch stores were tiled at "
              "another.", ""]
    return "\n".join(lines)
