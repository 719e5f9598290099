"""One folder holds one run. Before, a 2-fold run written over a 3-fold one exited 0 and
kept the old models/fold2, which predict then averaged in (every probability shifted);
now the folder of another run is refused naming what changed, --overwrite clears it first,
the same run resumes, and predict uses exactly the folds the run lists."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import shared
from wsi_mil.cli import main


@pytest.fixture()
def musk(tmp_path: Path) -> tuple[Path, Path]:
    from wsi_mil.data.mil_import import import_classic

    manifest = import_classic("musk1", shared("mil"), tmp_path / "musk")
    return manifest, tmp_path / "musk" / "features"


def _train(manifest: Path, feats: Path, out: Path, *extra: str) -> int:
    return main(["train-mil", str(manifest), "--features", str(feats), "--out", str(out), "--epochs", "2",
                 "--bootstrap", "20", "--no-progress", "-q", *extra])


def _one_store(manifest: Path, feats: Path, stores: Path) -> Path:
    """A folder holding the feature store of the manifest's first slide (to predict)."""
    stores.mkdir()
    first = next(csv.DictReader(open(manifest)))["slide_id"]
    shutil.copy(feats / f"{first}.h5", stores / f"{first}.h5")
    return stores


def test_a_run_with_other_settings_is_refused_then_replaced(musk, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    manifest, feats = musk
    run = tmp_path / "run"
    assert _train(manifest, feats, run, "--folds", "3") == 0
    assert json.loads((run / "run.json").read_text())["folds"] == [0, 1, 2]
    before = (run / "metrics.json").read_bytes()
    capsys.readouterr()
    assert _train(manifest, feats, run, "--folds", "2", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "holds another run (folds 3 -> 2; seed 0 -> 1)" in err and "--overwrite" in err
    assert (run / "metrics.json").read_bytes() == before  # nothing of the old run was touched
    assert _train(manifest, feats, run, "--folds", "3") == 0  # the same run resumes
    assert _train(manifest, feats, run, "--folds", "2", "--seed", "1", "--overwrite") == 0
    assert sorted(p.name for p in (run / "models").glob("fold*.json")) == ["fold0.json", "fold1.json"]
    assert json.loads((run / "run.json").read_text())["folds"] == [0, 1]
    assert len(json.loads((run / "metrics.json").read_text())["folds"]) == 2


def test_predict_uses_only_the_folds_the_run_lists(musk, tmp_path: Path) -> None:
    manifest, feats = musk
    run = tmp_path / "run"
    assert _train(manifest, feats, run, "--folds", "2") == 0
    stores = _one_store(manifest, feats, tmp_path / "stores")
    assert main(["predict", str(run), str(stores), "--out", str(tmp_path / "p1")]) == 0
    p1 = (tmp_path / "p1" / "predictions.csv").read_text()
    # a stray model of another run left in models/ (copied in by hand) is not averaged in
    for suffix in (".json", ".safetensors"):
        shutil.copy(run / "models" / f"fold1{suffix}", run / "models" / f"fold2{suffix}")
    spec = json.loads((run / "models" / "fold2.json").read_text())
    spec["thresholds"] = [0.99]
    (run / "models" / "fold2.json").write_text(json.dumps(spec))
    assert main(["predict", str(run), str(stores), "--out", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "predictions.csv").read_text() == p1


def test_a_prediction_folder_of_other_inputs_is_refused(musk, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    manifest, feats = musk
    run = tmp_path / "run"
    assert _train(manifest, feats, run, "--folds", "2") == 0
    rows = list(csv.DictReader(open(manifest)))
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, row in ((a, rows[0]), (b, rows[1])):
        folder.mkdir()
        shutil.copy(feats / f"{row['slide_id']}.h5", folder / f"{row['slide_id']}.h5")
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(a), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), str(b), "--out", str(out)]) == 2
    assert "holds another run (input sources changed)" in capsys.readouterr().err
    assert main(["predict", str(run), str(b), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "attention" / f"{rows[0]['slide_id']}.h5").exists()  # the old slide's attention is gone
    assert (out / "attention" / f"{rows[1]['slide_id']}.h5").exists()


def test_model_files_get_the_same_permissions_as_every_other_output(tmp_path: Path) -> None:
    """safetensors wrote models/*.safetensors 0600 while every other file was 0644 (a shared
    group could read the report but not the model)."""
    import os
    import stat

    from wsi_mil.mil import build_model
    from wsi_mil.train.checkpoint import save_model

    save_model(tmp_path / "fold0", build_model("abmil", 8, 1), {"model": "abmil", "in_dim": 8, "n_outputs": 1})
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    for name in ("fold0.safetensors", "fold0.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_one_slide_in_two_features_folders_is_refused(musk, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before, the first folder's store won silently."""
    manifest, feats = musk
    other = tmp_path / "rescanned" / "features"
    other.mkdir(parents=True)
    first = next(csv.DictReader(open(manifest)))["slide_id"]
    shutil.copy(feats / f"{first}.h5", other / f"{first}.h5")
    code = main(["train-mil", str(manifest), "--features", str(feats), "--features", str(other), "--out",
                 str(tmp_path / "run"), "--folds", "2", "--epochs", "1", "--no-progress", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"1 slide(s) have a feature store in more than one --features folder ({first}:" in err
    assert not (tmp_path / "run").exists()


def test_heatmap_inputs_that_share_a_slide_are_refused(tmp_path: Path) -> None:
    """Before, the last input's attention won silently (a map of another run)."""
    from wsi_mil.commands.heatmap import attention_sources
    from wsi_mil.errors import ConfigError

    for run in ("pred_a", "pred_b"):
        (tmp_path / run / "attention").mkdir(parents=True)
        (tmp_path / run / "attention" / "slide-7.h5").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"slide slide-7 has attention in two inputs"):
        attention_sources([tmp_path / "pred_a", tmp_path / "pred_b"])
    assert set(attention_sources([tmp_path / "pred_a"])) == {"slide-7"}


def test_predict_into_the_run_it_reads_is_refused_even_with_overwrite(musk, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`predict RUN --out RUN --overwrite` removed the trained run (a stranger's trial)."""
    manifest, feats = musk
    run = tmp_path / "run"
    assert _train(manifest, feats, run, "--folds", "2") == 0
    stores = _one_store(manifest, feats, tmp_path / "stores")
    models = sorted(p.name for p in (run / "models").iterdir())
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(["predict", str(run), str(stores), "--out", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert "holds a train-mil run, not a predict one" in err and "a folder inside it is fine" in err
        assert sorted(p.name for p in (run / "models").iterdir()) == models and (run / "metrics.json").exists()
    assert main(["predict", str(run), str(stores), "--out", str(run / "pred")]) == 0


def test_a_run_into_a_folder_of_stores_is_refused_and_leaves_it_as_it_was(musk, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`train-mil --out FEATURES` (the folder it reads) wrote models and metrics among the
    feature stores; a refused command left its lock file behind in a folder it did not make."""
    manifest, feats = musk
    before = sorted(p.name for p in feats.iterdir())
    assert _train(manifest, feats, feats) == 2
    err = capsys.readouterr().err
    assert f"{feats} holds patch or feature stores" in err and "Choose another --out" in err
    assert sorted(p.name for p in feats.iterdir()) == before  # no run.json, log or .wsi-mil.lock among them
    legacy = tmp_path / "old-run"  # a run of an earlier wsi-mil: refused, and left as it was (no lock file)
    legacy.mkdir()
    (legacy / "metrics.json").write_text("{}")
    assert _train(manifest, feats, legacy) == 2
    assert "made by an earlier wsi-mil" in capsys.readouterr().err
    assert [p.name for p in legacy.iterdir()] == ["metrics.json"]
    run = tmp_path / "run"  # a refused command leaves a finished run's lock record as it was
    assert _train(manifest, feats, run, "--folds", "2") == 0
    record = (run / ".wsi-mil.lock").read_text()
    assert _train(manifest, feats, run, "--folds", "3") == 2
    assert (run / ".wsi-mil.lock").read_text() == record


def test_data_commands_and_trainers_refuse_folders_that_are_not_theirs(musk, tmp_path: Path, cmu_slide: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """tile / extract-features into a finished run, or into a folder of stores (extract
    wrote features/features/ beside the stores); train-mil into the folder of the slides."""
    manifest, feats = musk
    run = tmp_path / "run"
    assert _train(manifest, feats, run, "--folds", "2") == 0
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_slide, slides / "cmu.svs")
    before = {p: sorted(x.name for x in p.iterdir()) for p in (run, feats, slides)}
    capsys.readouterr()
    assert main(["tile", str(slides / "cmu.svs"), "--out", str(run), "--no-progress", "-q"]) == 2
    assert "holds a train-mil run (run.json); tile would write its outputs among them" in capsys.readouterr().err
    assert main(["extract-features", str(tmp_path), "--out", str(feats), "--no-progress", "-q"]) == 2
    assert "holds patch or feature stores" in capsys.readouterr().err
    assert _train(manifest, feats, slides) == 2
    assert f"{slides} holds slide files (cmu.svs ...)" in capsys.readouterr().err
    assert {p: sorted(x.name for x in p.iterdir()) for p in (run, feats, slides)} == before


def test_every_figure_a_task_kind_draws_is_cleared_by_overwrite(tmp_path: Path) -> None:
    """A survival run's kaplan_meier.png (and a regression's calibration.png, a multi-task's targets/) stayed
    beside the binary run --overwrite put in their folder: one folder, two runs."""
    import numpy as np

    from wsi_mil.data.bags import Task
    from wsi_mil.io.run_folder import clear_run

    rng = np.random.default_rng(0)
    t, e, x = rng.exponential(1, 40), (rng.random(40) < 0.6).astype(float), rng.normal(size=40)
    surv, reg = Task("survival", ("risk",), ("label_time", "label_event")), Task("regression", ("y",), ("y",))
    multi = Task("multitask", ("risk", "y"), ("label_time", "label_event", "y"), parts=(surv, reg), weights=(1.0, 1.0))
    drawn = surv.kind_obj.plots(surv, tmp_path, np.c_[t, e], x[:, None], "test", [0.0])
    drawn += reg.kind_obj.plots(reg, tmp_path, x[:, None], x[:, None] + 0.1, "test")
    drawn += multi.kind_obj.plots(multi, tmp_path, np.c_[t, e, x], np.c_[x, x], "test", [0.0])
    assert {"kaplan_meier.png", "calibration.png", "targets/survival/kaplan_meier.png"} <= set(drawn)
    (tmp_path / "run.json").write_text("{}")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
