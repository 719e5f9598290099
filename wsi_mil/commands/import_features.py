"""`wsi-mil import-features`: CLAM / TRIDENT feature files -> wsi-mil feature stores.

Each ``.h5`` of the source folder is read and checked (:mod:`wsi_mil.data.foreign`) and
written to ``OUT/features/<slide>.h5``; a file that fails is reported and the others go on.
A store already imported from the same file (same SHA-256) and settings is kept (resume).
"""

from __future__ import annotations

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
    from wsi_mil.data.foreign import detect_format, read_foreign, write_store
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
    feats = out_dir / "features"
    feats.mkdir(parents=True, exist_ok=True)
    done, kept, failed = [], [], []
    encoders: dict[str, str] = {}
    for path in tqdm(files, desc="importing", unit="slide", disable=not progress):
        try:
            kind = detect_format(path) if fmt == "auto" else fmt
            target = feats / path.name
            old = feature_store_attrs(target) if target.exists() else None
            if old and old.get("source_sha256") == file_digest(path) and old.get("imported_from") == kind and \
                    (encoder is None or old.get("encoder") == encoder):
                kept.append(path.stem)
                encoders[path.stem] = str(old.get("encoder"))
                continue
            foreign = read_foreign(path, kind, encoder=encoder, patch_size_level0=patch_size_level0,
                                   clam_patches=clam_patches)
            write_store(foreign, path, feats, kind, mpp=mpp)
            encoders[path.stem] = foreign.encoder
            done.append({"slide_id": path.stem, "format": kind, "patches": len(foreign.coords),
                         "encoder": foreign.encoder, "encoder_source": foreign.encoder_source,
                         "patch_level0_px": foreign.patch_level0_px, "geometry": foreign.geometry_source})
        except ConfigError:
            raise  # a setting every file needs (no encoder named, no patch size): said once, before more work
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            logger.error("%s: %s", path.name, exc)
            failed.append({"slide_id": path.stem, "file": str(path), "error": f"{type(exc).__name__}: {exc}"})
    mixed = sorted(set(encoders.values()))
    if len(mixed) > 1:
        raise ConfigError(f"the files of {source} were made by different encoders ({', '.join(mixed)}); a model needs "
                          "features of one encoder: import each encoder's folder into its own --out")
    report = {"source": str(source), "format": fmt, "imported": done, "kept": kept, "failed": failed,
              "encoder": mixed[0] if mixed else None}
    write_json(out_dir / "import_report.json", report)
    return report
