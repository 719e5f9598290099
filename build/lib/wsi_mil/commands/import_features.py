"""`wsi-mil import-features`: CLAM / TRIDENT feature files -> wsi-mil feature stores.

Each ``.h5`` of the source folder is read and checked (:mod:`wsi_mil.data.foreign`) and
written to ``OUT/features/<slide>.h5``; a file that fails is reported and the others go on.
A store already imported from the same file (same SHA-256) and settings is kept (resume).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)


def run_import(source: Path, out_dir: Path, *, fmt: str = "auto", encoder: str | None = None,
               patch_size_level0: float | None = None, clam_patches: Path | None = None, mpp: float | None = None,
               progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from wsi_mil.data.bags import feature_store_attrs
    from wsi_mil.data.foreign import read_foreign, write_store
    from wsi_mil.io.atomic import write_json
    from wsi_mil.io.run_folder import file_digest

    if not source.is_dir():
        raise ConfigError(f"{source}: not a folder; give CLAM's h5_files/ or TRIDENT's features_<encoder>/ folder")
    files = sorted(p for p in source.iterdir() if p.suffix == ".h5")
    if not files:
        raise ConfigError(f"{source}: no .h5 feature files (CLAM: h5_files/; TRIDENT: features_<encoder>/)")
    from wsi_mil.io.run_folder import refuse_foreign_data_folder

    refuse_foreign_data_folder(out_dir, "import-features")
    if out_dir.resolve() == source.resolve() or source.resolve() in out_dir.resolve().parents:
        raise ConfigError(f"--out {out_dir} is inside the source folder {source}; choose another folder")
    # pass 1, features unread: every file's format, encoder and width; what concerns the whole folder is refused
    # here, before any store is written
    from wsi_mil.data.foreign import survey

    surveys, failed = [], []
    for path in files:
        try:
            surveys.append(survey(path, fmt, encoder))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unreadable file is that file's failure
            failed.append({"slide_id": path.stem, "file": str(path), "error": f"{type(exc).__name__}: {exc}"})
    encoders = sorted({v.encoder for v in surveys})
    if len(encoders) > 1:
        raise ConfigError(f"the files of {source} were made by different encoders ({', '.join(encoders)}); a model needs "
                          "features of one encoder: import each encoder's files into their own --out")
    dims = sorted({v.dim for v in surveys})
    if len(dims) > 1:
        odd = [v.path.name for v in surveys if v.dim != max(dims, key=[w.dim for w in surveys].count)]
        raise ConfigError(f"the files of {source} hold features of different widths ({', '.join(map(str, dims))}: "
                          f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}); one encoder gives one width")
    if any(v.fmt == "clam" for v in surveys) and clam_patches is None and patch_size_level0 is None:
        raise ConfigError("CLAM feature files do not record the patch size; give --clam-patches DIR (CLAM's patches/ "
                          "folder of coordinate files) or --patch-size-level0 PX")
    settings = json.dumps({"format": fmt, "encoder": encoder, "patch_size_level0": patch_size_level0,
                           "clam_patches": str(clam_patches.resolve()) if clam_patches else None, "mpp": mpp},
                          sort_keys=True)
    feats = out_dir / "features"
    feats.mkdir(parents=True, exist_ok=True)
    done, kept = [], []
    for v in tqdm(surveys, desc="importing", unit="slide", disable=not progress):
        path = v.path
        try:
            target = feats / path.name
            old = feature_store_attrs(target) if target.exists() else None
            recorded = (old or {}).get("import_settings")  # (read back as a dict: stores decode JSON attributes)
            recorded = json.dumps(recorded, sort_keys=True) if isinstance(recorded, dict) else recorded
            if old and old.get("source_sha256") == file_digest(path) and recorded == settings:
                kept.append(path.stem)
                continue
            foreign = read_foreign(path, v.fmt, encoder=encoder, patch_size_level0=patch_size_level0,
                                   clam_patches=clam_patches)
            write_store(foreign, path, feats, v.fmt, mpp=mpp, settings=settings)
            done.append({"slide_id": path.stem, "format": v.fmt, "patches": len(foreign.coords),
                         "encoder": foreign.encoder, "encoder_source": foreign.encoder_source,
                         "patch_level0_px": foreign.patch_level0_px, "geometry": foreign.geometry_source})
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            logger.error("%s: %s", path.name, exc)
            failed.append({"slide_id": path.stem, "file": str(path), "error": f"{type(exc).__name__}: {exc}"})
    mixed = encoders
    report = {"source": str(source), "format": fmt, "imported": done, "kept": kept, "failed": failed,
              "encoder": mixed[0] if mixed else None}
    write_json(out_dir / "import_report.json", report)
    return report
