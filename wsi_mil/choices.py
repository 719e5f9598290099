"""Every list of choices, once: each name with what it means.

The settings (:mod:`wsi_mil.config`), the command-line flags and recipes generated from them,
the registries (MIL models: :mod:`wsi_mil.mil.models`), the heatmap and review options and
``docs/choices.md`` all read these; ``tests/test_choices.py`` checks that each registered
entry is reachable from the command line and documented. Light on purpose (no imports):
``--help`` reads it.

A new entry is a line here plus its implementation where the list is used (a MIL model:
its class and its line in ``mil.models._BUILDERS``)."""

from __future__ import annotations

#: MIL aggregators (``train-mil --model``, ``train-image / train-volume --mil-model``)
MIL_MODELS: dict[str, str] = {
    "abmil": "attention MIL (Ilse et al. 2018)",
    "gated_abmil": "gated attention MIL (Ilse et al. 2018)",
    "clam_sb": "CLAM-SB style: gated attention + instance clustering loss",
    "transmil": "TransMIL (Shao et al. 2021): transformer, position convolved on the patch grid, class-token readout "
                "(readout=attention: gated-attention pooling of the tokens instead)",
    "mean": "mean-pooling baseline",
    "max": "max-pooling baseline: instance classifier, smooth maximum (log-sum-exp, r = 5)",
    "dsmil": "DSMIL style: max-instance stream + attention to the critical instance (Li et al. 2021)",
    "linear_max": "one linear score per patch on standardised features, smooth maximum, fixed schedule: small lesions",
}

#: prediction tasks (``--task``)
TASKS: dict[str, str] = {
    "auto": "from the label columns",
    "binary": "one label column with two classes",
    "multiclass": "one label column with three or more classes (one each)",
    "multilabel": "several label columns, each 0 / 1 (a slide may have several)",
    "regression": "one numeric label column: a continuous target (Huber loss on the standardised target; "
                  "--regression-loss, --no-standardise-target)",
    "survival": "label_time (follow-up) and label_event (1: event, 0: censored) columns: Cox partial likelihood",
    "multitask": "several targets at once (--targets): a head each on one shared aggregator, the weighted sum of their "
                 "losses, a blank cell masking that target only",
}

#: a survival target's loss (``--survival-loss``)
SURVIVAL_LOSSES: dict[str, str] = {
    "cox": "Cox partial likelihood over each batch of bags (Breslow ties); the output is the log relative risk",
    "discrete": "discrete-time negative log-likelihood: a logistic hazard per time interval (--time-bins), each bag "
                "its own likelihood; the risk is minus the expected intervals survived",
}

#: a regression target's loss (``--regression-loss``)
REGRESSION_LOSSES: dict[str, str] = {
    "huber": "Huber loss (delta 1 on the standardised target): squared near the target, linear beyond, so a few "
             "outlying labels do not dominate",
    "mse": "mean squared error: the maximum-likelihood loss of Gaussian noise, pulled by outlying labels",
}

#: how clinical covariates join the slide embedding (``--fusion``, with ``--covariates``)
FUSION: dict[str, str] = {
    "concat": "covariates joined to the slide embedding before the linear head (the image logits plus a linear map of them)",
    "gated": "as concat, and the covariates also scale each image logit through a gate 2 * sigmoid(g(c))",
}

#: class-imbalance handling, i.e. the loss (``--imbalance``)
IMBALANCE: dict[str, str] = {
    "weighted": "class-weighted cross-entropy",
    "sampler": "unweighted loss, bags drawn with class-balancing weights",
    "focal": "focal loss (see --focal-gamma)",
    "none": "plain cross-entropy",
}

#: decision-threshold rules, chosen on validation (``--threshold``)
THRESHOLDS: dict[str, str] = {
    "youden": "maximise sensitivity + specificity - 1",
    "sensitivity": "the highest threshold whose validation sensitivity reaches --target-sensitivity",
}

#: the validation figure that stops training and picks the epoch (``--monitor``)
MONITORS: dict[str, str] = {"auc": "validation AUC", "loss": "validation loss"}

#: which weights a fold keeps (``--select``)
SELECT: dict[str, str] = {
    "auto": "swa for linear_max, best for the other models",
    "best": "the epoch with the best --monitor on its validation set, with early stopping",
    "swa": "every --epochs trained, the weights averaged over the second half (a fixed schedule)",
}

#: near-duplicate samples of different patients across the splits (``--duplicates``)
DUPLICATES: dict[str, str] = {
    "refuse": "stop, listing them",
    "merge": "treat each duplicate group as one patient before splitting",
    "allow": "train anyway; reported",
}

