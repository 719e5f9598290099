"""Per-stage configuration: dataclasses with defaults and help, loaded from YAML recipes.

Precedence: dataclass defaults < recipe file (``--config pipelines/x.yaml``) < flags
given on the command line. Unknown keys are refused so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil import choices
from wsi_mil.choices import described, names
from wsi_mil.errors import ConfigError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TileConfig:
    """Settings of ``wsi-mil tile``."""

    mpp: float = _opt(None, "target resolution in µm/px of the patches (0.5 ≈ 20x, 0.25 ≈ 40x, 1.0 ≈ 10x); default: "  # type: ignore[assignment]
                            "the --encoder's training resolution, else 0.5")
    encoder: str | None = _opt(None, "the encoder the patches are for (extract-features --list-encoders): --mpp defaults "
                                     "to the resolution it was trained at, and a --mpp that differs is warned about")
    patch_size: int = _opt(256, "patch side in pixels at the target resolution")
    stride: int | None = _opt(None, "grid step in pixels at the target resolution (default: patch size, no overlap)")
    overlap: float = _opt(0.0, "overlap between neighbouring patches as a fraction of the patch size (alternative to --stride)")
    min_tissue: float = _opt(0.5, "keep a patch when at least this fraction of it is tissue")
    slide_mpp: float | None = _opt(None, "override every slide's level-0 µm/px (for slides without it in their metadata)")
    tissue_mpp: float = _opt(16.0, "resolution (µm/px) of the thumbnail used for tissue detection (a pyramid level reduced by a whole "
                                   "factor: the nearest to this, coarser where the thumbnail would exceed 4096 px); 16 is about "
                                   "CLAM's segmentation level on a 40x slide, 4-8 follows tissue edges more closely at 2-4x the cost")
    saturation_min: float = _opt(0.06, "lowest HSV-saturation threshold for tissue (Otsu is clamped to [min, max])")
    saturation_max: float = _opt(0.15, "highest HSV-saturation threshold for tissue")
    min_tissue_area_um2: float = _opt(20_000.0, "drop tissue pieces smaller than this (µm²)")
    max_hole_area_um2: float = _opt(100_000.0, "fill holes inside tissue smaller than this (µm²)")
    reject_pen: bool = _opt(True, "exclude pen/marker ink and its blurred fringe from tissue")
    save_patches: bool = _opt(False, "also store JPEG-compressed patch pixels")
    jpeg_quality: int = _opt(90, "JPEG quality of stored patches (1-100)")
    format: str = _opt("h5", "store format: h5 (CLAM-compatible) or zarr", choices=names(choices.STORE_FORMATS))
    chunk_patches: int = _opt(512, "patches per pixel-extraction task sent to a worker")
    qc: bool = _opt(True, "write a QC PNG per slide (thumbnail, tissue outline, patch grid)")
    full_hash: bool = _opt(False, "record the SHA-256 of every slide file's whole content (reads every byte; by "
                                  "default a SHA-256 of the file size and 64 evenly spaced 64 KiB blocks is recorded)")
    annotations: str | None = _opt(None, "a folder of annotation files, one per slide: <slide_id>.geojson (QuPath's GeoJSON "
                                         "export) or <slide_id>.xml (ASAP XML, the CAMELYON layout), in level-0 pixels; each "
                                         "patch's overlap with each class is stored beside its coordinates")
    include: str | None = _opt(None, "annotation classes to tile inside only, comma-separated (e.g. Tumor): tissue outside "
                                     "them is left out (with --annotations, or the manifest's annotations column naming "
                                     "each slide's file; every slide then needs its file)")
    exclude: str | None = _opt(None, "annotation classes to leave out, comma-separated (e.g. Pen,Out of focus), with "
                                     "--annotations; every slide then needs its file (an empty one: nothing drawn)")

    def include_list(self) -> list[str]:
        return [c.strip() for c in (self.include or "").split(",") if c.strip()]

    def exclude_list(self) -> list[str]:
        return [c.strip() for c in (self.exclude or "").split(",") if c.strip()]

    def __post_init__(self) -> None:
        if self.encoder is not None:
            from wsi_mil.encoders.registry import check_encoder_name, encoder_mpp

            check_encoder_name(self.encoder)
            if self.mpp is None and encoder_mpp(self.encoder) is None:
                raise ConfigError(f"--encoder {self.encoder}: its training resolution is not recorded; give --mpp")
        if self.mpp is None:  # (resolved here: what is recorded and hashed is the resolution used)
            object.__setattr__(self, "mpp", (encoder_mpp(self.encoder) if self.encoder else None) or 0.5)
        _check_choices(self)  # (an infinite size or resolution would fail deep inside a slide's tiling)
        checks = [
            (self.mpp > 0, "--mpp must be positive"),
            (self.patch_size >= 8, "--patch-size must be at least 8"),
            (self.stride is None or self.stride >= 1, "--stride must be positive"),
            (0.0 <= self.overlap < 1.0, "--overlap must be in [0, 1)"),
            (self.stride is None or self.overlap == 0.0, "give --stride or --overlap, not both"),
            (0.0 <= self.min_tissue <= 1.0, "--min-tissue must be in [0, 1]"),
            (self.slide_mpp is None or self.slide_mpp > 0, "--slide-mpp must be positive"),
            (self.tissue_mpp > 0, "--tissue-mpp must be positive"),
            (0 <= self.saturation_min <= self.saturation_max <= 1, "need 0 <= saturation-min <= saturation-max <= 1"),
            (1 <= self.jpeg_quality <= 100, "--jpeg-quality must be in 1..100"),
            (self.format in ("h5", "zarr"), "--format must be h5 or zarr"),
            (self.chunk_patches >= 1, "--chunk-patches must be positive"),
            (not set(self.include_list()) & set(self.exclude_list()),
             f"--include and --exclude both name {sorted(set(self.include_list()) & set(self.exclude_list()))}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def stride_px(self) -> int:
        if self.stride is not None:
            return self.stride
        return max(1, int(round(self.patch_size * (1.0 - self.overlap))))

    def tissue_params(self) -> Any:
        from wsi_mil.tiling.tissue import TissueParams

        return TissueParams(
            saturation_min=self.saturation_min,
            saturation_max=self.saturation_max,
            reject_pen=self.reject_pen,
            min_tissue_area_um2=self.min_tissue_area_um2,
            max_hole_area_um2=self.max_hole_area_um2,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RecipeSection(dict):  # type: ignore[type-arg]
    """One section of a YAML recipe (option -> value) that knows where it came from, so a
    bad key or value is named with its file and section."""

    origin: str = "recipe"


def _closest(word: str, names: Any) -> str:
    """' (did you mean X?)' when ``word`` is close to one of ``names``, else ''."""
    import difflib

    by_lower = {str(n).lower(): str(n) for n in names}
    match = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def load_recipe(path: str | Path, section: str) -> dict[str, Any]:
    """Read one stage's section (e.g. ``tile``) of a YAML recipe. Every top-level key must
    be a known section (a misspelt one is an error naming the closest), and the asked
    section must be there: a recipe is never silently ignored."""
    import yaml

    class _Loader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
        without a word)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(f"recipe {path}: {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                      "keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"recipe {path}: cannot read it ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping with a '{section}:' section")
    known = sorted(recipe_sections())
    unknown = [str(k) for k in data if str(k) not in known]
    if unknown:
        raise ConfigError(f"recipe {path}: unknown section {unknown[0]!r}{_closest(unknown[0], known)}; the sections "
                          f"are {', '.join(known)}")
    if section not in data:
        raise ConfigError(f"recipe {path} has no '{section}:' section (it has {', '.join(map(str, data)) or 'none'}); "
                          f"this command reads '{section}:'")
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"recipe {path}: '{section}' must be a mapping of option: value")
    out = RecipeSection({str(k).replace("-", "_"): v for k, v in body.items()})
    out.origin = f"recipe {path}, section '{section}'"
    return out


def _field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional) of a config field from its annotation."""
    import types
    import typing

    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
        return base, type(None) in args
    return hint, False


