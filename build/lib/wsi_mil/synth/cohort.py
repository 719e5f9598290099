"""A labelled cohort of generated slides in one call, with a manifest CSV.

Six presets:

* ``hard`` (the default): normal tissue is a mosaic of several real sources, the stain
  varies per slide, the tumour is colour-matched to each slide and regions go down to
  one 20x patch (150-400 µm, 1-2 regions); see ``wsi_mil.synth.mosaic``.
* ``easy``: one normal texture mirror-tiled, a light stain jitter, tumour regions of
  300-1200 µm in the tumour texture's own colours. A pipeline check: attention MIL
  separates it perfectly, because the tumour is a novelty, not because it learns
  histology.
* ``balanced``: the hard style with small lesions (100-250 µm, about 1 % of the tissue),
  each normal source shown by as many slides of each class (stratified), so no
  nuisance comes with the label by chance (in ``hard`` cohorts of 40 slides it often
  does: the median seed has a 25-point class gap for some source).
* ``confounded``: ``balanced`` with a nuisance planted on purpose: a ``site`` column whose
  site-B (its own stain) holds 80 % of the positive and 20 % of the negative slides; for
  testing the shortcut checks (``wsi_mil.eval.shortcuts``).
* ``multicentre``: four centres (:data:`CENTRES`), each with its own stain, scanner
  resolution (0.5 or 0.25 µm/px at the default --mpp, the same physical size) and normal
  tissue sources, the classes spread evenly over them; lesions of 200-500 µm.
* ``multicentre-confounded``: the same centres, centre-B holding 70 % of the positive and
  10 % of the negative slides (a confound site-held-out validation must expose).

Each cohort's README.md tabulates the classes against sources and sites.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.data.manifest import write_manifest
from wsi_mil.errors import ConfigError
from wsi_mil.io.atomic import write_text
from wsi_mil.synth.mosaic import TexturePool, default_pool
from wsi_mil.synth.slide import SlideSpec, write_slide
from wsi_mil.synth.textures import Texture, default_textures

logger = logging.getLogger(__name__)


#: Per preset: slide style, tumour diameter range (µm), regions per positive slide, and how
#: each slide's normal sources and stain are drawn: "independent" of the label (``hard`` and
#: ``easy``, kept as they were), or "balanced" across the classes (every normal source shown
#: by as many slides of each class; stains drawn per slide from one distribution). ``confound``
#: plants a nuisance on purpose: a site whose stain comes with the label.
PRESETS: dict[str, dict[str, Any]] = {
    "hard": {"style": "hard", "tumour_size_um": (150.0, 400.0), "tumour_regions": (1, 2), "assign": "independent"},
    "easy": {"style": "easy", "tumour_size_um": (300.0, 1200.0), "tumour_regions": (1, 3), "assign": "independent"},
    "balanced": {"style": "hard", "tumour_size_um": (100.0, 250.0), "tumour_regions": (1, 2), "assign": "balanced"},
    "confounded": {"style": "hard", "tumour_size_um": (100.0, 250.0), "tumour_regions": (1, 2), "assign": "balanced",
                   "confound": {"column": "site", "level": "site-B", "other": "site-A", "positive_share": 0.8,
                                "negative_share": 0.2, "stain_gain": (1.2, 1.1, 0.85)}},
}

#: the centres of the ``multicentre`` presets: each its own stain, scanner resolution (level-0 µm/px as a
#: factor of the cohort's --mpp; the slide keeps its physical size) and normal tissue sources (indices into
#: the pool, overlapping between centres). The ``site`` column names the centre, ``scanner_mpp`` its resolution.
CENTRES: dict[str, dict[str, Any]] = {
    "centre-A": {"stain_gain": (1.0, 1.0, 1.0), "mpp_factor": 1.0, "sources": (0, 1, 2)},
    "centre-B": {"stain_gain": (1.18, 1.06, 0.86), "mpp_factor": 0.5, "sources": (2, 3, 4)},
    "centre-C": {"stain_gain": (0.88, 0.96, 1.12), "mpp_factor": 1.0, "sources": (4, 5, 6)},
    "centre-D": {"stain_gain": (1.08, 0.9, 1.04), "mpp_factor": 0.5, "sources": (0, 5, 6)},
}
_MULTI = {"style": "hard", "tumour_size_um": (200.0, 500.0), "tumour_regions": (1, 2), "assign": "centres"}
PRESETS["multicentre"] = {**_MULTI, "centres": CENTRES}
PRESETS["multicentre-confounded"] = {**_MULTI, "centres": CENTRES,
                                     "centre_confound": {"level": "centre-B", "positive_share": 0.7,
                                                         "negative_share": 0.1}}


def centre_assignment(preset: dict[str, Any], positive: np.ndarray, rng: np.random.Generator) -> dict[int, str]:
    """Slide index -> centre. Without a confound the centres take turns within each class (each
    holds as many positives as the others, +-1); with one, its centre holds ``positive_share`` of
    the positive and ``negative_share`` of the negative slides, the others share the rest in turn."""
    names = list(preset["centres"])
    confound = preset.get("centre_confound")
    out: dict[int, str] = {}
    for cls in (True, False):
        members = [int(i) for i in rng.permutation(np.flatnonzero(positive == cls))]
        if confound:
            k = int(round((confound["positive_share"] if cls else confound["negative_share"]) * len(members)))
            out.update(dict.fromkeys(members[:k], confound["level"]))
            others = [n for n in names if n != confound["level"]]
            out.update({i: others[j % len(others)] for j, i in enumerate(members[k:])})
        else:
            out.update({i: names[j % len(names)] for j, i in enumerate(members)})
    return out


def cohort_settings(preset: str, *, n_slides: int, positive_fraction: float, size_px: int | tuple[int, int], mpp: float,
                    tumour_size_um: tuple[float, float] | None, tumour_regions: tuple[int, int] | None
                    ) -> tuple[str, tuple[float, float], tuple[int, int]]:
    """(style, tumour sizes, tumour regions) of a cohort, every option checked (ConfigError
    naming the option) before anything is written."""
    if preset not in PRESETS:
        raise ConfigError(f"cohort preset {preset!r}: choose one of {sorted(PRESETS)}")
    style = PRESETS[preset]["style"]
    tumour_size_um = tuple(tumour_size_um or PRESETS[preset]["tumour_size_um"])  # type: ignore[assignment]
    tumour_regions = tuple(tumour_regions or PRESETS[preset]["tumour_regions"])  # type: ignore[assignment]
    sizes = [size_px] if isinstance(size_px, int) else list(size_px)
    for ok, message in (
        (n_slides >= 1, f"--n-slides must be at least 1, not {n_slides}"),
        (0 <= positive_fraction <= 1, f"--positive-fraction must be in [0, 1], not {positive_fraction}"),
        (all(s >= 256 for s in sizes), f"--size must be at least 256 px, not {size_px}"),
        (np.isfinite(mpp) and mpp > 0, f"--mpp must be a positive number, not {mpp}"),
        (all(np.isfinite(tumour_size_um)) and 0 < tumour_size_um[0] <= tumour_size_um[1],
         f"--tumour-size-um must be MIN MAX with 0 < MIN <= MAX (µm), not {' '.join(map(str, tumour_size_um))}"),
        (0 <= tumour_regions[0] <= tumour_regions[1], f"tumour regions must be 0 <= MIN <= MAX, not {tumour_regions}"),
    ):
        if not ok:
            raise ConfigError(message)
    return style, tumour_size_um, tumour_regions  # type: ignore[return-value]


def make_cohort(
    out_dir: str | Path,
    *,
    n_slides: int,
    preset: str = "hard",
    positive_fraction: float = 0.5,
    size_px: int | tuple[int, int] = 8192,
    mpp: float = 0.5,
    tumour_size_um: tuple[float, float] | None = None,
    tumour_regions: tuple[int, int] | None = None,
    seed: int = 0,
    textures: tuple[Texture, Texture] | None = None,
    pool: TexturePool | None = None,
    progress: bool = False,
    sites: dict[str, tuple[float, float, float]] | None = None,
) -> Path:
    """Generate ``n_slides`` slides, ``round(n_slides * positive_fraction)`` with tumour.

    ``preset`` (``PRESETS``) sets the style and the tumour sizes unless they are given.
    ``textures`` are the easy style's (normal, tumour); ``pool`` the hard style's sources.
    ``sites`` (name -> stain gain, see ``SlideSpec.stain_gain``) spreads the slides of each
    class over sites with their own stain, recorded in a ``site`` column.
    Slides already generated with the same spec are kept (the call is resumable).

    Returns:
        Path of ``manifest.csv`` (slide_id, path, patient_id, label[, site]).
    """
    from tqdm import tqdm

    style, tumour_size_um, tumour_regions = cohort_settings(
        preset, n_slides=n_slides, positive_fraction=positive_fraction, size_px=size_px, mpp=mpp,
        tumour_size_um=tumour_size_um, tumour_regions=tumour_regions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = int(round(n_slides * positive_fraction))
    positive = np.zeros(n_slides, dtype=bool)
    positive[rng.permutation(n_slides)[:n_pos]] = True
    width, height = (size_px, size_px) if isinstance(size_px, int) else size_px
    # sites take turns within each class, so every site has positives and negatives
    names = list(sites or {})
    site_of: dict[int, str] = {}
    for cls in (True, False):
        for k, i in enumerate(np.flatnonzero(positive == cls)):
            site_of[int(i)] = names[k % len(names)] if names else ""
    if style == "hard" and pool is None:
        pool = default_pool()
    sources = _balanced_sources(PRESETS[preset], positive, rng, len(pool.normal) if pool is not None else 0)
    centre_of = centre_assignment(PRESETS[preset], positive, rng) if PRESETS[preset].get("centres") else {}
    confound = PRESETS[preset].get("confound")
    if confound:  # a site whose stain comes with the label, on purpose
        sites = {confound["other"]: (1.0, 1.0, 1.0), confound["level"]: tuple(confound["stain_gain"])}
        for cls, share in ((True, confound["positive_share"]), (False, confound["negative_share"])):
            members = rng.permutation(np.flatnonzero(positive == cls))
            k = int(round(share * len(members)))
            site_of.update({int(i): confound["level"] if j < k else confound["other"] for j, i in enumerate(members)})
    normal, tumour = (textures or default_textures()) if style == "easy" else (None, None)
    rows = []
    kept = 0
    for i in tqdm(range(n_slides), desc="generating slides", unit="slide", disable=not progress):
        slide_id = f"synth-{seed:03d}-{i:04d}"
        centre = PRESETS[preset]["centres"][centre_of[i]] if centre_of else None
        regions = int(rng.integers(tumour_regions[0], tumour_regions[1] + 1)) if positive[i] else 0
        if centre is not None:  # the centre's stain, scanner resolution (same physical size) and tissue sources
            f = float(centre["mpp_factor"])
            spec = SlideSpec(
                width_px=int(round(width / f)), height_px=int(round(height / f)), mpp=mpp * f, seed=seed * 100_003 + i,
                tumour_regions=regions, tumour_size_um=tumour_size_um, style=style,  # type: ignore[arg-type]
                stain_gain=tuple(centre["stain_gain"]),  # type: ignore[arg-type]
                normal_sources=tuple(sorted(int(v) for v in rng.choice(centre["sources"], 2, replace=False))))
        else:
            spec = SlideSpec(
                width_px=width, height_px=height, mpp=mpp, seed=seed * 100_003 + i,
                tumour_regions=regions, tumour_size_um=tumour_size_um, style=style,  # type: ignore[arg-type]
                stain_gain=tuple(sites[site_of[i]]) if sites else (1.0, 1.0, 1.0),  # type: ignore[arg-type]
                normal_sources=sources.get(i),
            )
        path = out_dir / f"{slide_id}.tiff"
        if _up_to_date(path, spec):
            kept += 1
        else:
            write_slide(path, spec, normal=normal, tumour=tumour, pool=pool)
        row: dict[str, Any] = {"slide_id": slide_id, "path": path.name, "patient_id": f"patient-{seed:03d}-{i:04d}",
                               "label": int(positive[i])}
        if sites:
            row["site"] = site_of[i]
        if centre is not None:
            row["site"], row["scanner_mpp"] = centre_of[i], spec.mpp
        rows.append(row)
    manifest = write_manifest(out_dir / "manifest.csv", rows)
    logger.info("%d slide(s) generated, %d already up to date (same spec)", n_slides - kept, kept)
    write_text(out_dir / "README.md", cohort_readme(out_dir, rows, preset=preset, seed=seed))
    return manifest


def _balanced_sources(preset: dict[str, Any], positive: np.ndarray, rng: np.random.Generator,
                      n_sources: int) -> dict[int, tuple[int, ...]]:
    """Slide index -> the normal sources it shows. "balanced": within each class, slides
    take 2 and 3 sources in turn, read off a cycle of all sources (its order drawn per
    class), so every source is shown by as many slides of one class as of the other (+-1,
    and so in any first k slides of each class); the combinations themselves differ
    between the classes, and each slide draws its own stain. (Sharing a slide's whole
    recipe with one slide of the other class, as matched pairs, made the pair itself
    learnable: with one of a pair in the test set, every model ranked the test set
    inverted, AUC 0.2.) "independent" (``hard``, ``easy``): none, each slide draws its own
    (the random numbers of those presets are not touched: they stay reproducible)."""
    if preset.get("assign") != "balanced":
        return {}
    out: dict[int, tuple[int, ...]] = {}
    for members in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        cycle = rng.permutation(n_sources)
        at = 0
        for j, i in enumerate(members):
            k = 2 + j % 2
            out[int(i)] = tuple(sorted(int(cycle[(at + t) % n_sources]) for t in range(k)))
            at += k
    return out


def cohort_readme(out_dir: Path, rows: list[dict[str, Any]], *, preset: str, seed: int) -> str:
    """The cohort's README: its preset and, per class, how many slides hold each normal
    source, tumour source and site (from each slide's json): a confound is seen here."""
    from collections import Counter

    counts: dict[str, Counter[tuple[str, int]]] = {"normal source": Counter(), "tumour source": Counter(),
                                                    "site": Counter()}
    n = Counter(int(r["label"]) for r in rows)
    for r in rows:
        label = int(r["label"])
        try:
            drawn = json.loads((out_dir / (Path(r["path"]).stem + ".json")).read_text()).get("sources", {})
        except (OSError, ValueError):
            drawn = {}
        for src in drawn.get("normal_sources", []):
            counts["normal source"][(src, label)] += 1
        if drawn.get("tumour_source"):
            counts["tumour source"][(drawn["tumour_source"], label)] += 1
        if r.get("site"):
            counts["site"][(r["site"], label)] += 1
    p = PRESETS[preset]
    lines = [f"# Generated cohort: preset `{preset}`, seed {seed}", "",
             f"{len(rows)} slides, {n[1]} with tumour ({p['tumour_regions'][0]}-{p['tumour_regions'][1]} region(s)); "
             f"normal sources {'balanced across the classes (each shown by as many slides of each class)' if p.get('assign') == 'balanced' else 'drawn per slide from its centre' + chr(39) + 's sources' if p.get('assign') == 'centres' else 'drawn per slide, independently of the label'}; stain drawn per slide"
             + (f"; **confounded on purpose**: {p['confound']['level']} (its own stain) holds "
                f"{p['confound']['positive_share']:.0%} of the positive and {p['confound']['negative_share']:.0%} of "
                "the negative slides" if p.get("confound") else "")
             + (f"; {len(p['centres'])} centres, each with its own stain, scanner resolution and normal tissue "
                "sources (site, scanner_mpp columns)" if p.get("centres") else "")
             + (f"; **confounded on purpose**: {p['centre_confound']['level']} holds "
                f"{p['centre_confound']['positive_share']:.0%} of the positive and "
                f"{p['centre_confound']['negative_share']:.0%} of the negative slides" if p.get("centre_confound")
                else "") + ".", "",
             "Slides per class holding each source or site (a slide holds 2-3 normal sources):", "",
             "| kind | value | negative | positive |", "|---|---|---:|---:|"]
    for kind, c in counts.items():
        for value in sorted({v for v, _ in c}):
            lines.append(f"| {kind} | {value} | {c[(value, 0)]} | {c[(value, 1)]} |")
    return "\n".join(lines) + "\n"


def _up_to_date(path: Path, spec: SlideSpec) -> bool:
    meta = path.with_name(path.stem + ".json")
    if not (path.exists() and meta.exists()):
        return False
    try:
        return json.loads(meta.read_text()).get("spec") == json.loads(json.dumps(asdict(spec)))
    except (OSError, json.JSONDecodeError):
        return False
