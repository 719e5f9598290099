"""Clinical covariates fused with a MIL model's slide embedding.

``concat``: the covariate vector joins the slide embedding before a linear head. Every MIL
model here ends in a linear head on its embedding, so this is the model's own logits plus a
linear map of the covariates (initialised at zero: training starts from the image model).
``gated``: the covariates also scale each output of the image model through a gate
``2 * sigmoid(g(c))`` (1 at the start), so a covariate can strengthen or damp what the
slide says instead of only adding to it. Attention is the MIL model's, untouched."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


class CovariateFusion(nn.Module):
    def __init__(self, mil: nn.Module, width: int, n_outputs: int, mode: str = "concat") -> None:
        super().__init__()
        if mode not in ("concat", "gated"):
            raise ValueError(f"fusion {mode!r}: concat or gated")
        self.mil, self.mode = mil, mode
        self.covariate_head = nn.Linear(width, n_outputs)
        nn.init.zeros_(self.covariate_head.weight)
        nn.init.zeros_(self.covariate_head.bias)
        if mode == "gated":
            self.gate = nn.Linear(width, n_outputs)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        fit_inputs = getattr(mil, "fit_inputs", None)  # (linear_max standardises its inputs from the training patches)
        if fit_inputs is not None:
            self.fit_inputs = fit_inputs

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor, covariates: torch.Tensor,
                labels: torch.Tensor | None = None) -> Any:
        out = self.mil(x, mask, coords, labels=labels) if labels is not None else self.mil(x, mask, coords)
        logits, contribution = out.logits, out.contribution
        if self.mode == "gated":
            gate = 2 * torch.sigmoid(self.gate(covariates))
            logits = logits * gate
            contribution = None if contribution is None else contribution * gate[:, None, :]
        # (the patches' shares are the image's part of the logits; the covariates' term is not a patch's)
        return dataclasses.replace(out, logits=logits + self.covariate_head(covariates), contribution=contribution)
