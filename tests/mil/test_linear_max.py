"""linear_max: small lesions at a low witness rate, on features of real tissue.

Bags are built from the offline encoder's features of real H&E crops: the bundled normal
tissue sources (stroma, collagen and vessels, adipose tissue, eosinophilic tissue, the CMU
slide) and carcinoma sources, 1-2 tumour patches among 80 normal ones in a positive bag (a
1-2.5 % witness rate, as a 100-250 µm lesion on a slide). Train and test bags draw from
disjoint halves of each source, so no test patch (nor any overlapping crop) was seen in
training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_mil.data.bags import Bag, Task
from wsi_mil.mil import build_model
from wsi_mil.train.loop import BagFeeder, FitSettings, fit, instance_moments, predict

TASK = Task("binary", ("tumour",), ("label",), ("normal", "tumour"), ("0", "1"))
CROP, STRIDE = 128, 64


def _crops(rgb: np.ndarray) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    return [rgb[y:y + CROP, x:x + CROP] for y in range(0, h - CROP + 1, STRIDE) for x in range(0, w - CROP + 1, STRIDE)]


@pytest.fixture(scope="module")
def pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train" | "test": (normal features, tumour features)}: the two halves (along its
    longer side) of every bundled source, embedded with the packaged efficientnet_lite0."""
    from wsi_mil.encoders import build_encoder
    from wsi_mil.synth.mosaic import default_pool

    enc = build_encoder("efficientnet_lite0")
    sources = default_pool()

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            return torch.cat([enc(x[a:a + 64]) for a in range(0, len(x), 64)]).numpy()

    out = {}
    for part in (0, 1):
        kinds = []
        for textures in (sources.normal, sources.tumour):
            crops = []
            for t in textures:
                rgb = t.rgb if t.rgb.shape[0] >= t.rgb.shape[1] else t.rgb.transpose(1, 0, 2)
                half = rgb.shape[0] // 2
                crops += _crops(rgb[:half] if part == 0 else rgb[half:])
            kinds.append(embed(crops))
        out["train" if part == 0 else "test"] = (kinds[0], kinds[1])
    return out


def _bags(normal: np.ndarray, tumour: np.ndarray, n: int, seed: int, scale: float = 1.0,
          offset: float = 0.0) -> tuple[list[Bag], list[np.ndarray]]:
    """``n`` bags of 80 patches, half of them positive with 1-2 tumour patches; also each
    bag's instance truth."""
    rng = np.random.default_rng(seed)
    bags, truth = [], []
    for i in range(n):
        label = i % 2
        x = normal[rng.choice(len(normal), 80)].copy()
        t = np.zeros(80, bool)
        if label:
            at = rng.choice(80, rng.integers(1, 3), replace=False)
            x[at], t[at] = tumour[rng.choice(len(tumour), len(at), replace=False)], True
        coords = np.stack([np.arange(80) % 10, np.arange(80) // 10], 1).astype(np.int64) * 256
        bags.append(Bag(f"s{seed}-{i:03d}", f"p{seed}-{i:03d}", np.asarray([label], np.float32), None,
                        features=(x * scale + offset).astype(np.float32), coords=coords))
        truth.append(t)
    return bags, truth


def _train_and_test(pools, *, scale: float = 1.0, offset: float = 0.0):
    train, _ = _bags(*pools["train"], 60, seed=1, scale=scale, offset=offset)
    test, truth = _bags(*pools["test"], 40, seed=2, scale=scale, offset=offset)
    torch.manual_seed(0)
    model = build_model("linear_max", train[0].features.shape[1], 1)
    fit(model, train, None, TASK, FitSettings(epochs=30, lr=3e-3, select="swa", seed=0))
    pred = predict(model, test, TASK)
    return model, pred, truth


def test_linear_max_finds_one_or_two_tumour_patches_among_80_and_points_at_them(pools) -> None:
    from wsi_mil.eval.metrics import auc

    _, pred, truth = _train_and_test(pools)
    y = pred.targets[:, 0]
    assert auc(y, pred.probs[:, 0]) >= 0.95
    hits = [bool(t[int(np.argmax(a))]) for t, a, label in zip(truth, pred.attention, y, strict=False) if label]
    assert np.mean(hits) >= 0.9, f"the top-scored patch is a tumour patch in {np.mean(hits):.0%} of positive bags"
    loc = [auc(t.astype(int), a) for t, a, label in zip(truth, pred.attention, y, strict=False) if label]
    assert np.mean(loc) >= 0.95


def test_linear_max_standardises_so_the_feature_scale_does_not_matter(pools) -> None:
    """Features 50x larger and shifted (another encoder's scale) learn the same with the
    same learning rate: the inputs are standardised with the training instances' moments,
    which travel with the weights."""
    from wsi_mil.eval.metrics import auc

    model, pred, _ = _train_and_test(pools, scale=50.0, offset=20.0)
    assert auc(pred.targets[:, 0], pred.probs[:, 0]) >= 0.95
    train, _ = _bags(*pools["train"], 60, seed=1, scale=50.0, offset=20.0)
    mean, std = instance_moments(BagFeeder(train))
    torch.testing.assert_close(model.in_mean, mean)
    torch.testing.assert_close(model.in_std, torch.where(std > 1e-6, std, torch.ones_like(std)))
    all_x = np.concatenate([b.features for b in train])
    np.testing.assert_allclose(mean.numpy(), all_x.mean(0), rtol=1e-4, atol=1e-3)


def test_linear_max_weights_and_standardisation_survive_a_checkpoint(pools, tmp_path) -> None:
    from wsi_mil.train.checkpoint import load_model, save_model

    model, pred, _ = _train_and_test(pools, scale=50.0, offset=20.0)
    save_model(tmp_path / "m", model, {"model": "linear_max", "in_dim": int(model.in_mean.shape[0]), "n_outputs": 1,
                                        "model_args": {"hidden": 256, "dropout": 0.25}})
    again, _ = load_model(tmp_path / "m")
    test, _ = _bags(*pools["test"], 40, seed=2, scale=50.0, offset=20.0)
    np.testing.assert_allclose(predict(again, test, TASK).probs, pred.probs, rtol=1e-5, atol=1e-6)
    assert float(again.in_std.mean()) > 10  # the moments, not the defaults (0, 1)


def test_select_auto_and_lr_follow_the_model_and_are_recorded_resolved() -> None:
    from wsi_mil.config import ImageTrainConfig, TrainConfig, VolumeTrainConfig

    assert (TrainConfig().select, TrainConfig().lr) == ("best", 2e-4)  # runs of the other models: as before
    assert (TrainConfig(model="linear_max").select, TrainConfig(model="linear_max").lr) == ("swa", 3e-3)
    explicit = TrainConfig(model="linear_max", select="best", lr=1e-3)
    assert (explicit.select, explicit.lr) == ("best", 1e-3)
    assert TrainConfig(model="linear_max").to_dict()["select"] == "swa"  # what the run's identity and recipe hold
    assert ImageTrainConfig(mode="mil", mil_model="linear_max").select == "swa"
    assert ImageTrainConfig(mode="partial", mil_model="linear_max").select == "best"
    assert VolumeTrainConfig(mode="slices", mil_model="linear_max").select == "swa"
