"""Volume heatmaps for review: a NIfTI map on the input's own voxel grid (same shape and
affine, so 3D Slicer / ITK-SNAP show it over the scan), and a PNG of three orthogonal
planes through the map's peak (axial, coronal, sagittal, map blended over the volume),
with the attention along the axis for slice-MIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt


def write_nifti_map(path: Path, heatmap: npt.NDArray[np.float32], affine: npt.NDArray[np.float64],
                    description: str = "") -> Path:
    """A float32 NIfTI of ``heatmap`` with ``affine`` (written atomically)."""
    import nibabel as nib

    from wsi_mil.io.atomic import atomic_path

    if not np.isfinite(heatmap).all():
        raise ValueError(f"{path.name}: non-finite heatmap values; nothing is written")
    img = nib.Nifti1Image(np.asarray(heatmap, np.float32), np.asarray(affine, np.float64))
    img.header["descrip"] = description[:79].encode()
    img.header.set_intent("estimate", name="wsi-mil map"[:15])
    body = img.to_bytes()
    if path.name.endswith(".gz"):
        import gzip

        body = gzip.compress(body, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)
    return path


def _planes(a: npt.NDArray[np.float32], at: tuple[int, int, int]) -> list[npt.NDArray[np.float32]]:
    """Axial (H x W at depth d), coronal (D x W at row h), sagittal (D x H at column w);
    superior up in the coronal and sagittal views."""
    d, h, w = at
    return [a[d], a[::-1, h, :], a[::-1, :, w]]


def orthogonal_png(path: Path, volume: npt.NDArray[np.float32], maps: dict[str, npt.NDArray[np.float32]],
                   titles: dict[str, str], *, attention: npt.NDArray[np.float32] | None = None, suptitle: str = "",
                   cmap: str = "inferno", opacity: float = 0.5) -> Path:
    """One row per map: the three planes through that map's peak, the map blended over the
    volume; a last panel plots the attention per slice when given."""
    from wsi_mil.viz.figures import _figure_module, _save
    from wsi_mil.viz.raster import colourise

    plt = _figure_module()
    rows = max(1, len(maps))
    cols = 3 + (attention is not None)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.1 * rows), layout="constrained", squeeze=False)
    vol = np.clip(volume, 0, 1)
    for r, (name, m) in enumerate(maps.items()):
        if m.max() > 0:
            d, h, w = (int(i) for i in np.unravel_index(int(np.argmax(m)), m.shape))
        else:  # an empty map: the planes through the centre
            d, h, w = (n // 2 for n in m.shape)
        peak = (d, h, w)
        for c, (img, hm, label) in enumerate(zip(_planes(vol, peak), _planes(np.clip(m, 0, 1), peak),
                                                 (f"axial {peak[0]}", f"coronal {peak[1]}", f"sagittal {peak[2]}"),
                                                 strict=True)):
            grey = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
            a = opacity * hm[..., None] ** 0.5
            axes[r, c].imshow((grey * (1 - a) + colourise(hm, cmap).astype(np.float32) * a).round().astype(np.uint8))
            axes[r, c].set_title(f"{titles.get(name, name)}\n{label}" if c == 0 else label, fontsize=8)
            axes[r, c].set_axis_off()
        if attention is not None:
            ax = axes[r, 3]
            ax.plot(np.arange(len(attention)), attention, color="#b2182b", lw=1.4)
            ax.axvline(peak[0], color="0.5", ls=":", lw=1)
            ax.set_xlabel("axial slice (inferior → superior)", fontsize=8)
            ax.set_ylabel("attention", fontsize=8)
            ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)
