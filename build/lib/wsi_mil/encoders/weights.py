"""Loading weights as weights only: tensors from .safetensors or .pth, never pickled code."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)

# Keys a feature extractor legitimately lacks or ignores: classifier heads.
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "head.fc.", "_fc.", "last_linear.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or a torch .pth/.pt/.bin file (``weights_only=True``).

    A checkpoint that wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``)
    is unwrapped; a ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    state: object  # a checkpoint holds anything until checked below
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for code objects, RuntimeError for junk
            raise ConfigError(
                f"--weights {path}: not a weights-only checkpoint ({type(exc).__name__}: {str(exc)[:200]}). "
                "Save plain tensors with torch.save(model.state_dict(), path) or use .safetensors"
            ) from exc
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--weights {path}: expected a mapping of parameter names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``, reporting missing/unexpected keys.

    Unexpected classifier-head keys are normal for a headless feature extractor and are
    only logged; any missing key, or a shape mismatch, is an error — a partially random
    encoder would silently produce meaningless features.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    head_only = [k for k in unexpected if k.startswith(_HEAD_PREFIXES)]
    other_unexpected = [k for k in unexpected if k not in head_only]
    if head_only:
        logger.info("%s: ignoring %d classifier-head tensor(s) (%s ...)", source, len(head_only), head_only[0])
    if missing or mismatched or other_unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show(missing)}")
        if other_unexpected:
            parts.append(f"{len(other_unexpected)} unexpected key(s): {show(other_unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {show(mismatched)}")
        raise ConfigError(f"weights from {source} do not fit the model: " + "; ".join(parts)
                          + ". Check that --encoder names the architecture these weights were trained for")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
