"""Whole-image classifiers from the encoder registry: a backbone (any registered encoder
or timm model) and a linear head, in three transfer modes.

* ``linear``: the backbone is frozen; its pooled features are computed once per image and
  cached (:func:`image_features`), and only the head is trained on them (a linear probe).
* ``partial``: the last ``train_stages`` stages of the backbone (timm's stage grouping)
  and the head are trained; earlier stages are frozen, batch-norm statistics included.
* ``full``: everything is trained, with discriminative learning rates: the head at the
  base rate, each backbone stage at ``layer_decay`` times the rate of the stage after it.
* ``mil``: the image is a bag of overlapping patches (:func:`patch_grid`); the frozen
  backbone embeds every patch once (cached like the probe's features) and a MIL
  aggregator from ``wsi_mil.mil`` attends over them, as over a slide's patches.

Grey images enter as one channel in [0, 1] and are given to the backbone as that channel
three times, normalised with the backbone's own ImageNet mean and std.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from wsi_mil.errors import ConfigError


class ImageClassifier(nn.Module):
    mean: torch.Tensor  # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], n_outputs: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(backbone.num_features), n_outputs)  # type: ignore[arg-type]
        self.frozen: list[nn.Module] = []

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) in [0, 1] (2D images or 3D volumes) -> the backbone's channels, normalised."""
        channels = self.mean.shape[1]
        if x.shape[1] == 1 and channels > 1:
            x = x.expand(-1, channels, *x.shape[2:])
        view = (1, channels) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(view)) / self.std.view(view)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) (volumes: (B, C, d, h, w)) activations of the last stage (what Grad-CAM weighs)."""
        return self.backbone.forward_features(self.normalise(x))  # type: ignore[operator,no-any-return]

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(fmap, pre_logits=True)  # type: ignore[operator,no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(self.feature_map(x))))  # type: ignore[no-any-return]

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for m in self.frozen:  # frozen stages keep their batch-norm statistics
            m.eval()
        return self


def stage_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names per stage, input first (timm's coarse grouping when the model has
    one, else its top-level children)."""
    group_matcher = getattr(backbone, "group_matcher", None)  # timm's (Module.__getattr__ types only tensors/modules)
    if group_matcher is not None:
        from timm.models import group_parameters

        groups = group_parameters(backbone, group_matcher(coarse=True))
        return [list(v) for _, v in sorted(groups.items()) if v]
    by_child: dict[str, list[str]] = {}
    for name, _ in backbone.named_parameters():
        by_child.setdefault(name.split(".")[0], []).append(name)
    return list(by_child.values())


def build_classifier(backbone_name: str, n_outputs: int, *, weights: str | None = None, random_init: bool = False,
                     dropout: float = 0.0) -> tuple[ImageClassifier, dict[str, Any]]:
    """The classifier and the backbone's provenance (name, weights source and hash)."""
    from wsi_mil.encoders.registry import build_encoder

    enc = build_encoder(backbone_name, weights=weights, allow_random_init=random_init)
    if not hasattr(enc.model, "forward_features") or not hasattr(enc.model, "forward_head"):
        raise ConfigError(f"backbone {backbone_name!r} is not a timm model with forward_features / forward_head")
    model = ImageClassifier(enc.model, enc.preprocess.mean, enc.preprocess.std, n_outputs, dropout)
    info = {"encoder": enc.name, "weights": enc.weights, "weights_sha256": enc.weights_sha256,
            "mean": list(enc.preprocess.mean), "std": list(enc.preprocess.std), "dim": enc.dim}
    return model, info


def configure(model: ImageClassifier, mode: str, *, train_stages: int = 2, layer_decay: float = 0.7
              ) -> list[dict[str, Any]]:
    """Freeze what ``mode`` keeps fixed; AdamW parameter groups with ``lr_scale``."""
    groups = stage_groups(model.backbone)
    params = dict(model.backbone.named_parameters())
    head = {"params": list(model.head.parameters()), "lr_scale": 1.0}
    for p in model.backbone.parameters():
        p.requires_grad_(mode == "full")
    model.frozen = []
    if mode == "linear":
        model.frozen = [model.backbone]
        return [head]
    if mode == "partial":
        k = min(train_stages, len(groups))
        trained = groups[len(groups) - k:]
        names = {n for g in trained for n in g}
        for n in names:
            params[n].requires_grad_(True)
        prefixes = {n.rsplit(".", 1)[0] for g in groups[:len(groups) - k] for n in g}
        model.frozen = [m for name, m in model.backbone.named_modules() if name in prefixes]
        return [head, {"params": [params[n] for n in sorted(names)], "lr_scale": 1.0}]
    if mode == "full":
        out = [head]
        for depth, g in enumerate(reversed(groups), start=1):
            out.append({"params": [params[n] for n in g], "lr_scale": layer_decay ** depth})
        return out
    raise ConfigError(f"--mode {mode!r}: choose linear, partial or full")


