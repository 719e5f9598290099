"""YAML recipes are checked like flags, before any work: a misspelt section, key or value
is an error that names the closest valid one (before, ``monitor: acc`` trained on the
default, ``threshold: youdan`` failed after fold 1, ``train_mill:`` was ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.cli import main
from wsi_mil.config import TrainConfig, VolumeTrainConfig, build_config, load_recipe
from wsi_mil.errors import ConfigError


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: str, *flags: str,
         command: str = "train-mil") -> tuple[int, str, Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    out = tmp_path / "run"
    if command == "train-mil":
        argv = ["train-mil", str(tmp_path / "manifest.csv"), "--features", str(tmp_path), "--out", str(out)]
    else:
        argv = [command, str(tmp_path / "source.npz"), "--out", str(out)]
    code = main([*argv, "--config", str(path), *flags])
    return code, capsys.readouterr().err, out


@pytest.mark.parametrize(("recipe", "expected"), [
    ("train_mil:\n  monitor: acc\n", "monitor 'acc': invalid choice; choose from auc, loss (did you mean 'auc'?)"),
    ("train_mil:\n  threshold: youdan\n", "threshold 'youdan': invalid choice; choose from youden, sensitivity "
                                          "(did you mean 'youden'?)"),
    ("train_mil:\n  imbalance: weigthed\n", "imbalance 'weigthed': invalid choice; choose from weighted, sampler, "
                                            "focal, none (did you mean 'weighted'?)"),
    ("train_mill:\n  epochs: 3\n", "unknown section 'train_mill' (did you mean 'train_mil'?)"),
    ("train_mil:\n  epoch: 3\n", "unknown option 'epoch' (did you mean 'epochs'?)"),
    ("train_mil:\n  epochs: ten\n", "epochs 'ten': expected a whole number"),
    ("train_mil:\n  epochs: 2.5\n", "epochs 2.5: expected a whole number"),
    ("train_mil:\n  cache_bags: maybe\n", "cache_bags 'maybe': expected true or false"),
    ("train_mil:\n  model: abmill\n", "model 'abmill': invalid choice; choose from abmil, gated_abmil, clam_sb, "
                                      "transmil, mean, max, dsmil, linear_max (did you mean 'abmil'?)"),
    ("train_mil:\n  patience:\n", "patience: a value is needed"),
    ("train_mil:\n  monitor: AUC\n", "monitor 'AUC': invalid choice; choose from auc, loss (did you mean 'auc'?)"),
    ("train_mil:\n  epochs: 1\n  folds: 2\n  epochs: 3\n", "'epochs' is given twice (line 4); keep one"),
    ("train_image:\n  epochs: 3\n", "has no 'train_mil:' section (it has train_image)"),
])
def test_a_bad_recipe_stops_before_any_work_naming_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           recipe: str, expected: str) -> None:
    code, err, out = _run(tmp_path, capsys, recipe)
    assert code == 2, err
    assert expected in err, err
    assert "recipe.yaml" in err  # the file is named
    assert not out.exists()  # nothing was started


def test_a_flag_and_a_recipe_get_the_same_choice_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err_recipe, _ = _run(tmp_path, capsys, "train_mil:\n  monitor: acc\n")
    assert code == 2
    (tmp_path / "empty.yaml").write_text("train_mil: {}\n")
    code = main(["train-mil", str(tmp_path / "m.csv"), "--features", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--monitor", "acc"])
    err_flag = capsys.readouterr().err
    assert code == 2
    core = "'acc': invalid choice; choose from auc, loss (did you mean 'auc'?)"
    assert f"--monitor {core}" in err_flag and f"monitor {core}" in err_recipe


def test_recipes_for_the_image_and_volume_commands_are_checked_too(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, err, out = _run(tmp_path, capsys, "train_image:\n  mode: linera\n", command="train-image")
    assert code == 2 and "mode 'linera': invalid choice" in err and "did you mean 'linear'?" in err
    assert not out.exists()
    code, err, out = _run(tmp_path, capsys, "train_volume:\n  intensity: zscroe\n", command="train-volume")
    assert code == 2 and "did you mean 'zscore'?" in err and not out.exists()


def test_good_recipe_values_are_converted_as_flags_are(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train_mil:\n  lr: 1e-3\n  epochs: 7.0\n  monitor: loss\n  max-instances: null\n")
    config = build_config(TrainConfig, recipe=load_recipe(path, "train_mil"))
    # YAML reads 1e-3 as text; it is the number it means
    assert config.lr == pytest.approx(1e-3) and config.epochs == 7 and config.monitor == "loss"
    assert config.max_instances is None
    with pytest.raises(ConfigError, match="invalid choice"):
        VolumeTrainConfig(intensity="zscroe")  # made in code: the same check
    with pytest.raises(ConfigError, match=r"recipe .*r.yaml, section 'train_mil': unknown option 'lr_rate'"):
        path.write_text("train_mil:\n  lr_rate: 1\n")
        build_config(TrainConfig, recipe=load_recipe(path, "train_mil"))


def test_every_bundled_recipe_is_valid() -> None:
    from wsi_mil.config import recipe_sections

    pipelines = Path(__file__).resolve().parents[1] / "pipelines"
    found = 0
    for path in sorted(pipelines.glob("*.yaml")):
        import yaml

        for section in yaml.safe_load(path.read_text()):
            build_config(recipe_sections()[section], recipe=load_recipe(path, section))
            found += 1
    assert found >= 8


def test_library_warnings_are_log_lines_with_the_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's warning (pydicom's, say) in batch output reads like every other warning:
    one line starting with WARNING:, not a raw "file.py:12: UserWarning" and its source line."""
    import warnings

    from wsi_mil.cli import _setup_logging

    before = warnings.formatwarning
    _setup_logging(1)
    try:
        warnings.warn("Invalid value for VR DS: '1,5'", UserWarning, stacklevel=1)
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        import logging

        logging.captureWarnings(False)
        warnings.formatwarning = before
    assert len(err) == 1 and err[0].startswith("WARNING: UserWarning: Invalid value for VR DS: '1,5' (")
