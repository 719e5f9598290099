"""Weights-only checkpoints: ``<name>.safetensors`` (tensors) + ``<name>.json`` (how to
build the model). Nothing pickled is written or read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_mil.errors import ConfigError


def save_model(path_stem: Path, model: nn.Module, spec: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    from wsi_mil.io.atomic import atomic_path, write_text

    weights = path_stem.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_text(path_stem.with_suffix(".json"), json.dumps(spec, indent=2) + "\n")
    return weights


def load_model(path_stem: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from its JSON spec and load its safetensors weights (strict)."""
    from safetensors.torch import load_file

    from wsi_mil.mil import build_model

    spec_path, weights = path_stem.with_suffix(".json"), path_stem.with_suffix(".safetensors")
    if not spec_path.exists() or not weights.exists():
        raise ConfigError(f"no model at {path_stem} (need {spec_path.name} and {weights.name})")
    try:
        spec = json.loads(spec_path.read_text())
        args = dict(spec.get("model_args", {}))
        if spec["model"] == "max" and "smooth" not in args and spec.get("training_revision", 0) < 4:
            args["smooth"] = 0.0  # trained before max pooling became a smooth maximum: the hard maximum
        if spec["model"] == "transmil" and "readout" not in args and spec.get("training_revision", 0) < 5:
            args["readout"] = "attention"  # trained when the attention readout was transmil's default
        model = build_model(spec["model"], spec["in_dim"], spec["n_outputs"], **args)
        if spec.get("covariates"):  # fused with clinical covariates (wsi_mil.mil.fusion)
            from wsi_mil.data.covariates import CovariateEncoder
            from wsi_mil.mil.fusion import CovariateFusion

            width = CovariateEncoder.from_dict(spec["covariates"]).width
            model = CovariateFusion(model, width, spec["n_outputs"], spec.get("fusion", "concat"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{spec_path}: not a readable model description ({type(exc).__name__}: {exc}); the run's "
                          "models/ folder is damaged: retrain (train-mil resumes at the first missing fold)") from exc
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ConfigError(f"{weights}: the weights file is damaged or not safetensors ({type(exc).__name__}: {exc}); "
                          "delete it and its .json and re-run train-mil, which retrains that fold") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights}: weights do not fit model {spec['model']!r} (missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}); a model trained by wsi-mil {spec.get('wsi_mil_version', '< 0.x')} with an "
                          "architecture this version no longer builds: retrain it (train-mil retrains such folds)")
    model.eval()
    return model, spec


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
