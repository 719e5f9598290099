"""3D CNNs for volumes, built into the same :class:`~wsi_mil.encoders.image.ImageClassifier`
the 2D road uses (so training, Grad-CAM and checkpoints are shared):

* ``resnet18_3d``: a compact 3D ResNet-18 written here (BasicBlocks [2, 2, 2, 2], widths
  ``width`` x (1, 2, 4, 8), a stride-2 3x3x3 stem without max-pool, so 28³-128³ volumes keep
  a spatial map), trained from scratch.
* ``acs`` / ``inflate``: a 2D ImageNet backbone from the encoder registry (offline:
  EfficientNet-Lite0) turned 3D with its pretrained weights, so transfer works without a
  download. ACS (Yang et al. 2021, "Reinventing 2D convolutions for 3D images") splits
  each convolution's output channels in three and applies the 2D kernel in the axial,
  coronal and sagittal planes (kernel k x k x 1 in three orientations: the 2D cost, no
  new weights); ``inflate`` (I3D, Carreira & Zisserman 2017) repeats the k x k kernel k
  times along depth divided by k, so a volume constant along depth gives the 2D response.
  Batch-norm and pooling become their 3D forms with the same parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import ConfigError

VOLUME_ARCHS = ("resnet18_3d", "acs", "inflate")


# -- the compact 3D ResNet-18 ---------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.down = (nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.down(x), inplace=True)


class ResNet3D(nn.Module):
    """The timm-like interface :class:`ImageClassifier` expects: ``forward_features``,
    ``forward_head(pre_logits=True)``, ``num_features``, ``feature_info``, ``group_matcher``."""

    def __init__(self, width: int = 32, layers: tuple[int, ...] = (2, 2, 2, 2), in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        stages, cin, self.feature_info = [], width, [{"module": "stem", "reduction": 2, "num_chs": width}]
        for i, n in enumerate(layers):
            cout, stride = width * 2 ** i, 1 if i == 0 else 2
            stages.append(nn.Sequential(*[_Block(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]))
            self.feature_info.append({"module": f"stages.{i}", "reduction": 2 * 2 ** i, "num_chs": cout})
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # type: ignore[no-any-return]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)))

    def group_matcher(self, coarse: bool = True) -> dict[str, Any]:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}


# -- 2D -> 3D conversion ----------------------------------------------------------------------------
def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


class Conv3dFrom2d(nn.Module):
    """A pretrained ``nn.Conv2d`` (timm's ``Conv2dSame`` included) applied to volumes, as ACS
    or inflated convolutions (module docstring). Keeps the 2D weight as its parameter."""

    def __init__(self, conv: nn.Conv2d, how: str) -> None:
        super().__init__()
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
            raise ConfigError(f"cannot make a 3D convolution of a non-square {conv.kernel_size} kernel")
        groups, cin, cout = conv.groups, conv.in_channels, conv.out_channels
        if groups not in (1, cin) or (groups == cin and cout != cin):
            raise ConfigError(f"cannot convert a grouped convolution ({groups} groups, {cin} -> {cout} channels)")
        self.weight, self.bias = conv.weight, conv.bias
        self.how, self.k, self.s, self.d = how, conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        self.groups, self.depthwise = groups, groups > 1
        self.same = type(conv).__name__ == "Conv2dSame" or conv.padding == "same"
        self.pad = 0 if isinstance(conv.padding, str) else int(conv.padding[0])
        third = cout // 3
        self.splits = [(0, cout - 2 * third), (cout - 2 * third, cout - third), (cout - third, cout)]

    def _padding(self, x: torch.Tensor, kernel: tuple[int, ...]) -> list[int]:
        pads: list[int] = []
        for size, k in zip(reversed(x.shape[2:]), reversed(kernel), strict=True):  # F.pad: last dim first
            if self.same:
                pads += list(_same_pad(int(size), k, self.s, self.d))
            else:
                p = self.pad if k > 1 else 0
                pads += [p, p]
        return pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 1 or self.how == "inflate":
            w = self.weight.unsqueeze(2)
            if self.k > 1:
                w = w.repeat(1, 1, self.k, 1, 1) / self.k
            kernel: tuple[int, ...] = (self.k,) * 3
            return F.conv3d(F.pad(x, self._padding(x, kernel)), w, self.bias, self.s, 0, self.d, self.groups)
        outs = []
        for axis, (lo, hi) in enumerate(self.splits):
            if hi <= lo:
                continue
            w = self.weight[lo:hi].unsqueeze(2 + axis)  # 1 along depth (axial), height (coronal) or width (sagittal)
            kernel = tuple(int(v) for v in w.shape[2:])
            inp = x[:, lo:hi] if self.depthwise else x
            b = self.bias[lo:hi] if self.bias is not None else None
            outs.append(F.conv3d(F.pad(inp, self._padding(x, kernel)), w, b, self.s, 0, self.d,  # type: ignore[arg-type]
                                 hi - lo if self.depthwise else 1))
        return torch.cat(outs, dim=1)


class BatchNormND(nn.Module):
    """A 2D batch-norm (timm's BatchNormAct2d: with its activation) for any number of
    spatial dimensions, with the same parameters and running statistics."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.eps, self.momentum = bn.eps, bn.momentum if bn.momentum is not None else 0.1
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)  # type: ignore[operator]
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,  # type: ignore[arg-type]
                         self.momentum, self.eps)
        return self.act(self.drop(y))  # type: ignore[no-any-return]


class GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)))


def convert_to_3d(model: nn.Module, how: str) -> nn.Module:
    """Replace, in place, every 2D convolution, batch-norm and global pool of a 2D backbone
    by its 3D form (``how``: ``acs`` or ``inflate``); pretrained weights kept."""
    if how not in ("acs", "inflate"):
        raise ConfigError(f"conversion {how!r}: choose acs or inflate")
    replaced = 0
    for name, module in list(model.named_modules()):
        new: nn.Module | None = None
        if isinstance(module, nn.Conv2d):
            new = Conv3dFrom2d(module, how)
        elif isinstance(module, nn.BatchNorm2d):
            new = BatchNormND(module)
        elif type(module).__name__ in ("SelectAdaptivePool2d", "AdaptiveAvgPool2d"):
            new = GlobalPool()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            raise ConfigError(f"{type(module).__name__} at {name}: 2D pooling inside the backbone is not converted; "
                              "choose a backbone without it (efficientnet_lite0) or --arch resnet18_3d")
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    if not replaced:
        raise ConfigError("nothing to convert: the backbone has no 2D convolutions")
    return model


def build_volume_classifier(arch: str, n_outputs: int, *, backbone: str = "efficientnet_lite0",
                            weights: str | None = None, width: int = 32, dropout: float = 0.0
                            ) -> tuple[Any, dict[str, Any]]:
    """(classifier, provenance) for ``arch`` (module docstring)."""
    from wsi_mil.encoders.image import ImageClassifier, build_classifier

    if arch == "resnet18_3d":
        net = ResNet3D(width)
        model = ImageClassifier(net, (0.5,), (0.25,), n_outputs, dropout)
        return model, {"encoder": f"resnet18_3d (width {width}, from scratch)", "weights": None, "weights_sha256": None,
                       "dim": net.num_features}
    if arch not in VOLUME_ARCHS:
        raise ConfigError(f"--arch {arch!r}: choose one of {VOLUME_ARCHS}")
    model, info = build_classifier(backbone, n_outputs, weights=weights, dropout=dropout)
    convert_to_3d(model.backbone, arch)
    for p in model.parameters():  # the registry hands encoders out frozen; a converted network is fine-tuned whole
        p.requires_grad_(True)
    return model, {**info, "encoder": f"{info['encoder']} ({arch} 3D)", "converted": arch}
