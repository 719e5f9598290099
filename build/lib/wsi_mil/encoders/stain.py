"""Test-time stain normalisation, run inside the extraction pipeline (on the device,
on the float RGB batch, before the encoder's mean/std normalisation).

Macenko et al. 2009, per patch: optical density OD = -ln((I + 1) / 256); tissue pixels
are those with OD > 0.15 in every channel; the two stain vectors are the extreme angles
(1st and 99th percentile) of the tissue OD projected on its two main eigenvectors; the
concentrations of both stains are rescaled so that their 99th percentiles match the
reference, and the patch is recomposed with the reference stain matrix. Patches with
too little tissue (under 5 % of pixels) are passed through unchanged, so background and
pen-free glass do not get invented stain.
"""

from __future__ import annotations

import torch

# Reference H&E stain matrix (columns: haematoxylin, eosin) and 99th-percentile
# concentrations: the values commonly used with Macenko's method.
REFERENCE_STAINS = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
REFERENCE_MAX_CONCENTRATION = (1.9705, 1.0308)
OD_THRESHOLD = 0.15
MIN_TISSUE_SHARE = 0.05


def _stain_matrix(od: torch.Tensor) -> torch.Tensor | None:
    """(N, 3) tissue OD -> (3, 2) stain matrix (haematoxylin first), or None if degenerate."""
    _, vecs = torch.linalg.eigh(torch.cov(od.T))
    plane = vecs[:, 1:3]  # the two largest eigenvalues (eigh sorts ascending)
    proj = od @ plane
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = torch.quantile(phi, torch.tensor([0.01, 0.99], device=od.device, dtype=od.dtype))
    v1 = plane @ torch.stack([torch.cos(lo), torch.sin(lo)])
    v2 = plane @ torch.stack([torch.cos(hi), torch.sin(hi)])
    stains = torch.stack([v1, v2], dim=1) if v1[0] > v2[0] else torch.stack([v2, v1], dim=1)
    stains = stains * torch.sign(stains.sum(dim=0, keepdim=True))  # OD vectors are positive
    stains = stains / stains.norm(dim=0, keepdim=True)
    return stains if torch.isfinite(stains).all() else None


def macenko(batch: torch.Tensor) -> torch.Tensor:
    """Float RGB (B, 3, H, W) in [0, 255] -> the same batch in the reference stains
    (computed in fp32 also under autocast)."""
    with torch.autocast(device_type=batch.device.type, enabled=False):
        return _macenko(batch.float())


def _macenko(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    ref = torch.tensor(REFERENCE_STAINS, device=x.device)
    ref_max = torch.tensor(REFERENCE_MAX_CONCENTRATION, device=x.device)
    for b in range(x.shape[0]):
        od = -torch.log((x[b].reshape(3, -1).T + 1.0) / 256.0)  # (N, 3)
        tissue = od[(od > OD_THRESHOLD).all(dim=1)]
        if tissue.shape[0] < MIN_TISSUE_SHARE * od.shape[0]:
            continue
        stains = _stain_matrix(tissue)
        if stains is None:
            continue
        conc = torch.linalg.lstsq(stains, od.T).solution  # (2, N)
        max_c = torch.quantile(conc, 0.99, dim=1)
        if not bool((max_c > 1e-6).all()):
            continue
        conc = conc * (ref_max / max_c)[:, None]
        rgb = 256.0 * torch.exp(-(ref @ conc)) - 1.0
        out[b] = rgb.clamp(0, 255).reshape(x[b].shape)
    return out


STAIN_METHODS = {"macenko": macenko}