def check_choice(option: str, value: Any, choices: Any) -> None:
    """The one message for a value outside an option's choices, from a flag, a recipe or code."""
    if value not in choices:
        raise ConfigError(f"{option} {value!r}: invalid choice; choose from {', '.join(map(str, choices))}"
                          f"{_closest(value, choices)}")


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """A recipe value checked against the option's type (YAML reads ``1e-3`` as text:
    numbers written so are converted) and its choices."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    base, optional = _field_type(cls, name)
    option = f"{where}{name}" if where else f"--{name.replace('_', '-')}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{option}: a value is needed (blank is not allowed; default {f.default!r})")
    import typing

    if isinstance(value, dict) and f.metadata.get("mapping"):  # a recipe's {key: value, ...}: key=value,...
        value = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in value.items())
    if typing.get_origin(base) is tuple:  # a list of values (--formats png tiff; a YAML list)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{option} {value!r}: expected a list of values")
        if not items:
            raise ConfigError(f"{option}: give at least one value")
        element = typing.get_args(base)[0]
        n = f.metadata.get("nargs")
        if isinstance(n, int) and len(items) != n:
            raise ConfigError(f"{option} {value!r}: expected {n} values")
        return tuple(_coerce_one(element, f, v, option) for v in items)
    return _coerce_one(base, f, value, option)


def _coerce_one(base: Any, f: Any, value: Any, option: str) -> Any:
    """One value of an option: its type, then its choices."""
    wanted = {bool: "true or false", int: "a whole number", float: "a number"}.get(base, "text")
    bad = ConfigError(f"{option} {value!r}: expected {wanted}")
    if isinstance(value, bool) != (base is bool) or not isinstance(value, bool | int | float | str):
        raise bad  # YAML's true / false only for a switch, and never for a number or text
    if base in (int, float):
        try:
            number = float(value)
        except ValueError:
            raise bad from None
        if base is int and (not math.isfinite(number) or number != int(number)):
            raise bad
        value = int(number) if base is int else number
    elif base is str:
        value = str(value)
    if "choices" in f.metadata:
        check_choice(option, value, f.metadata["choices"])
    return value


def build_config(cls: type, *, recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Instantiate a config dataclass from a recipe and CLI overrides. Before any work: an
    unknown key is an error naming the closest valid one, and every value is checked
    against its option's type and choices (the same list and message as the flag's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    origin = getattr(recipe, "origin", "recipe")
    for source, mapping in ((origin, recipe or {}), ("command line", overrides or {})):
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown option {unknown[0]!r}{_closest(unknown[0], names)}; valid options "
                              f"are {', '.join(sorted(names))}")
        if source == "command line":
            values.update({k: _coerce(cls, k, v, "") for k, v in mapping.items() if v is not None})
        else:
            values.update({k: _coerce(cls, k, v, f"{source}: ") for k, v in mapping.items()})
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def _check_choices(obj: Any) -> None:
    """Every option with a list of choices holds one of them, and every number is finite (configs made in
    code too): ``--lr nan`` or ``--lr inf`` passes every "> 0" test and fails mid-run instead."""
    for f in dataclasses.fields(obj):
        flag = f"--{f.name.replace('_', '-')}"
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if "choices" in f.metadata and v is not None:  # (an optional setting left unset)
                check_choice(flag, v, f.metadata["choices"])
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{flag} must be a finite number, not {v}")


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of ``wsi-mil extract-features``."""

    encoder: str = _opt("efficientnet_lite0", "encoder: a registered name (efficientnet_lite0: offline ImageNet weights) or any timm model name, e.g. resnet50.a1_in1k; MODEL@STAGE cuts it after a stage and average-pools (resnet50.tv_in1k@layer3: 1024-d)")
    weights: str | None = _opt(None, "local weights file (.safetensors or .pth state dict) for the encoder; loaded as weights only")
    random_init: bool = _opt(False, "allow a randomly initialised encoder (tests and debugging only; recorded in every store)")
    source: str = _opt("auto", "where pixels come from: slide (read by coordinates), store (JPEG pixels saved by tile --save-patches), auto", choices=names(choices.PIXEL_SOURCES))
    batch_size: int = _opt(32, "patches per forward pass")
    readers: int = _opt(1, "background reader processes (each with its own slide handle); 0 reads in the main process")
    prefetch: int = _opt(4, "batches each reader prepares ahead")
    precision: str = _opt("auto", "auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, bf16 or fp16", choices=names(choices.PRECISIONS))
    channels_last: bool = _opt(True, "run the encoder in channels-last memory format (faster convolutions on CPU and GPU)")
    compile: bool = _opt(False, "torch.compile the encoder (slow start, faster steady state on GPU)")
    threads: int | None = _opt(None, "intra-op threads of the encoder on CPU (default: PyTorch's choice, one per core)")
    devices: str = _opt("auto", "auto (every CUDA GPU, else cpu), cpu, cuda, or a list such as cuda:0,cuda:1; slides are sharded across devices, one process each")
    chunk_batches: int = _opt(8, "batches per resumable chunk written to disk")
    format: str = _opt("h5", "feature store format: h5 (CLAM-compatible) or zarr", choices=names(choices.STORE_FORMATS))
    tta_flips: bool = _opt(False, "test-time augmentation: average features over the patch and its horizontal and vertical flips")
    stain_norm: str = _opt("none", "test-time stain normalisation on the device, in the same pass: none or macenko (to a reference H&E)", choices=names(choices.STAIN_NORMS))

    def __post_init__(self) -> None:
        _check_choices(self)
        checks = [
            (self.batch_size >= 1, "--batch-size must be positive"),
            (self.readers >= 0, "--readers must be 0 or more"),
            (self.prefetch >= 1, "--prefetch must be positive"),
            (self.threads is None or self.threads >= 1, "--threads must be positive"),
            (self.chunk_batches >= 1, "--chunk-batches must be positive"),
            (self.source in ("auto", "slide", "store"), "--source must be auto, slide or store"),
            (self.format in ("h5", "zarr"), "--format must be h5 or zarr"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def device_list(self) -> list[str]:
        """The devices to shard slides over."""
        import torch

        spec = self.devices.strip().lower()
        if spec == "auto":
            n = torch.cuda.device_count()
            return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
        if spec == "cuda":
            n = torch.cuda.device_count()
            if not n:
                raise ConfigError("--devices cuda: no CUDA GPU is visible; use --devices cpu")
            return [f"cuda:{i}" for i in range(n)]
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        for d in devices:
            if d == "cpu":
                continue
            if not d.startswith("cuda:") or not d[5:].isdigit():
                raise ConfigError(f"--devices: {d!r} is not cpu, cuda or cuda:N")
            if int(d[5:]) >= torch.cuda.device_count():
                raise ConfigError(f"--devices: {d} is not available ({torch.cuda.device_count()} CUDA GPU(s) visible)")
        return devices

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIL_MODELS = names(choices.MIL_MODELS)
#: What ``--select auto`` and an unset ``--lr`` (train-mil) become for a MIL model (others: best, 2e-4).
#: linear_max: a fixed schedule with weight averaging, chosen because early stopping on a few
#: validation slides picked chance-level epochs; lr 3e-3 chosen on out-of-fold AUC of the
#: 120-slide small-lesion cohort (1e-3: 0.86, 3e-3: 0.92, 1e-2: 0.91; benchmarks/bench_mil_small.py).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {"linear_max": {"select": "swa", "lr": 3e-3}}


@dataclass(frozen=True)
class CommonTrainConfig:
    """Settings every trainer shares (slides, images): task, splits, optimisation, evaluation."""

    task: str = _opt("auto", "auto (from the label columns: binary, multiclass or multilabel), or regression or survival "
                             "(said, never guessed)", choices=names(choices.TASKS))
    label: str | None = _opt(None, "label column to use when the manifest has several (default: every label column)")
    classes: str | None = _opt(None, "class names in order, comma-separated (negative first for binary), e.g. normal,tumour: "
                                     "the label values themselves, or names for the codes 0,1,...; any other value is an "
                                     "error (default: the manifest's '# classes:' line, else the values found)")
    min_class_slides: int = _opt(5, "fewest slides a class may have; a smaller class is an error naming its slides "
                                    "(a stray label value is usually a typo)")
    folds: int = _opt(5, "cross-validation folds over the development set (patient-level, stratified); 1 = one train/val split")
    test_fraction: float = _opt(0.2, "share of patients held out as the test set (0 = none; ignored with a manifest split column)")
    min_minority_share: float | None = _opt(None, "sample the test set so the minority class is at least this share (e.g. 0.5); metrics also at the true prevalence")
    epochs: int = _opt(50, "maximum epochs per fold")
    patience: int = _opt(10, "early stopping: epochs without validation improvement")
    monitor: str = _opt("auc", "validation metric for early stopping and model selection: auc (the task's score: AUC, R² "
                               "for regression, Harrell's C for survival) or loss", choices=names(choices.MONITORS))
    select: str = _opt("auto", "which weights a fold keeps: best (the epoch with the best --monitor on its validation "
                               "set, with early stopping), swa (every --epochs trained, the weights averaged over the "
                               "second half: a fixed schedule, not an epoch picked on a few validation slides) or auto "
                               "(swa for linear_max, best for the other models)",
                       choices=names(choices.SELECT))
    lr: float = _opt(2e-4, "AdamW learning rate (1 warm-up epoch, then cosine decay)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    imbalance: str = _opt("weighted", "class-imbalance handling: weighted loss, sampler (weighted sampling), focal, none", choices=names(choices.IMBALANCE))
    focal_gamma: float = _opt(2.0, "focal-loss gamma (with --imbalance focal)")
    dropout: float = _opt(0.25, "dropout in the instance embedding")
    threshold: str = _opt("youden", "decision threshold chosen on validation: youden, or sensitivity (see --target-sensitivity)", choices=names(choices.THRESHOLDS))
    target_sensitivity: float = _opt(0.9, "with --threshold sensitivity: the lowest validation sensitivity accepted")
    bootstrap: int = _opt(1000, "bootstrap resamples for the AUC confidence intervals")
    seed: int = _opt(0, "random seed (splits, initialisation, sampling)")
    device: str = _opt("auto", "auto (cuda when present), cpu, cuda or cuda:N")
    threads: int | None = _opt(None, "CPU threads for training and evaluation (default: 1 for bags of up to 4096 "
                                     "instances, where more threads only contend; else up to 4)")
    duplicates: str = _opt("refuse", "near-duplicate samples of different patients across train / validation / test: "
                                     "refuse (stop, listing them), merge (treat each duplicate group as one patient "
                                     "before splitting) or allow (train anyway; reported)", choices=names(choices.DUPLICATES))
    label_sources: str | None = _opt(None, "two manifest columns holding the label from different sources (e.g. "
                                           "abnormal_folder,finding_labels): their disagreements are reported")
    subgroups: str | None = _opt(None, "manifest columns for per-subgroup AUC / sensitivity / specificity with CIs, "
                                       "comma-separated (e.g. sex,age,view,site; numeric columns are banded by quartiles)")
    prevalence: float | None = _opt(None, "deployment prevalence for the audit's PPV / NPV (e.g. 0.02)")
    model_options: str | None = _opt(None, "the MIL aggregator's own settings, comma-separated key=value, e.g. "
                                           "heads=8,layers=1 for transmil or k_sample=16 for clam_sb (each model's "
                                           "settings and defaults: --list-models; in a recipe also a mapping, e.g. "
                                           "{layers: 1, heads: 8})", mapping=True)
    blank_patient: str = _opt("refuse", "a blank patient_id in a manifest whose other rows have one: refuse (stop, "
                                        "listing them: two samples of one patient could land in train and test) or "
                                        "own (each such sample is its own patient; counted in the report)",
                              choices=names(choices.BLANK_PATIENT))

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.prevalence is None or 0 < self.prevalence < 1, "--prevalence must be in (0, 1)"),
            (self.folds >= 1, "--folds must be 1 or more"),
            (0 <= self.test_fraction < 1, "--test-fraction must be in [0, 1)"),
            (self.min_minority_share is None or 0 < self.min_minority_share <= 0.5, "--min-minority-share must be in (0, 0.5]"),
            (self.epochs >= 1, "--epochs must be positive"),
            (self.patience >= 1, "--patience must be positive"),
            (self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be 0 or more"),
            (self.focal_gamma >= 0, "--focal-gamma must be 0 or more"),
            (0 < self.target_sensitivity <= 1, "--target-sensitivity must be in (0, 1]"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.min_class_slides >= 1, "--min-class-slides must be positive"),
            (self.threads is None or self.threads >= 1, "--threads must be positive"),
            (self.bootstrap >= 10, "--bootstrap must be 10 or more (resamples for the confidence intervals)"),
            (0 <= self.seed < 2**32, "--seed must be a whole number in [0, 2**32)"),
            (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
             "--device must be auto, cpu, cuda or cuda:N"),
        ]

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.select == "auto":  # resolved here, so the run records (and its identity holds) what was used
            model = self.schedule_model()
            object.__setattr__(self, "select", MODEL_DEFAULTS.get(model or "", {}).get("select", "best"))
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)
        if self.model_options:  # an unknown key or a bad value stops here, before any folder exists
            object.__setattr__(self, "model_options", self.canonical_model_options())
            self.try_model()

    def model_options_dict(self) -> dict[str, Any]:
        """``--model-options`` as the model's keyword arguments, each checked against the
        model's constructor (:func:`wsi_mil.mil.models.model_settings`) and typed by it."""
        if not self.model_options:
            return {}
        model = self.schedule_model()
        if model is None:
            raise ConfigError("--model-options sets a MIL aggregator's settings: this run has none (train-image "
                              "--mode mil or train-volume --mode slices have one)")
        from wsi_mil.mil.models import model_settings

        known = model_settings(model)
        out: dict[str, Any] = {}
        for item in self.model_options.split(","):
            key, eq, text = (s.strip() for s in item.partition("="))
            if not eq or not key or not text:
                raise ConfigError(f"--model-options {self.model_options!r}: give key=value pairs separated by commas, "
                                  "e.g. layers=1,heads=8")
            if key not in known:
                listed = ", ".join(f"{k} (default {d!r})" for k, (_, d) in known.items()) or "none"
                raise ConfigError(f"--model-options: {model} has no setting {key!r}; its settings: {listed}")
            if key in out:
                raise ConfigError(f"--model-options: {key} is given twice; keep one")
            kind = known[key][0]
            try:
                value: Any = {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
            except (KeyError, ValueError) as exc:
                wanted = {int: "a whole number", float: "a number", bool: "true or false"}.get(kind, "text")
                raise ConfigError(f"--model-options {key}={text}: give {wanted}") from exc
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--model-options {key}={text}: give a finite number")
            if kind is int and value < 1:
                raise ConfigError(f"--model-options {key}={text}: give a whole number of 1 or more")
            if kind is float and (value < 0 or ((key.endswith(("dropout", "_weight"))) and value > 1)):
                bound = "in [0, 1]" if key.endswith(("dropout", "_weight")) else "of 0 or more"
                raise ConfigError(f"--model-options {key}={text}: give a number {bound}")
            out[key] = value
        return out

    def canonical_model_options(self) -> str | None:
        """The options as the run records them: sorted, defaults left out (so ``heads=2,layers=1``,
        ``layers=1, heads=2`` and ``layers=1,heads=2,pos=grid`` are one run); None when nothing is left."""
        from wsi_mil.mil.models import model_settings

        opts = self.model_options_dict()
        model = self.schedule_model()
        known = model_settings(model) if model else {}
        kept = {k: v for k, v in sorted(opts.items()) if v != known[k][1]}
        return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kept.items()) or None

    def try_model(self) -> None:
        """Build the MIL model with these settings and run it on a small bag: settings that
        cannot work (heads that do not divide --hidden, a readout it does not have) are
        refused now, before any folder exists, not in the middle of a fold."""
        import torch

        from wsi_mil.mil.models import build_model

        model = self.schedule_model()
        if model is None:
            return
        args = {"hidden": getattr(self, "hidden", 256), "dropout": self.dropout, **self.model_options_dict()}
        try:
            net = build_model(model, 16, 2, **args).eval()
            coords = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, 6, 2)
            with torch.no_grad():
                net(torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool), coords * 256)
        except ConfigError as exc:
            raise ConfigError(f"--model-options {self.model_options}: {exc}") from exc
        except Exception as exc:
            raise ConfigError(f"--model-options {self.model_options}: {model} cannot run with these settings "
                              f"({type(exc).__name__}: {exc})") from exc

    def schedule_model(self) -> str | None:
        """The MIL model whose defaults ``--select auto`` follows (None: not a MIL model)."""
        return None

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: no CUDA GPU is visible; use --device cpu")
        return self.device

    def class_list(self) -> list[str] | None:
        return [c.strip() for c in self.classes.split(",")] if self.classes else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig(CommonTrainConfig):
    """Settings of ``wsi-mil train-mil``."""

    model: str = _opt("abmil", "MIL aggregator: abmil, gated_abmil (Ilse et al.), clam_sb, transmil, mean, max, dsmil (Li et al.), "
                               "linear_max (one linear score per patch, smooth maximum, fixed schedule: small lesions)", choices=names(choices.MIL_MODELS))
    allow_missing: bool = _opt(False, "train even when labelled slides have no usable feature store (they are listed "
                                      "in the report); without it such slides stop the run (exit 1)")
    bags_per_batch: int = _opt(None, "bags per optimisation step (padded, with masks); default 1, 16 for --task "  # type: ignore[assignment]
                                     "survival (the Cox likelihood compares the bags of a batch)")
    max_instances: int | None = _opt(4096, "random subset of at most this many instances per bag in training (full bags at evaluation)")
    lr: float | None = _opt(None, "AdamW learning rate (1 warm-up epoch, then cosine decay); default 2e-4, 3e-3 for "  # type: ignore[assignment]
                                  "linear_max")
    hidden: int = _opt(256, "width of the instance embedding (linear_max has none)")
    covariates: str | None = _opt(None, "manifest columns fused with the slide embedding, e.g. age,sex,stage: numbers "
                                        "standardised, other values one-hot, each with a missing indicator; the "
                                        "encoding is fitted on each fold's training slides and kept with its model")
    fusion: str = _opt("concat", "with --covariates: " + described(choices.FUSION), choices=names(choices.FUSION))
    targets: str | None = _opt(None, "several targets in one model (--task multitask, implied): COLUMN[:KIND] entries "
                                     "separated by commas, KIND one of auto (binary or multiclass from the values), "
                                     "binary, multiclass, regression; the word survival for label_time / label_event, "
                                     "e.g. label_subtype,label_grade:regression,survival. A blank cell masks that "
                                     "target for that slide")
    target_weights: str | None = _opt(None, "with --targets: each target's loss weight, in the same order (default 1 "
                                            "each); model selection follows the mean skill over chance with these weights")
    survival_loss: str = _opt("cox", "survival targets: " + described(choices.SURVIVAL_LOSSES),
                              choices=names(choices.SURVIVAL_LOSSES))
    time_bins: int | None = _opt(None, "with --survival-loss discrete: time intervals (edges at quantiles of the "
                                       "development slides' event times); default 4")
    regression_loss: str = _opt("huber", "regression targets: " + described(choices.REGRESSION_LOSSES),
                                choices=names(choices.REGRESSION_LOSSES))
    standardise_target: bool = _opt(True, "regression targets: train on the target standardised by the development "
                                          "slides' mean and sd (recorded with the models; predictions and figures "
                                          "stay in the target's units); off: the raw values")
    cache_bags: bool = _opt(True, "hold all bags in memory (reads each store once)")
    folds_by: str | None = _opt(None, "a manifest column of centres (site, scanner ...): folds never split one; "
                                      "leave-one-out when there are at most --folds of them, else grouped k-fold "
                                      "stratified on the label; needs --test-fraction 0 (every centre is held out "
                                      "once: the pooled out-of-fold figure is the site-held-out one)")
    random_comparison: bool = _opt(True, "with --folds-by: also train random patient-level folds of the same cohort "
                                         "(RUN/random_folds/, as many folds) and show their figure beside the "
                                         "site-held-out one, so the optimism gap is in the report (doubles the "
                                         "training time; off: --no-random-comparison)")
    bag: str = _opt("slide", "what one bag is: " + described(choices.BAGS) + "; predictions per patient",
                    choices=names(choices.BAGS))
    patient_max_instances: int | None = _opt(65536, "with --bag patient: a patient bag holding more patches keeps a "
                                                    "seeded sample of this many (recorded in the report); none: all")
    lesion_class: str = _opt("Tumor", "the annotation class whose drawn regions are the lesions attention is judged "
                                      "against (slides tiled with --annotations: patch AUC, Dice, FROC in the report)")

    def _checks(self) -> list[tuple[bool, str]]:
        return super()._checks() + [
            (self.bags_per_batch >= 1, "--bags-per-batch must be positive"),
            (self.time_bins is None or self.time_bins >= 2, "--time-bins must be 2 or more"),
            (not self.folds_by or self.test_fraction == 0,
             f"--folds-by {self.folds_by} holds out every centre once: there is no separate test set; add "
             "--test-fraction 0 (or leave --folds-by out)"),
            (not self.folds_by or self.min_minority_share is None, "--min-minority-share samples a test set; "
             "--folds-by has none"),
            (not self.folds_by or self.folds >= 2, f"--folds-by {self.folds_by} holds out each centre (or group of "
             "centres) once: --folds is the most groups, 2 or more"),
            (self.hidden >= 1, "--hidden must be positive"),
            (self.max_instances is None or self.max_instances >= 1, "--max-instances must be positive"),
            (self.patient_max_instances is None or self.patient_max_instances >= 1,
             "--patient-max-instances must be positive"),
        ]

    def __post_init__(self) -> None:
        from wsi_mil.tasks import KINDS

        if self.lr is None:  # the model's own default, recorded as the value used
            object.__setattr__(self, "lr", MODEL_DEFAULTS.get(self.model, {}).get("lr", 2e-4))
        self._resolve_targets()
        kind = KINDS.get(self.task)
        if self.fusion != "concat" and not self.covariates:
            raise ConfigError(f"--fusion {self.fusion} joins covariates: give --covariates too")
        if kind is not None and not kind.has_classes:  # (a regression or survival: options of classifiers refused)
            ignored = [flag for flag, used in (
                ("--imbalance " + self.imbalance, self.imbalance in ("sampler", "focal")),
                ("--threshold " + self.threshold, self.threshold != "youden"),
                ("--min-minority-share", self.min_minority_share is not None),
                ("--subgroups", bool(self.subgroups)), ("--prevalence", self.prevalence is not None)) if used]
            if ignored:
                raise ConfigError(f"--task {self.task} has no classes: {', '.join(ignored)} would be ignored; leave "
                                  f"{'them' if len(ignored) > 1 else 'it'} out")
        if kind is not None and self.targets:  # (a multi-task run batches as its most demanding target)
            from wsi_mil.tasks.multitask import parse_targets

            kind = max((KINDS[k] for _, k in parse_targets(self.targets) if k in KINDS),
                       key=lambda k: k.min_bags_per_batch, default=kind)
        self._refuse_unread_settings()
        survival = kind is not None and kind.loss_choice  # (a survival target: Cox or discrete time)
        discrete = survival and self.survival_loss == "discrete"  # (a likelihood per bag: one bag a step will do)
        if self.time_bins is not None and self.survival_loss != "discrete":
            raise ConfigError("--time-bins sets a discrete-time model's intervals: it goes with --survival-loss "
                              "discrete (the Cox loss has none)")
        if discrete and self.time_bins is None:  # (resolved here: what is recorded is the value used)
            object.__setattr__(self, "time_bins", 4)
        if self.bags_per_batch is None:  # (resolved here: what is recorded is the value used)
            object.__setattr__(self, "bags_per_batch", 1 if discrete or kind is None else kind.bags_per_batch)
        if kind is not None and not discrete and isinstance(self.bags_per_batch, int) and \
                self.bags_per_batch < kind.min_bags_per_batch:
            raise ConfigError(f"--task {kind.name} needs --bags-per-batch {kind.min_bags_per_batch} or more: "
                              f"{kind.why_batches}")
        super().__post_init__()

    def _refuse_unread_settings(self) -> None:
        """A setting of one kind of target (--survival-loss, --regression-loss ...) away from its default in a
        run with no such target is refused: it would be ignored."""
        from wsi_mil.tasks import KINDS

        kinds = [KINDS[self.task]] if self.task in KINDS else []  # (auto without --targets: a classifier)
        if self.targets:
            from wsi_mil.tasks.multitask import parse_targets

            kinds = [KINDS[k] for _, k in parse_targets(self.targets) if k in KINDS]
        read = {name for k in kinds for name, _ in k.own_settings}
        for owner in sorted({type(k) for k in KINDS.values()}, key=lambda k: k.name):
            for name, default in owner.own_settings:
                if name not in read and getattr(self, name) != default:
                    flag = "--" + name.replace("_", "-")
                    shown = f"{flag} {getattr(self, name)}" if not isinstance(default, bool) else \
                        (flag if getattr(self, name) else "--no-" + name.replace("_", "-"))
                    raise ConfigError(f"{shown} is a {owner.name} target's setting; this run has none (--task "
                                      f"{owner.name}, or a {owner.name} target among --targets)")

    def _resolve_targets(self) -> None:
        """--targets makes a multi-task run (checked now, before any folder): --task auto becomes multitask."""
        if not self.targets:
            if self.task == "multitask":
                raise ConfigError("--task multitask needs --targets (e.g. --targets label_subtype,label_grade:regression,survival)")
            if self.target_weights:
                raise ConfigError("--target-weights weighs the targets of --targets; give --targets too")
            return
        from wsi_mil.tasks.multitask import parse_targets, parse_weights

        if self.task not in ("auto", "multitask"):
            raise ConfigError(f"--targets names several targets (a multi-task run); --task {self.task} is one: leave "
                              "--task out (or --task multitask), or drop --targets")
        if self.label or self.classes:
            raise ConfigError("--targets names each target's column; --label and --classes are for one target")
        parse_weights(self.target_weights, len(parse_targets(self.targets)))
        object.__setattr__(self, "task", "multitask")
        ignored = [flag for flag, used in (
            ("--imbalance sampler", self.imbalance == "sampler"),
            ("--min-minority-share", self.min_minority_share is not None),
            ("--subgroups", bool(self.subgroups)), ("--prevalence", self.prevalence is not None)) if used]
        if ignored:
            raise ConfigError(f"a multi-task run has several targets: {', '.join(ignored)} act(s) on one class; leave "
                              f"{'them' if len(ignored) > 1 else 'it'} out")

    def schedule_model(self) -> str | None:
        return self.model

    def model_args(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dropout": self.dropout, **self.model_options_dict()}


IMAGE_MODES = names(choices.IMAGE_MODES)


@dataclass(frozen=True)
class ImageTrainConfig(CommonTrainConfig):
    """Settings of ``wsi-mil train-image`` (2D images such as chest X-rays)."""

    epochs: int = _opt(20, "maximum epochs per fold")
    patience: int = _opt(5, "early stopping: epochs without validation improvement")
    lr: float = _opt(5e-4, "AdamW learning rate of the head (backbone stages: see --layer-decay); 1 warm-up epoch, then cosine decay")
    dropout: float = _opt(0.2, "dropout before the classification head")

    backbone: str = _opt("efficientnet_lite0", "image backbone: a registered encoder (efficientnet_lite0: offline ImageNet "
                                               "weights) or any timm model name")
    weights: str | None = _opt(None, "local weights file for the backbone (.safetensors or .pth state dict; weights only)")
    random_init: bool = _opt(False, "allow a randomly initialised backbone (trained from scratch; recorded)")
    mode: str = _opt("partial", "transfer mode: linear (a linear probe on frozen, cached features: seconds), partial "
                                "(fine-tune the last --train-stages stages), full (fine-tune everything, learning "
                                "rates decaying by --layer-decay per stage towards the input), mil (the image as a bag of "
                                "--patch-grid overlapping patches: frozen, cached patch features and the MIL aggregator "
                                "--mil-model attending over them)", choices=names(choices.IMAGE_MODES))
    train_stages: int = _opt(2, "with --mode partial: how many of the backbone's last stages are trained")
    layer_decay: float = _opt(0.7, "with --mode full: learning-rate factor per stage, from the head towards the input")
    image_size: int = _opt(224, "side of the square network input in pixels (images are resized, antialiased)")
    batch_size: int = _opt(32, "images per optimisation step")
    augment: str = _opt("xray", "training augmentation: xray (small rotation, shift, zoom, brightness / contrast / "
                                "gamma; NO left-right flip), histology (adds flips, 90-degree turns, colour jitter), "
                                "none", choices=names(choices.IMAGE_AUGMENT))
    labels: str | None = _opt(None, "label columns, comma-separated (default: 'label' / 'label_<name>' columns); a blank "
                                    "cell is 'not labelled', masked out of loss and metrics")
    readers: str | None = _opt(None, "several readers' label columns, comma-separated: the reference label is their "
                                     "majority vote (ties: not labelled), and their agreement is reported")
    window: str | None = _opt(None, "DICOM window CENTRE,WIDTH in the modality's units (default: the file's VOI LUT / "
                                    "window, else the image's range)")
    use_voi: bool = _opt(True, "apply a DICOM file's own VOI LUT / window when --window is not given")
    patch_grid: int = _opt(3, "with --mode mil: patches per side; neighbours overlap by half (3: nine patches of half "
                              "the image's side)")
    mil_model: str = _opt("abmil", "with --mode mil: the MIL aggregator over the patches (as in train-mil --model)",
                          choices=names(choices.MIL_MODELS))
    hidden: int = _opt(128, "with --mode mil: width of the aggregator's instance embedding")
    resplit: bool = _opt(False, "when the manifest's split column puts one patient in two sets, name them and split "
                                "again by patient (default: stop with the list)")
    feature_cache: str | None = _opt(None, "folder for the frozen-backbone feature cache of --mode linear / mil (default: "
                                           "<out>/features); reused by later runs with the same backbone and images")

    def _checks(self) -> list[tuple[bool, str]]:
        return super()._checks() + [
            (self.mode in IMAGE_MODES, f"--mode must be one of {IMAGE_MODES}"),
            (self.train_stages >= 1, "--train-stages must be positive"),
            (0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
            (16 <= self.image_size <= 2048, "--image-size must be in 16..2048"),
            (self.batch_size >= 1, "--batch-size must be positive"),
            (self.patch_grid >= 1, "--patch-grid must be positive"),
            (self.hidden >= 1, "--hidden must be positive"),
            (not (self.mode in ("linear", "mil") and self.random_init),
             (f"--mode {self.mode} uses a frozen pretrained backbone; a random one needs --mode full (training "
              "from scratch)")),
        ]

    def schedule_model(self) -> str | None:
        return self.mil_model if self.mode == "mil" else None

    def model_args(self) -> dict[str, Any]:
        """The MIL aggregator's hyper-parameters (``--mode mil``)."""
        return {"hidden": self.hidden, "dropout": self.dropout, **self.model_options_dict()}

    def window_pair(self) -> tuple[float, float] | None:
        if not self.window:
            return None
        try:
            c, w = (float(v) for v in self.window.split(","))
        except ValueError as exc:
            raise ConfigError(f"--window {self.window!r}: give CENTRE,WIDTH, e.g. 2048,4096") from exc
        return c, w

    def label_list(self) -> list[str] | None:
        return [c.strip() for c in self.labels.split(",") if c.strip()] if self.labels else None

    def reader_list(self) -> list[str] | None:
        return [c.strip() for c in self.readers.split(",") if c.strip()] if self.readers else None


VOLUME_MODES = names(choices.VOLUME_MODES)


@dataclass(frozen=True)
class VolumeTrainConfig(CommonTrainConfig):
    """Settings of ``wsi-mil train-volume`` (3D CT / MRI volumes)."""

    epochs: int = _opt(30, "maximum epochs per fold")
    patience: int = _opt(8, "early stopping: epochs without validation improvement")
    lr: float = _opt(1e-3, "AdamW learning rate (1 warm-up epoch, then cosine decay)")
    dropout: float = _opt(0.2, "dropout before the classification head (slices: in the aggregator)")

    mode: str = _opt("cnn", "cnn: a 3D CNN on the whole volume (--arch); slices: 2.5D slice-MIL, a frozen 2D encoder "
                            "(--backbone) embeds every axial slice (cached) and --mil-model pools them (mean, or "
                            "attention: a heatmap along the volume)", choices=names(choices.VOLUME_MODES))
    arch: str = _opt("resnet18_3d", "with --mode cnn: resnet18_3d (compact 3D ResNet-18 from scratch), acs or inflate "
                                    "(the pretrained 2D --backbone turned 3D: ACS convolutions or inflated kernels)",
                     choices=names(choices.VOLUME_ARCHS))
    width: int = _opt(32, "with --arch resnet18_3d: channels of the first stage (x2 per stage)")
    backbone: str = _opt("efficientnet_lite0", "2D backbone for --arch acs / inflate and --mode slices: a registered "
                                               "encoder (efficientnet_lite0: offline ImageNet weights) or a timm name")
    weights: str | None = _opt(None, "local weights file for the 2D backbone (weights only)")
    mil_model: str = _opt("abmil", "with --mode slices: the aggregator over the slices (mean, max, abmil, gated_abmil, "
                                   "clam_sb, transmil, dsmil, linear_max)", choices=names(choices.MIL_MODELS))
    hidden: int = _opt(128, "with --mode slices: width of the aggregator's instance embedding")
    volume_size: int = _opt(64, "side of the cubic network input in voxels (after --spacing; aspect kept by padding)")
    slice_size: int = _opt(64, "with --mode slices: side in pixels each slice is resized to for the 2D encoder")
    spacing: str | None = _opt(None, "resample to this voxel spacing in mm first: one value (isotropic) or D,H,W "
                                     "(default: keep the voxels)")
    intensity: str = _opt("auto", "intensity mapping to [0, 1]: window (--window, CT in HU), zscore (MRI, per volume), "
                                  "minmax (0.5-99.5th percentile, per volume), unit (already in [0, 1]); auto: window "
                                  "when --window is given, unit for MedMNIST .npz, else minmax",
                          choices=names(choices.INTENSITY))
    window: str | None = _opt(None, "intensity window LOW,HIGH in the modality's units, e.g. -1000,400 (HU)")
    augment: str = _opt("volume", "training augmentation: volume (small rotations, scaling, shifts, intensity jitter; "
                                  "NO left-right flip), volume-elastic (adds elastic deformation), volume-flip (adds "
                                  "left-right flips: only where laterality carries no label), none",
                        choices=names(choices.VOLUME_AUGMENT))
    batch_size: int = _opt(16, "volumes (slice-MIL: bags) per optimisation step")
    labels: str | None = _opt(None, "label columns, comma-separated (default: 'label' / 'label_<name>' columns)")
    readers: str | None = _opt(None, "several readers' label columns: majority vote, agreement reported")
    resplit: bool = _opt(False, "when the manifest's split column puts one patient in two sets, split again by patient")
    feature_cache: str | None = _opt(None, "folder for the slice-feature cache of --mode slices (default: <out>/features)")

    def _checks(self) -> list[tuple[bool, str]]:
        return super()._checks() + [
            (self.width >= 4, "--width must be at least 4"),
            (self.hidden >= 1, "--hidden must be positive"),
            (8 <= self.volume_size <= 512, "--volume-size must be in 8..512"),
            (32 <= self.slice_size <= 1024, "--slice-size must be in 32..1024"),
            (self.batch_size >= 1, "--batch-size must be positive"),
        ]

    def prep(self) -> Any:
        """The :class:`wsi_mil.data.volumes.VolumePrep` these settings describe."""
        from wsi_mil.data.volumes import VolumePrep

        def floats(text: str, what: str, n: tuple[int, ...]) -> tuple[float, ...]:
            try:
                v = tuple(float(x) for x in text.split(","))
            except ValueError as exc:
                raise ConfigError(f"{what} {text!r}: give numbers separated by commas") from exc
            if len(v) not in n:
                raise ConfigError(f"{what} {text!r}: give {' or '.join(map(str, n))} value(s)")
            return v

        spacing = floats(self.spacing, "--spacing", (1, 3)) if self.spacing else None
        if spacing is not None and len(spacing) == 1:
            spacing = spacing * 3
        window = floats(self.window, "--window", (2,)) if self.window else None
        return VolumePrep(self.volume_size, spacing, self.intensity, window)  # type: ignore[arg-type]

    def schedule_model(self) -> str | None:
        return self.mil_model if self.mode == "slices" else None

    def model_args(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dropout": self.dropout, **self.model_options_dict()}

    def label_list(self) -> list[str] | None:
        return [c.strip() for c in self.labels.split(",") if c.strip()] if self.labels else None

    def reader_list(self) -> list[str] | None:
        return [c.strip() for c in self.readers.split(",") if c.strip()] if self.readers else None


def _validated(obj: Any, checks: list[tuple[bool, str]]) -> None:
    _check_choices(obj)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``wsi-mil predict``."""

    device: str = _opt("cpu", "cpu, cuda or cuda:N")
    manifest: str | None = _opt(None, "a manifest holding the slides' covariate columns (needed by a run trained with "
                                      "--covariates; other columns are not read)")

    def __post_init__(self) -> None:
        _validated(self, [(self.device == "cpu" or self.device.startswith("cuda"), "--device must be cpu, cuda or cuda:N")])


@dataclass(frozen=True)
class PredictImageConfig:
    """Settings of ``wsi-mil predict-image``."""

    cam: str | None = _opt(None, "write maps with this method: " + described(choices.CAM_METHODS),
                           choices=names(choices.CAM_METHODS))
    cam_threshold: float = _opt(0.5, "boxes and regions where the map reaches this share of its peak")

    def __post_init__(self) -> None:
        _validated(self, [(0 < self.cam_threshold < 1, "--cam-threshold must be in (0, 1)")])


@dataclass(frozen=True)
class PredictVolumeConfig:
    """Settings of ``wsi-mil predict-volume``."""

    maps: bool = _opt(False, "write heatmaps (NIfTI + PNG) for every volume")
    limit_maps: int | None = _opt(None, "at most this many volumes get maps (the first ones)")

    def __post_init__(self) -> None:
        _validated(self, [(self.limit_maps is None or self.limit_maps >= 0, "--limit-maps must be 0 or more")])


@dataclass(frozen=True)
class HeatmapSettings:
    """Settings of ``wsi-mil heatmap`` (their hash keys each slide's drawing: see ``key``)."""

    normalise: str = _opt("rank", described(choices.NORMALISATIONS), choices=names(choices.NORMALISATIONS))
    cmap: str = _opt("viridis", "perceptually uniform colour map", choices=names(choices.COLOURMAPS))
    formats: tuple[str, ...] = _opt(names(choices.HEATMAP_FORMATS), "exports to write: "
                                    + described(choices.HEATMAP_FORMATS), choices=names(choices.HEATMAP_FORMATS))
    top_k: int = _opt(8, "patches per row of the gallery")
    geojson_top_k: int = _opt(0, "only the k highest patches in the GeoJSON (0: all)")
    smooth_um: float = _opt(0.0, "Gaussian smoothing sigma in µm within the tissue (0: none)")
    opacity: float = _opt(0.5, "heatmap opacity over the thumbnail in overlay.png")

    def __post_init__(self) -> None:
        self.validate()  # (its messages say why: a colour map that is not perceptually uniform ...)
        _check_choices(self)

    def validate(self) -> None:
        problems = []
        if self.normalise not in choices.NORMALISATIONS:
            problems.append(f"--normalise must be one of {', '.join(choices.NORMALISATIONS)}")
        if self.cmap not in choices.COLOURMAPS:
            problems.append(f"--cmap must be a perceptually uniform map: {', '.join(choices.COLOURMAPS)}")
        elif self.cmap == "coolwarm" and self.normalise != "contribution":
            problems.append("--cmap coolwarm is diverging (signed values): it goes with --normalise contribution; "
                            "attention takes a sequential map (viridis, magma, inferno, plasma, cividis)")
        bad = [f for f in self.formats if f not in choices.HEATMAP_FORMATS]
        if bad or not self.formats:
            problems.append(f"--formats takes some of {', '.join(choices.HEATMAP_FORMATS)} (got "
                            f"{', '.join(self.formats) or 'none'})")
        for ok, what, value in ((self.top_k >= 1, "--top-k must be 1 or more", self.top_k),
                                (self.geojson_top_k >= 0, "--geojson-top-k must be 0 or more", self.geojson_top_k),
                                (self.smooth_um >= 0, "--smooth-um must be 0 or more", self.smooth_um),
                                (0 < self.opacity <= 1, "--opacity must be in (0, 1]", self.opacity)):
            if not ok:
                problems.append(f"{what}, not {value}")
        if problems:
            raise ConfigError("; ".join(problems))

    def key(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReviewConfig:
    """Settings of ``wsi-mil review``."""

    host: str = _opt("127.0.0.1", "address to listen on (anything but loopback exposes the slides)")
    port: int = _opt(8765, "port (0: any free port)")
    normalise: str = _opt("rank", described(choices.NORMALISATIONS), choices=names(choices.NORMALISATIONS))
    cmap: str = _opt("viridis", "perceptually uniform colour map", choices=names(choices.COLOURMAPS))
    reviewer: str | None = _opt(None, "the name recorded with each verdict and region (default: the login name)")

    def __post_init__(self) -> None:
        _validated(self, [(0 <= self.port <= 65535, "--port must be in 0..65535"),
                          (bool(self.host.strip()), "--host must name an address (127.0.0.1 to stay on this machine; an "
                                                    "empty one listens on every interface)")])


@dataclass(frozen=True)
class AuditConfig:
    """Settings of ``wsi-mil audit``."""

    subgroups: str | None = _opt(None, "manifest columns, comma-separated (e.g. sex,age,view,site)")
    prevalence: float | None = _opt(None, "deployment prevalence for PPV / NPV (e.g. 0.02)")
    label_sources: str | None = _opt(None, "two manifest columns with labels from different sources, a,b")
    bootstrap: int = _opt(1000, "bootstrap resamples for the intervals")

    def __post_init__(self) -> None:
        _validated(self, [(self.prevalence is None or 0 < self.prevalence < 1, "--prevalence must be in (0, 1)"),
                          (self.bootstrap >= 1, "--bootstrap must be positive")])


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``wsi-mil evaluate``."""

    subgroups: str | None = _opt(None, "manifest columns, comma-separated, for subgroup figures (e.g. site,scanner,sex)")
    prevalence: float | None = _opt(None, "deployment prevalence for PPV / NPV (e.g. 0.02)")
    bootstrap: int = _opt(1000, "bootstrap resamples for the AUC and subgroup intervals (calibration and the shift "
                                "check use at most 200)")
    seed: int = _opt(0, "seed of the bootstrap and of the shift check's folds")
    device: str = _opt("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        _validated(self, [(self.prevalence is None or 0 < self.prevalence < 1, "--prevalence must be in (0, 1)"),
                          (self.bootstrap >= 1, "--bootstrap must be positive"),
                          (0 <= self.seed < 2**32, "--seed must be a whole number in [0, 2**32)"),
                          (self.device == "cpu" or self.device.startswith("cuda"), "--device must be cpu, cuda or cuda:N")])


@dataclass(frozen=True)
class ImportFeaturesConfig:
    """Settings of ``wsi-mil import-features``."""

    format: str = _opt("auto", "layout of the files: " + described(choices.FOREIGN_FORMATS),
                       choices=names(choices.FOREIGN_FORMATS))
    encoder: str | None = _opt(None, "the encoder that made the features (required when the files do not say it: "
                                     "CLAM); refused when it contradicts what a file records")
    clam_patches: str | None = _opt(None, "CLAM's patches/ folder: each slide's patch size and level are read from it "
                                          "(CLAM's feature files do not carry them)")
    patch_size_level0: float | None = _opt(None, "patch side in level-0 pixels, when no patch file gives it")
    mpp: float | None = _opt(None, "µm per pixel the patches were read at (recorded; predict then checks new slides "
                                   "against it)")

    def __post_init__(self) -> None:
        _validated(self, [(self.patch_size_level0 is None or self.patch_size_level0 > 0,
                           "--patch-size-level0 must be positive"),
                          (self.mpp is None or self.mpp > 0, "--mpp must be positive")])


@dataclass(frozen=True)
class SynthConfig:
    """Settings of ``wsi-mil synth``."""

    n_slides: int = _opt(8, "number of slides")
    positive_fraction: float = _opt(0.5, "fraction of slides with tumour")
    size: int = _opt(8192, "slide side in level-0 pixels")
    mpp: float = _opt(0.5, "level-0 µm/px written in the metadata")
    preset: str = _opt("balanced", described(choices.SYNTH_PRESETS) + ". The cohort's README.md tabulates classes "
                                   "against sources and sites", choices=names(choices.SYNTH_PRESETS))
    tumour_size_um: tuple[float, ...] | None = _opt(None, "tumour region diameter range (default: the preset's)",
                                                    nargs=2, metavar=("MIN", "MAX"))
    seed: int = _opt(0, "random seed (same seed, same cohort)")

    def __post_init__(self) -> None:
        from wsi_mil.synth.cohort import cohort_settings

        # the generator's own checks first (their messages name the option as the generator takes it)
        for ok, message in ((0 <= self.seed < 2**32, "--seed must be a whole number in [0, 2**32)"),
                            (self.size <= 200_000, "--size must be at most 200000 px (a larger slide does not fit in "
                                                   "memory)")):
            if not ok:
                raise ConfigError(message)
        cohort_settings(self.preset, n_slides=self.n_slides, positive_fraction=self.positive_fraction,
                        size_px=self.size, mpp=self.mpp, tumour_regions=None,
                        tumour_size_um=typing.cast("tuple[float, float] | None", self.tumour_size_um))  # (2 values: nargs)
        _check_choices(self)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``wsi-mil demo``."""

    workers: int | None = _opt(None, "worker processes (default: one per core, at most 4)")
    seed: int = _opt(0, "random seed")
    n_slides: int | None = _opt(None, "generated slides (default: the built-in cohort's)")
    size: int | None = _opt(None, "generated slide side in level-0 px (default: built-in)")

    def __post_init__(self) -> None:
        _validated(self, [(self.workers is None or self.workers >= 1, "--workers must be positive"),
                          (0 <= self.seed < 2**32, "--seed must be a whole number in [0, 2**32)"),
                          (self.n_slides is None or self.n_slides >= 1, "--n-slides must be at least 1"),
                          (self.size is None or self.size >= 256, "--size must be at least 256 px")])


def recipe_sections() -> dict[str, type]:
    """The sections a YAML recipe may hold, with the settings each one sets (one per command
    with settings; ``--config`` reads the command's own section)."""
    return {"tile": TileConfig, "extract_features": ExtractConfig, "train_mil": TrainConfig,
            "train_image": ImageTrainConfig, "train_volume": VolumeTrainConfig, "predict": PredictConfig,
            "predict_image": PredictImageConfig, "predict_volume": PredictVolumeConfig, "heatmap": HeatmapSettings,
            "review": ReviewConfig, "audit": AuditConfig, "evaluate": EvaluateConfig,
            "import_features": ImportFeaturesConfig, "synth": SynthConfig, "demo": DemoConfig}


def write_settings(path: Path, command: str, inputs: list[Any], section: str, settings: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> Path:
    """The resolved settings of a command (or of a demo step), written atomically as YAML
    beside its outputs: package version, command, inputs, run options, then the section."""
    import yaml

    from wsi_mil import __version__
    from wsi_mil.io.atomic import write_text

    body = {"wsi_mil_version": __version__, "command": command, "inputs": [str(i) for i in inputs],
            **(extra or {}), section: settings}
    return write_text(path, yaml.safe_dump(body, sort_keys=False))
