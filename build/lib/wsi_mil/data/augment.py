"""Training augmentation that keeps the label true, on batches of float images in [0, 1].

Presets:

* ``xray`` (the default for radiographs): a small rotation (±7°), shift (±6 % of the
  side), zoom (0.92-1.08), brightness (±0.08), contrast (×0.9-1.1) and gamma
  (0.85-1.18). **No left-right flip**: chest anatomy is not symmetric, and a mirrored
  normal radiograph shows the heart on the right, i.e. dextrocardia, a finding; the
  same goes for the side markers and for every lateralised finding (a left effusion
  would become a right one). Every geometric transform drawn is a proper rotation and
  scaling (positive determinant), never a reflection.
* ``histology``: the same plus horizontal and vertical flips, 90° turns and a small
  per-channel colour jitter: tissue patches have no orientation.
* ``none``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    rotate_deg: float = 7.0
    translate: float = 0.06
    zoom: tuple[float, float] = (0.92, 1.08)
    brightness: float = 0.08
    contrast: tuple[float, float] = (0.9, 1.1)
    gamma: tuple[float, float] = (0.85, 1.18)
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    colour_jitter: float = 0.0

    def matrices(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 2, 3) affine matrices (output -> input sampling grid, normalised units)."""
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        angle = uniform(-self.rotate_deg, self.rotate_deg) * math.pi / 180.0
        if self.rot90:
            angle = angle + torch.randint(0, 4, (n,), generator=gen) * (math.pi / 2)
        scale = 1.0 / uniform(*self.zoom)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        sx = torch.ones(n)
        sy = torch.ones(n)
        if self.hflip:
            sx = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        if self.vflip:
            sy = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        t = 2 * self.translate
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
        theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
        theta[:, 0, 2], theta[:, 1, 2] = uniform(-t, t), uniform(-t, t)
        return theta

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> the same, each image transformed independently."""
        n = x.shape[0]
        theta = self.matrices(n, gen).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        shape = (n, 1, 1, 1)
        gamma = torch.exp(torch.empty(shape).uniform_(math.log(self.gamma[0]), math.log(self.gamma[1]), generator=gen)).to(x)
        x = x.clamp(1e-6, 1.0) ** gamma
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = torch.empty(shape).uniform_(*self.contrast, generator=gen).to(x)
        bright = torch.empty(shape).uniform_(-self.brightness, self.brightness, generator=gen).to(x) if self.brightness else 0.0
        x = (x - mean) * contrast + mean + bright
        if self.colour_jitter and x.shape[1] == 3:
            x = x * (1 + torch.empty(n, 3, 1, 1).uniform_(-self.colour_jitter, self.colour_jitter, generator=gen).to(x))
        return x.clamp(0.0, 1.0)


PRESETS = {
    "xray": Augment(),
    "histology": Augment(hflip=True, vflip=True, rot90=True, colour_jitter=0.05),
    "none": Augment(rotate_deg=0.0, translate=0.0, zoom=(1.0, 1.0), brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0)),
}


def preset(name: str) -> Augment | None:
    """The named preset (None for ``none``: nothing to do)."""
    if name not in PRESETS:
        raise ValueError(f"augmentation {name!r}: choose one of {sorted(PRESETS)}")
    return None if name == "none" else PRESETS[name]


def _rotation(axis: int, angle: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) rotations by ``angle`` (radians) about grid axis ``axis`` (0 x, 1 y, 2 z)."""
    n = len(angle)
    c, s = torch.cos(angle), torch.sin(angle)
    r = torch.eye(3).repeat(n, 1, 1)
    i, j = [a for a in range(3) if a != axis]
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


@dataclass(frozen=True)
class Augment3D:
    """Volume augmentation that keeps the label true, on (B, 1, D, H, W) in [0, 1]: small
    rotations about each axis, isotropic scaling, shifts, intensity jitter (brightness,
    contrast, gamma), optional elastic deformation. **No left-right flip by default**:
    laterality is anatomy (a left adrenal mass mirrored is a right one; situs, the liver's
    side); the flip TorchIO applies by default is ``flip_lr`` here and off."""

    rotate_deg: float = 10.0
    translate: float = 0.05
    zoom: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.05
    contrast: tuple[float, float] = (0.9, 1.1)
    gamma: tuple[float, float] = (0.85, 1.18)
    elastic: float = 0.0  # displacement amplitude, in units of the half-side (0: off)
    flip_lr: bool = False

    def matrices(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 3, 4) affine matrices (output -> input sampling grid, normalised units)."""
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        r = torch.eye(3).repeat(n, 1, 1)
        for axis in range(3):
            r = _rotation(axis, uniform(-self.rotate_deg, self.rotate_deg) * math.pi / 180.0) @ r
        r = r / uniform(*self.zoom).view(n, 1, 1)
        if self.flip_lr:  # grid x is the volume's W axis: the patient's left-right
            r[:, :, 0] *= torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).view(n, 1)
        t = 2 * self.translate
        theta = torch.zeros(n, 3, 4)
        theta[:, :, :3] = r
        theta[:, :, 3] = torch.stack([uniform(-t, t) for _ in range(3)], dim=1)
        return theta

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        theta = self.matrices(n, gen).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if self.elastic > 0:
            coarse = torch.randn(n, 3, 4, 4, 4, generator=gen).to(x) * self.elastic
            field = F.interpolate(coarse, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
            grid = grid + field.permute(0, 2, 3, 4, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        shape = (n, 1, 1, 1, 1)
        gamma = torch.exp(torch.empty(shape).uniform_(math.log(self.gamma[0]), math.log(self.gamma[1]), generator=gen)).to(x)
        x = x.clamp(1e-6, 1.0) ** gamma
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        contrast = torch.empty(shape).uniform_(*self.contrast, generator=gen).to(x)
        bright = torch.empty(shape).uniform_(-self.brightness, self.brightness, generator=gen).to(x)
        return ((x - mean) * contrast + mean + bright).clamp(0.0, 1.0)


VOLUME_PRESETS = {
    "volume": Augment3D(),
    "volume-elastic": Augment3D(elastic=0.03),
    "volume-flip": Augment3D(flip_lr=True),
    "none": None,
}


def volume_preset(name: str) -> Augment3D | None:
    if name not in VOLUME_PRESETS:
        raise ValueError(f"augmentation {name!r}: choose one of {sorted(VOLUME_PRESETS)}")
    return VOLUME_PRESETS[name]
