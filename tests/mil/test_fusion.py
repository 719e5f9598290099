"""Covariates fused with a MIL model (wsi_mil/mil/fusion.py): at the start of training the fused model is the
image model (its added head and gate start at zero); concat adds a linear map of the covariates to the image
logits (what a linear head on [embedding, covariates] is), gated also scales them; attention is untouched;
linear_max's input standardisation stays reachable."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.mil import build_model
from wsi_mil.mil.fusion import CovariateFusion


@pytest.mark.parametrize("mode", ["concat", "gated"])
def test_fusion_starts_as_the_image_model_and_adds_or_gates_the_covariates(mode) -> None:
    torch.manual_seed(0)
    mil = build_model("abmil", 16, 2, hidden=8).eval()
    fused = CovariateFusion(mil, 3, 2, mode).eval()
    x, mask, coords = torch.randn(4, 10, 16), torch.ones(4, 10, dtype=torch.bool), torch.zeros(4, 10, 2)
    cov = torch.randn(4, 3)
    image = mil(x, mask, coords)
    out = fused(x, mask, coords, cov)
    torch.testing.assert_close(out.logits, image.logits)
    torch.testing.assert_close(out.attention, image.attention)
    with torch.no_grad():
        fused.covariate_head.weight.fill_(0.5)
        if mode == "gated":
            fused.gate.weight.fill_(0.3)
    out = fused(x, mask, coords, cov)
    added = cov @ torch.full((3, 2), 0.5)
    gate = 2 * torch.sigmoid(cov @ torch.full((3, 2), 0.3)) if mode == "gated" else torch.ones(4, 2)
    torch.testing.assert_close(out.logits, image.logits * gate + added)
    out.logits.sum().backward()
    assert fused.covariate_head.weight.grad is not None and any(p.grad is not None for p in mil.parameters())


def test_linear_max_keeps_its_input_standardisation_under_fusion() -> None:
    mil = build_model("linear_max", 8, 1)
    fused = CovariateFusion(mil, 2, 1)
    assert getattr(fused, "fit_inputs", None) is not None
    with pytest.raises(ValueError, match="concat or gated"):
        CovariateFusion(mil, 2, 1, "sum")
