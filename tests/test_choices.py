"""Every list of choices is written once (wsi_mil/choices.py), documented (docs/choices.md), and
every entry of it, and every setting of every MIL model, is reachable from the command line and
from a recipe."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from wsi_mil import choices
from wsi_mil.cli import build_parser
from wsi_mil.config import ExtractConfig, ImageTrainConfig, TileConfig, TrainConfig, VolumeTrainConfig, build_config
from wsi_mil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_page_is_the_lists() -> None:
    assert (ROOT / "docs" / "choices.md").read_text() == choices.markdown(), (
        "regenerate: python -c \"from wsi_mil import choices; open('docs/choices.md','w').write(choices.markdown())\"")


def test_every_settings_list_comes_from_the_one_place() -> None:
    lists = {choices.names(c) for c in choices.ALL.values()}
    for cls in (TileConfig, ExtractConfig, TrainConfig, ImageTrainConfig, VolumeTrainConfig):
        for f in dataclasses.fields(cls):
            if "choices" in f.metadata:
                assert tuple(f.metadata["choices"]) in lists, (cls.__name__, f.name)
    from wsi_mil.commands.heatmap import FORMATS
    from wsi_mil.synth.cohort import PRESETS
    from wsi_mil.viz.scores import COLOURMAPS, NORMALISATIONS

    assert tuple(FORMATS) == choices.names(choices.HEATMAP_FORMATS)
    assert tuple(NORMALISATIONS) == choices.names(choices.NORMALISATIONS)
    assert tuple(COLOURMAPS) == choices.names(choices.COLOURMAPS)
    assert set(PRESETS) == set(choices.SYNTH_PRESETS)


@pytest.mark.parametrize("name", list(choices.MIL_MODELS))
def test_every_mil_model_is_registered_reachable_and_takes_each_of_its_settings(name) -> None:
    from wsi_mil.mil.models import available, build_model, model_settings

    assert available()[name] == choices.MIL_MODELS[name]
    for command, flag in (("train-mil", "--model"), ("train-image", "--mil-model"), ("train-volume", "--mil-model")):
        args = build_parser().parse_args([command, flag, name])
        assert getattr(args, "model" if command == "train-mil" else "mil_model") == name
    x, mask = torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool)
    coords = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(1, 12, 2) * 256
    for key, (kind, default) in model_settings(name).items():
        # another value than the default where the type allows one (a text setting keeps its default: the run
        # records no option then, as the identity of a run with the default must not change)
        value = default * 2 if kind is int else default / 2 if kind is float else default
        config = build_config(TrainConfig, recipe={"model_options": f"{key}={value}"}, overrides={"model": name})
        if value == default:
            assert config.model_options is None and key not in config.model_args()
        else:
            assert config.model_args()[key] == value and isinstance(config.model_args()[key], kind)
        out = build_model(name, 16, 2, **config.model_args()).eval()(x, mask, coords)
        assert out.logits.shape == (1, 2), (name, key)


def test_a_model_setting_takes_effect_and_a_wrong_one_is_refused_naming_the_settings() -> None:
    from wsi_mil.mil.models import build_model

    c = TrainConfig(model="transmil", model_options="layers=1, heads=8, readout=cls")
    model = build_model("transmil", 16, 2, **c.model_args())
    assert len(model.blocks) == 1 and model.readout == "cls" and model.blocks[0].heads == 8
    assert build_model("clam_sb", 16, 2, **TrainConfig(model="clam_sb", model_options="k_sample=3").model_args()).k_sample == 3
    with pytest.raises(ConfigError, match="transmil has no setting 'k_sample'; its settings: heads"):
        TrainConfig(model="transmil", model_options="k_sample=3")
    with pytest.raises(ConfigError, match="layers=two: give a whole number"):
        TrainConfig(model="transmil", model_options="layers=two")
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig(model="transmil", model_options="layers")
    with pytest.raises(ConfigError, match="this run has none"):
        ImageTrainConfig(mode="linear", model_options="attn_dim=64")
    assert VolumeTrainConfig(mode="slices", mil_model="abmil", model_options="attn_dim=64").model_args()["attn_dim"] == 64


def test_runs_made_before_model_options_keep_their_identity() -> None:
    from wsi_mil.io.run_folder import identity

    settings = TrainConfig().to_dict()
    before = {k: v for k, v in settings.items() if k != "model_options"}
    assert identity("train-mil", settings, {})["identity"] == identity("train-mil", before, {})["identity"]
    changed = TrainConfig(model_options="attn_dim=64").to_dict()
    assert identity("train-mil", changed, {})["identity"] != identity("train-mil", before, {})["identity"]


def test_model_options_are_one_run_whatever_their_order_and_settings_that_cannot_run_are_refused_first() -> None:
    """A stranger's trial: 'heads=2,layers=1' was "another run" than 'layers=1,heads=2'; heads=3 (not dividing
    --hidden), attn_dropout=2 and readout=foo failed in the middle of a fold, leaving a half-made run."""
    same = {TrainConfig(model="transmil", model_options=o).model_options
            for o in ("layers=1,heads=2", "heads=2, layers=1", "layers=1,heads=2,pos=grid")}
    assert same == {"heads=2,layers=1"}
    assert TrainConfig(model="transmil", model_options="pos=grid").model_options is None
    for bad, says in (("heads=3", "heads=3 must divide the width --hidden 256"), ("heads=0", "1 or more"),
                      ("attn_dropout=2", "in [0, 1]"), ("readout=foo", "readout must be attention or cls, not 'foo'"),
                      ("layers=1,layers=2", "layers is given twice")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            TrainConfig(model="transmil", model_options=bad)
    with pytest.raises(ConfigError, match="bag_weight=1.5: give a number in"):
        TrainConfig(model="clam_sb", model_options="bag_weight=1.5")
