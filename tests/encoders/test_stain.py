"""Test-time Macenko stain normalisation on real H&E tissue."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tests.conftest import shared
from wsi_mil.encoders.stain import macenko


def _tissue_crops(n: int = 4, size: int = 224) -> torch.Tensor:
    img = np.asarray(Image.open(shared("tiles", "tcga", "TCGA-HE-7130-01Z-00-DX1.png")).convert("RGB"))
    crops = []
    for y in range(0, img.shape[0] - size, size):
        for x in range(0, img.shape[1] - size, size):
            c = img[y:y + size, x:x + size]
            if (c.mean(axis=2) < 200).mean() > 0.6:  # mostly tissue
                crops.append(c)
    assert len(crops) >= n
    return torch.from_numpy(np.stack(crops[:n])).permute(0, 3, 1, 2).float()


def _restain(x: torch.Tensor, od_scale: tuple[float, float, float]) -> torch.Tensor:
    """The same tissue as if stained/scanned differently: channel-wise optical density scaled."""
    od = -torch.log((x + 1) / 256) * torch.tensor(od_scale).view(1, 3, 1, 1)
    return (256 * torch.exp(-od) - 1).clamp(0, 255).round()


def test_macenko_brings_two_stainings_of_the_same_tissue_together() -> None:
    x = _tissue_crops()
    a, b = _restain(x, (1.25, 0.8, 1.1)), _restain(x, (0.8, 1.2, 0.9))
    before = (a - b).abs().mean()
    na, nb = macenko(a), macenko(b)
    after = (na - nb).abs().mean()
    assert na.shape == a.shape and torch.isfinite(na).all() and na.min() >= 0 and na.max() <= 255
    assert after < 0.4 * before, (float(before), float(after))
    # the colour statistics of both now agree, channel by channel
    np.testing.assert_allclose(na.mean(dim=(0, 2, 3)).numpy(), nb.mean(dim=(0, 2, 3)).numpy(), atol=8)


def test_macenko_leaves_background_untouched_and_runs_under_autocast() -> None:
    white = np.asarray(Image.open(shared("tiles", "histolab", "almost-white-1.png")).convert("RGB"))[:224, :224]
    w = torch.from_numpy(white.copy()).permute(2, 0, 1)[None].float()
    torch.testing.assert_close(macenko(w), w)
    x = _tissue_crops(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = macenko(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, macenko(x))
