"""Writes tests/encoders/data/ctranspath_reference.safetensors: a small CTransPath (Swin-T layout with the
authors' convolutional stem, widths 16-128, two blocks per stage, random weights stored in float16) built by
timm 0.5.4 -- the timm the authors' release was written by -- and its output on a fixed input. The test in
tests/encoders/test_foundation.py loads the checkpoint through wsi-mil's recipe and must give that output.

Run with timm 0.5.4 first on the path (it is not the project's timm):
    pip install --no-deps --target /tmp/t054 timm==0.5.4
    PYTHONPATH=/tmp/t054 .venv/bin/python benchmarks/make_ctranspath_reference.py
The stem below is written from the authors' description (Xiyue-Wang/TransPath, ctran.py), not copied.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

assert timm.__version__ == "0.5.4", f"needs timm 0.5.4 (found {timm.__version__})"
import timm.models.swin_transformer as swin  # noqa: E402


class AuthorsConvStem(nn.Module):
    """The authors' stem as their timm fork called it: flattened (B, N, C) tokens."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, flatten=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        a, b, layers = in_chans, embed_dim // 8, []
        for _ in range(2):
            layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
            a, b = b, b * 2
        layers.append(nn.Conv2d(a, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


swin.PatchEmbed = AuthorsConvStem  # what the authors' fork does (embed_layer=ConvStem)
torch.manual_seed(0)
model = swin.SwinTransformer(img_size=224, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=0)
with torch.no_grad():
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            if "running_var" in name or name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
                t.uniform_(0.5, 1.5)
            elif "relative_position_bias_table" in name or "running_mean" in name or name.endswith("bias"):
                t.normal_(0, 0.2)
            t.copy_(t.half().float())  # (stored in float16: the output is of the stored values)
model.eval()
x = torch.from_numpy(__import__("numpy").random.default_rng(3).normal(size=(2, 3, 224, 224)).astype("float32"))
with torch.no_grad():
    out = model(x)
state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
assert "layers.0.downsample.reduction.weight" in state and "patch_embed.proj.6.weight" in state  # the published layout
target = Path(__file__).resolve().parents[1] / "tests" / "encoders" / "data" / "ctranspath_reference.safetensors"
save_file({**{f"model.{k}": v.contiguous() for k, v in state.items()}, "reference.input_seed": torch.tensor([3]),
           "reference.output": out.contiguous()}, str(target))
print(f"{target}: {sum(v.numel() for v in state.values())} values, output {tuple(out.shape)}")
