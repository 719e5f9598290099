"""The encoder contract: identifier, output dimension, exact preprocessing, forward.

Preprocessing is split in two so that it runs where it is cheapest:

* ``Preprocess.resize_batch`` (in the data-loader workers, on uint8 pixels): resize a
  batch of patches to the encoder's input size;
* ``Encoder.forward`` (on the device): uint8 NCHW batch -> float, optional test-time
  transforms (stain normalisation, flips), normalisation with the encoder's mean/std,
  then the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """The exact input transform of an encoder (recorded in every feature store)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # antialiased resize filter: "bilinear" or "bicubic"
    resize_to: int | None = None  # resize to this side first, then centre-crop input_size (e.g. 256 -> 224)

    def resize_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> uint8 (B, 3, S, S), antialiased (torch's uint8 kernel,
        within 1 grey level of Pillow's resize and about 6x faster); unchanged when the
        patches already have the input size. With ``resize_to``: resized to that side, then
        the centre ``input_size`` crop (the recipe of encoders trained so). Memory format is kept."""
        s = self.input_size
        r = self.resize_to or s
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        if tuple(batch.shape[-2:]) != (r, r):
            batch = torch.nn.functional.interpolate(batch, size=(r, r), mode=mode, antialias=True, align_corners=False)
        if r != s:
            top = int(round((r - s) / 2.0))  # torchvision's centre crop
            batch = batch[..., top:top + s, top:top + s]
        return batch

    def resize_uint8(self, rgb: npt.NDArray[np.uint8] | Any) -> npt.NDArray[np.uint8]:
        """One (H, W, 3) uint8 array or RGB Pillow image -> (S, S, 3) uint8, exactly as
        :meth:`resize_batch` does it in the extraction pipeline."""
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None]
        return self.resize_batch(x)[0].permute(1, 2, 0).contiguous().numpy()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["resize_to"] is None:  # recorded only when used: stores of earlier encoders keep their fingerprint
            del out["resize_to"]
        return out


BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class _Normalise(nn.Module):
    """uint8 NCHW -> normalised float, then optional float-space transforms (all on device)."""

    scale: torch.Tensor  # buffers
    shift: torch.Tensor

    def __init__(self, pre: Preprocess, transforms: list[tuple[str, BatchTransform]]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in pre.std]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor([m / s for m, s in zip(pre.mean, pre.std, strict=True)]).view(1, 3, 1, 1), persistent=False)
        self.transforms = transforms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        for _, t in self.transforms:  # transforms see RGB in [0, 255]
            x = t(x)
        return x * self.scale - self.shift


@dataclass
class Encoder:
    """A frozen feature extractor.

    Attributes:
        name: registry identifier (``efficientnet_lite0``, ``timm:resnet50.a1_in1k`` ...).
        dim: output feature dimension.
        preprocess: the exact input transform.
        model: the network, mapping a normalised float batch to (B, dim) features.
        weights: where the weights came from (file, package, hub or "random-init").
        weights_sha256: hash of the weights' tensors (independent of file format).
        transforms: named test-time transforms applied before normalisation.
        tta_flips: average the features of the patch and its flips.
    """

    name: str
    dim: int
    preprocess: Preprocess
    model: nn.Module
    weights: str
    weights_sha256: str
    transforms: list[tuple[str, BatchTransform]] = field(default_factory=list)
    tta_flips: bool = False

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._norm = _Normalise(self.preprocess, self.transforms)

    # -- identity ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Everything that determines the features; stored as provenance."""
        return {
            "encoder": self.name, "dim": self.dim, "weights": self.weights, "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.to_dict(), "transforms": [n for n, _ in self.transforms],
            "tta_flips": self.tta_flips,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def add_transform(self, name: str, fn: BatchTransform) -> None:
        """Append a test-time transform (float RGB [0, 255] batch -> same), run on the
        device before normalisation; its name becomes part of the fingerprint."""
        self.transforms.append((name, fn))
        self._norm = _Normalise(self.preprocess, self.transforms)

    # -- compute ----------------------------------------------------------------------
    def to(self, device: torch.device | str, *, channels_last: bool = False) -> Encoder:
        self.model.to(device)
        self._norm.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def normalise(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        return self._norm(batch_uint8)

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tta_flips:
            return self.model(x)
        return (self.model(x) + self.model(x.flip(-1)) + self.model(x.flip(-2))) / 3.0

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> (B, dim) features."""
        return self.forward_normalised(self.normalise(batch_uint8))


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A format-independent hash of a state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