#: a blank patient_id in a manifest whose other rows have one (``--blank-patient``)
BLANK_PATIENT: dict[str, str] = {
    "refuse": "stop, listing them (two samples of one patient could land in train and test)",
    "own": "each such sample is its own patient; counted in the report",
}

#: patch and feature store formats (``--format``)
STORE_FORMATS: dict[str, str] = {"h5": "HDF5, CLAM-compatible", "zarr": "Zarr v3"}

#: where extract-features reads pixels (``--source``)
PIXEL_SOURCES: dict[str, str] = {
    "auto": "the store's pixels when tile saved them, else the slide",
    "slide": "read by coordinates from the slide",
    "store": "JPEG pixels saved by tile --save-patches",
}

#: arithmetic of the encoder (``--precision``)
PRECISIONS: dict[str, str] = {
    "auto": "bf16/fp16 autocast on GPU, fp32 on CPU",
    "fp32": "32-bit floats",
    "bf16": "bfloat16 autocast",
    "fp16": "float16 autocast",
}

#: test-time stain normalisation in extract-features (``--stain-norm``)
STAIN_NORMS: dict[str, str] = {"none": "none", "macenko": "Macenko, to a reference H&E, on the device"}

#: how the tiler runs (``tile --executor``)
EXECUTORS: dict[str, str] = {
    "auto": "threads when one slide needs coordinates only, processes for a batch or --save-patches",
    "threads": "this process, one slide at a time shared by --workers threads (no cluster start)",
    "processes": "a local Dask cluster, one slide per worker process",
}

#: train-image transfer modes (``--mode``)
IMAGE_MODES: dict[str, str] = {
    "linear": "a linear probe on cached frozen features",
    "partial": "the last --train-stages stages trained",
    "full": "every stage, with discriminative learning rates (--layer-decay)",
    "mil": "each image a bag of patches, frozen features, --mil-model attending over them",
}

#: train-image augmentation (``--augment``)
IMAGE_AUGMENT: dict[str, str] = {
    "xray": "small rotation, shift, zoom, brightness / contrast / gamma; NO left-right flip",
    "histology": "xray's, plus flips, 90-degree turns and colour jitter",
    "none": "none",
}

#: train-volume modes (``--mode``)
VOLUME_MODES: dict[str, str] = {
    "cnn": "a 3D CNN (--arch)",
    "slices": "2.5D slice-MIL: frozen 2D features of every axial slice pooled by --mil-model",
}

#: 3D CNN architectures (``train-volume --arch``)
VOLUME_ARCHS: dict[str, str] = {
    "resnet18_3d": "a 3D ResNet-18 from scratch",
    "acs": "the pretrained 2D backbone run on axial, coronal and sagittal planes (ACS convolutions)",
    "inflate": "the pretrained 2D backbone's kernels inflated to 3D",
}

#: volume intensity normalisation (``train-volume --intensity``)
INTENSITY: dict[str, str] = {
    "auto": "window when --window is given, unit for MedMNIST .npz, else minmax",
    "window": "--window LOW,HIGH (CT in HU) mapped to [0, 1]",
    "zscore": "zero mean, unit variance per volume (MRI)",
    "minmax": "the 0.5-99.5th percentiles per volume mapped to [0, 1]",
    "unit": "already in [0, 1]",
}

#: train-volume augmentation (``--augment``)
VOLUME_AUGMENT: dict[str, str] = {
    "volume": "small rotations, scaling, shifts, intensity jitter; NO left-right flip",
    "volume-elastic": "volume plus elastic deformation",
    "volume-flip": "volume plus left-right flips: only where laterality carries no label",
    "none": "none",
}

#: heatmap exports (``heatmap --formats``)
HEATMAP_FORMATS: dict[str, str] = {
    "png": "overlay.png: thumbnail + heatmap + colour bar + prediction",
    "tiff": "heatmap.tif: pyramidal TIFF with the slide's level-0 size and mpp",
    "geojson": "patches.geojson: QuPath tiles with attention measurements",
    "gallery": "gallery.jpg: the top-k and bottom-k patches with their scores",
}

#: how attention becomes colour (``heatmap / review --normalise``)
NORMALISATIONS: dict[str, str] = {
    "rank": "percentile within the slide",
    "softmax": "attention as the model weighs it",
    "raw": "log attention",
    "contribution": "each patch's signed share of the slide's output (attention x the head on the patch's embedding; "
                    "survival: of the log risk), symmetric about 0; models with an additive readout",
}

