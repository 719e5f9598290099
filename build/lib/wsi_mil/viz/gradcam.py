"""Grad-CAM and Grad-CAM++ for whole-image classifiers, boxes from thresholded maps, and
the exports a reader opens: a PNG overlay and a GeoJSON of high-activation regions.

Grad-CAM (Selvaraju et al. 2017): the last stage's activations A (C, h, w) weighted by the
spatial mean of d logit / d A, summed over channels, ReLU. Grad-CAM++ (Chattopadhay et
al. 2018): channel weights sum_ij alpha_ij ReLU(dY/dA_ij) with
alpha = g^2 / (2 g^2 + sum(A) g^3) (the closed form for an exponential output). Maps are
upsampled to the input (bilinear) and scaled to [0, 1] by their maximum (all zero when
nothing drives the output up). Multi-label and multi-class models give one map per
output.

Coordinates in boxes and GeoJSON are pixels of the image as read (origin top-left), so
QuPath shows them on the image file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

CAM_METHODS = ("gradcam", "gradcam++")


def cam_layer(model: Any, max_reduction: int = 16) -> str | None:
    """The backbone stage whose activations the maps weigh: the deepest stage with at most
    ``max_reduction`` times downsampling (timm's ``feature_info``), so that a 224-px input
    gives a 14 x 14 map rather than the last stage's 7 x 7; None (the last stage) when the
    backbone does not describe its stages."""
    info = getattr(model.backbone, "feature_info", None)
    stages = [f for f in (info or []) if isinstance(f, dict) and f.get("reduction", 64) <= max_reduction]
    return str(stages[-1]["module"]) if stages else None


def grad_cam(model: Any, x: torch.Tensor, output: int = 0, method: str = "gradcam", layer: str | None = None
             ) -> npt.NDArray[np.float32]:
    """One map (S, S) in [0, 1] for input ``x`` (1, 1, S, S) and logit ``output`` of an
    :class:`wsi_mil.encoders.image.ImageClassifier`, from the activations of backbone
    module ``layer`` (None: the last stage). A volume (1, 1, D, H, W) through a 3D CNN
    gives a (D, H, W) map (3D Grad-CAM: gradients averaged over the three axes)."""
    if method not in CAM_METHODS:
        raise ValueError(f"CAM method {method!r}: choose one of {CAM_METHODS}")
    model.eval()
    if layer is None:
        with torch.no_grad():
            fmap = model.feature_map(x)
        _check_spatial(fmap)
        fmap = fmap.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logit = model.head(model.pooled(fmap))[0, output]
            (g,) = torch.autograd.grad(logit, fmap)
    else:
        store: dict[str, torch.Tensor] = {}
        handle = model.backbone.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            with torch.enable_grad():
                logit = model(x.clone().float().requires_grad_(True))[0, output]
                fmap = store["a"]
                _check_spatial(fmap)
                (g,) = torch.autograd.grad(logit, fmap)
        finally:
            handle.remove()
    a = fmap.detach().float()
    g = g.float()
    space = tuple(range(2, a.ndim))  # (h, w), or (d, h, w) for a 3D CNN
    if method == "gradcam":
        w = g.mean(dim=space, keepdim=True)
    else:
        g2, g3 = g ** 2, g ** 3
        denom = 2 * g2 + a.sum(dim=space, keepdim=True) * g3
        alpha = g2 / torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
        w = (alpha * torch.relu(g)).sum(dim=space, keepdim=True)
    cam = torch.relu((w * a).sum(dim=1, keepdim=True))
    size = tuple(x.shape[2:])
    cam = torch.nn.functional.interpolate(cam, size=size, mode="bilinear" if len(size) == 2 else "trilinear",
                                          align_corners=False)[0, 0]
    peak = float(cam.max())
    return (cam / peak).numpy().astype(np.float32) if peak > 0 else np.zeros(size, np.float32)


def _check_spatial(fmap: torch.Tensor) -> None:
    if fmap.ndim not in (4, 5):
        raise ValueError("Grad-CAM needs a convolutional backbone (a (B, C, h, w) feature map); this one gives "
                         f"shape {tuple(fmap.shape)}")


def resize_map(cam: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """A map resized to the image's own (H, W) (bilinear)."""
    if cam.shape == shape:
        return cam
    t = torch.from_numpy(cam)[None, None]
    return torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def cam_boxes(cam: npt.NDArray[np.float32], threshold: float = 0.5, min_area_frac: float = 0.002
              ) -> list[dict[str, float]]:
    """Boxes around the connected regions of ``cam >= threshold`` (of the map's maximum),
    strongest first: ``{"x0", "y0", "x1", "y1", "peak", "mean"}`` in pixels (x1, y1
    exclusive). Regions smaller than ``min_area_frac`` of the image are dropped."""
    from skimage.measure import label, regionprops

    if not np.isfinite(cam).all() or cam.max() <= 0:
        return []
    mask = cam >= threshold * float(cam.max())
    boxes = []
    for r in regionprops(label(mask), intensity_image=cam):
        if r.area < min_area_frac * cam.size:
            continue
        y0, x0, y1, x1 = r.bbox
        boxes.append({"x0": float(x0), "y0": float(y0), "x1": float(x1), "y1": float(y1),
                      "peak": float(r.intensity_max), "mean": float(r.intensity_mean)})
    return sorted(boxes, key=lambda b: -b["peak"])


def region_features(cam: npt.NDArray[np.float32], threshold: float, *, name: str, probability: float
                    ) -> list[dict[str, Any]]:
    """GeoJSON features (QuPath annotations): one polygon per high-activation region, its
    outline traced at ``threshold`` of the maximum, with the region's activation and the
    image's probability as measurements."""
    from skimage.measure import find_contours, label, regionprops

    feats: list[dict[str, Any]] = []
    if cam.max() <= 0:
        return feats
    mask = cam >= threshold * float(cam.max())
    lab = label(mask)
    for r in regionprops(lab, intensity_image=cam):
        if r.area < 4:
            continue
        region = np.pad(lab == r.label, 1).astype(np.float32)
        contours = find_contours(region, 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        coords = [[float(c - 1 + 0.5), float(rw - 1 + 0.5)] for rw, c in ring]  # (row, col) -> (x, y) pixel centres
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]},
                      "properties": {"objectType": "annotation", "name": f"{name}: high activation",
                                     "classification": {"name": name},
                                     "measurements": {"peak activation": float(r.intensity_max),
                                                      "mean activation": float(r.intensity_mean),
                                                      "area px": float(r.area),
                                                      f"probability ({name})": float(probability)}}})
    return feats


