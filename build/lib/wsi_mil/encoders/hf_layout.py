"""Checkpoints published in the Hugging Face ``transformers`` key layout (``ViTModel``,
``Dinov2Model``, DINOv2 with registers), read into the equivalent timm Vision Transformer.

Phikon, Phikon-v2 and Hibou are published as ``transformers`` checkpoints. Rather than
depend on ``transformers`` at run time, their tensors are renamed into timm's layout
(separate query / key / value projections joined into one ``qkv``; layer-scale, norms and
MLP renamed; the class token's position folded into the class token where registers make
timm's layout position-free for prefix tokens); ``tests/encoders/test_foundation.py``
checks the result value for value against the ``transformers`` model itself.

Both layouts load: the one on the hub (transformers 4: ``encoder.layer.N.attention.attention.query``)
and the one transformers 5 writes (``layers.N.attention.q_proj`` / ``encoder.layer.N.attention.q_proj``).
A key this map does not know is kept under its own name, so the loader refuses it by name.
"""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

#: tensors a feature extractor does not use: the pooler head and DINOv2's masked-image token
_UNUSED = re.compile(r"^(pooler\.|embeddings\.mask_token$)")

#: per-block names: transformers (4 and 5) -> timm
_BLOCK = [
    (r"attention\.attention\.(query|key|value)\.(weight|bias)", None),  # joined into attn.qkv below
    (r"attention\.(q|k|v)_proj\.(weight|bias)", None),
    (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
    (r"attention\.o_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"(?:layernorm_before|norm1)\.(weight|bias)", r"norm1.\1"),
    (r"(?:layernorm_after|norm2)\.(weight|bias)", r"norm2.\1"),
    (r"(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in)\.(weight|bias)", r"mlp.fc1.\1"),
    (r"(?:output\.dense|mlp\.fc2|mlp\.weights_out|mlp\.down_proj)\.(weight|bias)", r"mlp.fc2.\1"),
    (r"layer_scale([12])\.lambda1", r"ls\1.gamma"),
]
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model saved inside its task wrapper (``vit.``, ``dinov2.``, ...) reads as the bare model
    (a classification head beside it stays, and is ignored as a head by the loader)."""
    if any(k.startswith(("embeddings.", "encoder.", "layers.")) for k in state):
        return state
    for prefix in ("vit.", "dinov2.", "model.", "backbone."):
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def to_timm(state: dict[str, torch.Tensor], *, patch_grid: int | None = None) -> dict[str, torch.Tensor]:
    """The timm Vision Transformer state dict of a ``transformers`` ViT / DINOv2 checkpoint.

    ``patch_grid``: the side of the patch grid the timm model is built for; position
    embeddings published for another grid are resampled as ``transformers`` does at run
    time (bicubic, no antialiasing, in float32), once, at load.
    """
    state = _strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    gate_up: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    dropped = []
    for key, value in state.items():
        if _UNUSED.match(key):
            dropped.append(key)
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _LAYER.match(key)
        if not m:
            out[key] = value  # unknown: refused by name when loaded
            continue
        block, rest = m.groups()
        swiglu = re.fullmatch(r"mlp\.(gate_proj|up_proj)\.(weight|bias)", rest)
        if swiglu:  # transformers 5 splits the packed SwiGLU input projection in two
            gate_up.setdefault((block, swiglu.group(2)), {})[swiglu.group(1)] = value
            continue
        for pattern, target in _BLOCK:
            hit = re.fullmatch(pattern, rest)
            if hit and target is None:
                qkv.setdefault((block, hit.group(2)), {})[_QKV[hit.group(1)]] = value
                break
            if hit and target is not None:
                out[f"blocks.{block}.{hit.expand(target)}"] = value
                break
        else:
            out[key] = value
    for (block, kind), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            missing = [n for n, i in (("query", 0), ("key", 1), ("value", 2)) if i not in parts]
            out[f"blocks.{block}.attn.qkv.{kind} (no {', '.join(missing)})"] = next(iter(parts.values()))
            continue
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for (block, kind), halves in gate_up.items():
        out[f"blocks.{block}.mlp.fc1.{kind}"] = torch.cat([halves["gate_proj"], halves["up_proj"]], dim=0) \
            if len(halves) == 2 else next(iter(halves.values()))
    if dropped:
        logger.info("transformers checkpoint: %d tensor(s) a feature extractor does not use (%s)", len(dropped),
                    ", ".join(dropped[:3]))
    published = "embeddings.position_embeddings" in state  # (a checkpoint already in timm's layout passes as it is)
    if published and patch_grid is not None:
        out["pos_embed"] = _resample(out["pos_embed"], patch_grid)
    if published and "embeddings.register_tokens" in state and "cls_token" in out:
        # DINOv2 with registers adds positions to [class, patches] and inserts the registers after:
        # timm's no_embed_class layout carries the class token's position inside the class token
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _resample(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[class, patches] position embeddings resampled to a ``grid`` x ``grid`` patch grid as
    ``transformers`` resamples DINOv2's at run time (unchanged when the grid already fits)."""
    n = pos.shape[1] - 1
    side = int(round(n ** 0.5))
    if side == grid or side * side != n:
        return pos
    patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch.float(), size=(grid, grid), mode="bicubic",
                                            align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