#: perceptually uniform colour maps (``--cmap``)
COLOURMAPS: dict[str, str] = {name: "matplotlib's " + name for name in ("viridis", "magma", "inferno", "plasma", "cividis")}
COLOURMAPS["coolwarm"] = "matplotlib's coolwarm: diverging, blue below 0, red above (--normalise contribution's default)"

#: predict-image maps (``--cam``)
CAM_METHODS: dict[str, str] = {
    "gradcam": "Grad-CAM (whole-image runs)",
    "gradcam++": "Grad-CAM++ (whole-image runs)",
    "attention": "the attention over the patches (train-image --mode mil runs)",
}

#: generated cohorts (``synth --preset``)
SYNTH_PRESETS: dict[str, str] = {
    "balanced": "normal tissue from several real sources without repeats, stain varied per slide, both balanced "
                "across the classes, tumour colour-matched, 1-2 regions of 100-250 µm",
    "confounded": "balanced plus a site column whose stain comes with the label (80 % of positives, 20 % of "
                  "negatives: for testing shortcut checks)",
    "hard": "as balanced but sources and stain drawn per slide regardless of the label (small cohorts confound by "
            "chance), 150-400 µm",
    "easy": "one mirror-tiled source and larger tumours in their own colours (a pipeline check that MIL solves "
            "perfectly)",
    "multicentre": "four centres, each with its own stain, scanner resolution (0.5 or 0.25 µm/px, same physical size) "
                   "and normal tissue sources, classes spread evenly; site and scanner_mpp columns; 200-500 µm lesions",
    "multicentre-confounded": "multicentre with centre-B holding 70 % of the positives and 10 % of the negatives (a "
                              "confound site-held-out validation must expose)",
}

#: what one bag of train-mil is (``--bag``)
BAGS: dict[str, str] = {
    "slide": "one bag per slide, with the slide's label",
    "patient": "all slides of a patient in one bag, with the patient's label (slide labels must agree); attention "
               "written back per slide",
}

#: layouts of other tools' feature files (``import-features --format``)
FOREIGN_FORMATS: dict[str, str] = {
    "auto": "TRIDENT when the coordinates carry patch_size_level0, else CLAM",
    "clam": "CLAM's h5_files/<slide>.h5: features and coords, no attributes (the encoder and patch size are given)",
    "trident": "TRIDENT's features_<encoder>/<slide>.h5: coords with patch_size_level0, the encoder in the file or "
               "its folder's name",
}

#: every list above by the name the docs and tests use
ALL: dict[str, dict[str, str]] = {
    "MIL models": MIL_MODELS, "tasks": TASKS, "imbalance (loss)": IMBALANCE, "thresholds": THRESHOLDS,
    "monitors": MONITORS, "survival losses": SURVIVAL_LOSSES, "regression losses": REGRESSION_LOSSES, "fusion": FUSION, "select": SELECT, "duplicates": DUPLICATES, "blank patient": BLANK_PATIENT,
    "store formats": STORE_FORMATS, "pixel sources": PIXEL_SOURCES, "precisions": PRECISIONS,
    "stain normalisation": STAIN_NORMS, "tile executors": EXECUTORS, "image modes": IMAGE_MODES,
    "image augmentation": IMAGE_AUGMENT, "volume modes": VOLUME_MODES, "3D architectures": VOLUME_ARCHS,
    "volume intensity": INTENSITY, "volume augmentation": VOLUME_AUGMENT, "heatmap formats": HEATMAP_FORMATS,
    "attention normalisation": NORMALISATIONS, "colour maps": COLOURMAPS, "predict-image maps": CAM_METHODS,
    "synth presets": SYNTH_PRESETS, "bags": BAGS, "foreign feature formats": FOREIGN_FORMATS,
}


def names(choices: dict[str, str]) -> tuple[str, ...]:
    """The names of a list, in order (what argparse and the settings check take)."""
    return tuple(choices)


def described(choices: dict[str, str]) -> str:
    """A help text's list: ``name: meaning; ...``."""
    return "; ".join(f"{name}: {meaning}" for name, meaning in choices.items())


def markdown() -> str:
    """``docs/choices.md``: every list, each name with its meaning (a test keeps the file equal to this)."""
    out = ["# Every list of choices", "",
           ("Generated from `wsi_mil/choices.py` (the one place these lists are written); "
            "`tests/test_choices.py` keeps this page equal to it."), ""]
    for title, entries in ALL.items():
        out += [f"## {title}", "", "| name | meaning |", "|---|---|"]
        out += [f"| `{name}` | {meaning} |" for name, meaning in entries.items()]
        out.append("")
    return "\n".join(out)