def overlay_cam_png(path: Path, image: npt.NDArray[np.float32], maps: dict[str, npt.NDArray[np.float32]],
                    titles: dict[str, str], *, boxes: dict[str, list[dict[str, float]]] | None = None,
                    cmap: str = "inferno", opacity: float = 0.45, suptitle: str = "") -> Path:
    """The image beside one blended map per output (boxes drawn), colour bar in [0, 1]."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    from wsi_mil.viz.figures import _figure_module, _save
    from wsi_mil.viz.raster import colourise

    plt = _figure_module()
    grey = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.8), layout="constrained")
    axes = np.atleast_1d(axes)
    axes[0].imshow(grey)
    axes[0].set_title("image", fontsize=9)
    for ax, (name, cam) in zip(axes[1:], maps.items(), strict=True):
        rgb = colourise(cam, cmap).astype(np.float32)
        a = opacity * np.clip(cam, 0, 1)[..., None] ** 0.5
        ax.imshow((grey * (1 - a) + rgb * a).round().astype(np.uint8))
        for b in (boxes or {}).get(name, []):
            ax.add_patch(Rectangle((b["x0"] - 0.5, b["y0"] - 0.5), b["x1"] - b["x0"], b["y1"] - b["y0"],
                                   fill=False, ec="#00e5ff", lw=1.2))
        ax.set_title(titles.get(name, name), fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=list(axes), orientation="horizontal",
                 fraction=0.05, aspect=40).set_label("activation (fraction of the map's maximum)", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)