@torch.no_grad()
def image_features(model: ImageClassifier, images: torch.Tensor, *, batch_size: int = 64, device: str = "cpu",
                   progress: bool = False) -> npt.NDArray[np.float32]:
    """Pooled frozen-backbone features of (N, 1, S, S) images (eval mode, no augmentation)."""
    from tqdm import tqdm

    model.eval().to(device)
    out = []
    for a in tqdm(range(0, len(images), batch_size), desc="backbone features", unit="batch", disable=not progress):
        x = images[a:a + batch_size].to(device).float()
        out.append(model.pooled(model.feature_map(x)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(model.backbone.num_features)), np.float32)  # type: ignore[arg-type]


def patch_grid(size: int, grid: int) -> tuple[npt.NDArray[np.int64], int, int]:
    """Top-left corners (P, 2) as (x, y), the patch side and the step of ``grid`` x ``grid``
    square patches over a ``size`` x ``size`` image, neighbours overlapping by half (side
    ``2 * size / (grid + 1)``; ``grid`` 1 is the whole image). Row-major, y outer."""
    if grid < 1:
        raise ConfigError(f"--patch-grid {grid}: give 1 or more patches per side")
    step = size // (grid + 1) if grid > 1 else size
    side = 2 * step if grid > 1 else size
    if side < 32:
        raise ConfigError(f"--patch-grid {grid} at --image-size {size} makes {side}-px patches; backbones need at "
                          f"least 32 px: raise --image-size to {16 * (grid + 1)} or more, or use fewer patches")
    xs = [i * step for i in range(grid)]
    return np.asarray([(x, y) for y in xs for x in xs], dtype=np.int64), side, step


@torch.no_grad()
def patch_features(model: ImageClassifier, images: torch.Tensor, grid: int, *, batch_size: int = 64,
                   device: str = "cpu", progress: bool = False) -> npt.NDArray[np.float32]:
    """Pooled frozen-backbone features of every patch of :func:`patch_grid`: (N, P, D)."""
    from tqdm import tqdm

    corners, side, _ = patch_grid(int(images.shape[-1]), grid)
    model.eval().to(device)
    per = max(1, batch_size // len(corners))  # images per forward pass
    out = []
    for a in tqdm(range(0, len(images), per), desc=f"patch features ({len(corners)} per image)", unit="batch",
                  disable=not progress):
        x = images[a:a + per].to(device).float()
        crops = torch.stack([x[:, :, y:y + side, xx:xx + side] for xx, y in corners.tolist()], dim=1)
        flat = crops.reshape(-1, *crops.shape[2:])
        out.append(model.pooled(model.feature_map(flat)).float().cpu().numpy().reshape(len(x), len(corners), -1))
    dim = int(model.backbone.num_features)  # type: ignore[arg-type]
    return np.concatenate(out) if out else np.zeros((0, len(corners), dim), np.float32)


def cached_features(cache_dir: Path, model: ImageClassifier, backbone: dict[str, Any], images: torch.Tensor,
                    ids: list[str], image_key: str, *, device: str, progress: bool,
                    grid: int | None = None) -> npt.NDArray[np.float32]:
    """:func:`image_features` ((N, D); with ``grid``: :func:`patch_features`, (N, P, D)),
    read from / written to an HDF5 feature store in ``cache_dir`` keyed by the backbone's
    weights, the exact input images and the patch grid."""
    import h5py

    from wsi_mil.io.atomic import atomic_path
    from wsi_mil.io.features import check_finite

    image_key = f"{image_key}|grid {grid}" if grid else image_key
    key = hashlib.sha256(f"{backbone['encoder']}|{backbone['weights_sha256']}|{image_key}".encode()).hexdigest()[:16]
    path = cache_dir / f"image_features_{key}.h5"
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                if [s.decode() for s in f["ids"][:]] == ids:
                    return check_finite(path, f["features"][:])
        except (OSError, KeyError):
            pass
    feats = (patch_features(model, images, grid, device=device, progress=progress) if grid
             else image_features(model, images, device=device, progress=progress))
    check_finite(path, feats)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("ids", data=np.asarray([i.encode() for i in ids]))
        for k, v in backbone.items():
            f.attrs[k] = str(v) if not isinstance(v, (int, float)) else v
        f.attrs["image_key"] = image_key
    return feats
