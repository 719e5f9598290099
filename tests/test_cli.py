from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import WSI_MIL


def _run(args, **kw):
    return subprocess.run(WSI_MIL + args, capture_output=True, text=True, timeout=300, **kw)


def test_help_lists_every_tile_option() -> None:
    proc = _run(["tile", "--help"])
    assert proc.returncode == 0
    for flag in ("--mpp", "--patch-size", "--stride", "--overlap", "--min-tissue", "--slide-mpp", "--save-patches",
                 "--format", "--workers", "--scheduler", "--config", "--overwrite"):
        assert flag in proc.stdout


def test_recipe_is_applied_and_unknown_keys_refused(tmp_path, cmu_slide) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tile:\n  patch_size: 128\n  min_tissue: 0.8\n")
    out = tmp_path / "o"
    proc = _run(["tile", str(cmu_slide), "--out", str(out), "--config", str(recipe), "--min-tissue", "0.6",
                 "--workers", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load((out / "tile_config.yaml").read_text())["tile"]
    assert resolved["patch_size"] == 128 and resolved["min_tissue"] == 0.6  # flag beats recipe
    recipe.write_text("tile:\n  patch_sise: 128\n")
    proc = _run(["tile", str(cmu_slide), "--out", str(out), "--config", str(recipe)])
    assert proc.returncode == 2 and "patch_sise" in proc.stderr


def test_conflicting_options_exit_2(tmp_path, cmu_slide) -> None:
    proc = _run(["tile", str(cmu_slide), "--out", str(tmp_path), "--stride", "128", "--overlap", "0.5"])
    assert proc.returncode == 2 and "--stride or --overlap" in proc.stderr


COMMANDS = ["tile", "extract-features", "train-mil", "predict", "heatmap", "review", "synth", "demo", "train-image",
            "predict-image", "train-volume", "predict-volume", "evaluate",
            "import-features"]


def test_list_flags_work_alone() -> None:
    for args, expect in ((["extract-features", "--list-encoders"], "efficientnet_lite0"),
                         (["train-mil", "--list-models"], "abmil")):
        res = subprocess.run(WSI_MIL + args, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and expect in res.stdout, res.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_output_options_exit_codes_and_single_defaults(command) -> None:
    res = subprocess.run(WSI_MIL + [command, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for flag in ("-v, --verbose", "-q, --quiet", "--no-progress"):
        assert flag in text, (command, flag)
    assert "Exit status: 0" in text
    assert text.count("(default:") == len(re.findall(r"\(default: [^)]*\)", text))
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), command


def test_a_bad_manifest_creates_no_output_folder(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,lable\na,1\n")
    for args in (["tile", str(bad)], ["train-mil", str(bad), "--features", str(tmp_path)]):
        out = tmp_path / f"out-{args[0]}"
        res = subprocess.run(WSI_MIL + args + ["--out", str(out)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "lable" in res.stderr and not out.exists(), (args, res.stderr)


@pytest.mark.parametrize("section,field,value,expect", [
    ("train_mil", "lr", float("inf"), "--lr must be a finite number, not inf"),
    ("train_mil", "lr", float("nan"), "--lr must be a finite number, not nan"),
    ("train_image", "weight_decay", float("nan"), "--weight-decay must be a finite number"),
        ("train_mil", "hidden", 0, "--hidden must be positive"),
    ("train_image", "hidden", 0, "--hidden must be positive"),
    ("train_volume", "hidden", 0, "--hidden must be positive"),
    ("train_mil", "weight_decay", -1e-4, "--weight-decay must be 0 or more"),
])
def test_settings_that_would_fail_mid_run_or_train_nothing_are_refused(section, field, value, expect) -> None:
    """``--lr inf`` passed "lr > 0" and crashed in the middle of a fold, leaving a half-made run; ``--hidden 0``
    trained a zero-width model and exited 0."""
    from wsi_mil.config import recipe_sections
    from wsi_mil.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expect)):
        recipe_sections()[section](**{field: value})


def test_an_infinite_learning_rate_creates_no_output_folder(tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,label\na,0\nb,1\n")
    out = tmp_path / "run"
    res = _run(["train-mil", str(manifest), "--features", str(tmp_path), "--out", str(out), "--lr", "inf"])
    assert res.returncode == 2 and "--lr must be a finite number, not inf" in res.stderr and not out.exists(), res.stderr


def test_python_dash_m_wsi_mil_runs_the_program() -> None:
    """``python -m wsi_mil`` (cluster job scripts, notebooks) failed: no wsi_mil/__main__.py."""
    import sys

    res = subprocess.run([sys.executable, "-m", "wsi_mil", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("wsi-mil "), res.stderr


def test_every_verb_is_one_module_of_the_cli_package() -> None:
    """Each sub-command lives in wsi_mil/cli/<verb>.py (its flags, help and run) and is listed once."""
    from pathlib import Path

    import wsi_mil.cli as cli

    names = [v.NAME for v in cli.VERBS]
    assert sorted(names) == sorted(COMMANDS + ["audit"]) and len(set(names)) == len(names)
    for verb in cli.VERBS:
        assert Path(verb.__file__).stem == verb.NAME.replace("-", "_") and callable(verb.run)
    assert len(Path(cli.__file__).read_text().splitlines()) <= 250


def test_every_command_takes_its_settings_as_flags_and_as_its_recipe_section() -> None:
    """One settings dataclass per command: its fields are the flags (with help and default), a recipe
    section of the same name, and the checks; nothing is spelt twice."""
    import dataclasses

    import wsi_mil.cli as cli
    from wsi_mil.config import recipe_sections

    sections = recipe_sections()
    for verb in cli.VERBS:
        cls, section = verb.SETTINGS
        assert sections[section] is cls, verb.NAME
        text = " ".join(_run([verb.NAME, "--help"]).stdout.split())
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text, (verb.NAME, f.name)
        assert "--config" in text


def test_a_recipe_section_drives_synth_and_a_bad_heatmap_setting_is_refused_before_any_folder(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("synth:\n  n_slides: 1\n  size: 256\n  seed: 3\n")
    out = tmp_path / "cohort"
    res = _run(["synth", "--out", str(out), "--config", str(recipe), "--no-progress"])
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.glob("*.tiff")] == ["synth-003-0000.tiff"]
    hm = tmp_path / "hm"
    res = _run(["heatmap", str(tmp_path), "--out", str(hm), "--formats", "png", "pnj"])
    assert res.returncode == 2 and "--formats 'pnj': invalid choice; choose from png, tiff, geojson, gallery" in res.stderr
    assert not hm.exists()


@pytest.mark.parametrize("args,says", [
    (["train-mil", "m.csv", "--features", "f", "--bootstrap", "0"], "--bootstrap must be 10 or more"),
    (["train-mil", "m.csv", "--features", "f", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["train-mil", "m.csv", "--features", "f", "--seed", "-1"], "--seed must be a whole number"),
    (["train-image", "m.csv", "--seed", "-1"], "--seed must be a whole number"),
    (["synth", "--seed", "-1"], "--seed must be a whole number"),
    (["synth", "--n-slides", "2", "--size", "100000000"], "--size must be at most 200000 px"),
    (["demo", "--seed", "-1"], "--seed must be a whole number"),
    (["tile", "SLIDE", "--workers", "0"], "--workers must be at least 1"),
    (["extract-features", "TILES", "--encoder", "nosuchmodel"], "unknown encoder 'nosuchmodel'"),
    (["heatmap", "TILES", "--opacity", "0"], "--opacity must be in (0, 1], not 0.0"),
    (["review", "TILES", "--host", ""], "--host must name an address"),
])
def test_values_that_failed_mid_run_are_refused_before_any_folder(tmp_path, cmu_slide, args, says) -> None:
    """A stranger's trial: each of these crashed with a traceback (exit 1) or was refused only after its output
    folder existed, which then blocked the corrected command."""
    (tmp_path / "m.csv").write_text("slide_id,patient_id,label\na,p1,0\nb,p2,1\n")
    (tmp_path / "f").mkdir()
    (tmp_path / "tiles").mkdir()
    args = [{"SLIDE": str(cmu_slide), "TILES": str(tmp_path / "tiles")}.get(a, a) for a in args]
    out = tmp_path / "out"
    extra = [] if args[0] == "review" else ["--out", str(out)]  # (review writes nothing)
    res = subprocess.run(WSI_MIL + args + extra, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not out.exists()


def test_predict_image_runs_without_maps_and_a_recipe_takes_model_options_as_a_mapping(tmp_path) -> None:
    """``predict-image`` without --cam was refused ("--cam None: invalid choice"); ``model_options: {layers: 1}``
    in a recipe was refused as "expected text"."""
    from wsi_mil.config import PredictImageConfig, TrainConfig, build_config

    assert build_config(PredictImageConfig, overrides={"cam_threshold": 0.4}).cam is None
    config = build_config(TrainConfig, recipe={"model": "transmil", "model_options": {"layers": 1, "heads": 2}})
    assert config.model_options == "heads=2,layers=1"
