"""The audit: near-duplicates across splits (refused, or merged into one patient), label
sources that disagree, subgroup metrics with banding and small-group warnings, operating
points, and the error list / gallery — on the real NIH chest X-ray sample and real MIL bags."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import WSI_MIL, shared
from wsi_mil.config import ImageTrainConfig
from wsi_mil.eval.audit import band_values, error_cases, operating_points, subgroup_report, wilson_ci
from wsi_mil.eval.audit_run import DuplicateLeakError

NIH = shared("cxr", "nih1000")


def _rows() -> list[dict[str, str]]:
    with open(NIH / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _manifest(tmp: Path, rows: list[dict[str, str]], extra: list[tuple[str, str, dict[str, str]]] = ()) -> Path:
    """NIH rows (no split column: splits made by patient) plus extra (path, patient, row) images."""
    path = tmp / "nih.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient_id", "label", "abnormal_folder", "finding_labels", "sex", "age", "view"])
        for r in rows:
            w.writerow([str(NIH / r["path"]), r["patient_id"], r["abnormal_folder"], r["abnormal_folder"],
                        r["finding_labels"], r["sex"], r["age"], r["view"]])
        for p, patient, r in extra:
            w.writerow([p, patient, r["abnormal_folder"], r["abnormal_folder"], r["finding_labels"], r["sex"], r["age"], r["view"]])
    return path


def test_wilson_interval_operating_points_and_bands() -> None:
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)  # textbook values
    assert wilson_ci(0, 0) is None
    # 20 negatives at 0.00..0.19, 20 positives at 0.10..0.29: at specificity 0.9 the threshold
    # must sit just above the 18th negative (0.17): positives >= 0.18 are 12 of 20
    y = np.array([0] * 20 + [1] * 20)
    p = np.concatenate([np.arange(20) / 100, (10 + np.arange(20)) / 100])
    op = operating_points(y, p, 0.5, specificities=(0.9,), sensitivities=(0.9,), prevalence=0.1, n_boot=200)
    at = op["sensitivity_at_specificity"][0]
    assert at["sensitivity"] == pytest.approx(12 / 20) and at["ci95"][0] <= 0.6 <= at["ci95"][1]
    assert ((p[y == 0] < at["threshold"]).mean()) >= 0.9
    rev = op["specificity_at_sensitivity"][0]  # sensitivity 0.9: threshold = 3rd-lowest positive 0.12
    assert rev["threshold"] == pytest.approx(0.12) and rev["specificity"] == pytest.approx(12 / 20)
    # at threshold 0.5 nothing is positive: sensitivity 0, specificity 1 -> PPV undefined-by-zero, NPV = 1 - prevalence
    assert op["at_prevalence"]["npv"] == pytest.approx(0.9)
    ages = [r["age"] for r in _rows()]
    names, text = band_values(ages)
    assert text and "quartiles" in text and len(set(names)) == 4
    counts = {n: names.count(n) for n in set(names)}
    assert min(counts.values()) > 150  # quartile bands: comparable sizes
    names, text = band_values(["M", "F", "", "M"])
    assert text is None and names == ["M", "F", "(missing)", "M"]


def test_patients_with_several_cases_widen_the_intervals() -> None:
    """Each of 40 patients contributes 5 identical cases: a per-case bootstrap believes it has
    200 independent cases, the patient-level one knows it has 40 (its interval is wider)."""
    rng = np.random.default_rng(3)
    y1 = rng.integers(0, 2, 40)
    p1 = 1 / (1 + np.exp(-(2 * y1 - 1) * 1.0 + rng.normal(0, 1.2, 40)))
    y, p = np.repeat(y1, 5), np.repeat(p1, 5)
    patients = np.repeat([f"p{i}" for i in range(40)], 5).tolist()
    same = subgroup_report(y, p, 0.5, {"all": ["x"] * 200}, n_boot=300)["all"]["groups"][0]
    clustered = subgroup_report(y, p, 0.5, {"all": ["x"] * 200}, n_boot=300, patients=patients)["all"]["groups"][0]
    assert same["auc"] == clustered["auc"] and clustered["n_patients"] == 40
    assert clustered["ci_method"].startswith("patient-level") and same["ci_method"].startswith("stratified")
    width = lambda c: c[1] - c[0]  # noqa: E731
    assert width(clustered["auc_ci95"]) > 1.6 * width(same["auc_ci95"])
    assert width(clustered["sensitivity_ci95"]) > 1.6 * width(same["sensitivity_ci95"])


def test_subgroups_warn_when_small_and_state_the_largest_gap() -> None:
    rng = np.random.default_rng(0)
    n = 400
    site = np.array(["A"] * 180 + ["B"] * 180 + ["C"] * 40)
    y = rng.integers(0, 2, n)
    signal = np.where(site == "A", 2.5, np.where(site == "B", 0.5, 1.0))  # site B's model is much worse
    p = 1 / (1 + np.exp(-(y * 2 - 1) * signal + rng.normal(0, 1, n)))
    c = np.where(site == "C")[0]
    y[c] = 0
    y[c[:3]] = 1  # site C: 3 positives -> too small
    rep = subgroup_report(y, p, 0.5, {"site": site.tolist()}, n_boot=100)["site"]
    groups = {g["group"]: g for g in rep["groups"]}
    assert "warning" in groups["C"] and "warning" not in groups["A"] and "warning" not in groups["B"]
    assert groups["A"]["auc"] > groups["B"]["auc"] + 0.2
    gap = rep["largest_gap"]["auc"]
    assert gap["lowest"] == "B" and gap["highest"] == "A" and rep["largest_gap"]["groups_judged"] == 2
    assert gap["intervals_overlap"] is False  # 180 cases each and a large gap: the intervals separate
    e = error_cases([str(i) for i in range(n)], site.tolist(), y, p, 0.5)
    pred = p >= 0.5
    assert len(e["false_negatives"]) == int(((y == 1) & ~pred).sum()) and len(e["false_positives"]) == int(((y == 0) & pred).sum())
    fn_p = [c["probability"] for c in e["false_negatives"]]
    assert fn_p == sorted(fn_p)  # most confident mistakes first


def test_audit_of_the_nih_sample(tmp_path: Path) -> None:
    """The closing note's audit: train-image on the 1,000 NIH radiographs (abnormal vs
    normal, splits by patient) with subgroups sex, age and view and the folder label checked
    against the findings column."""
    from wsi_mil.commands.train_image import run_train_image

    manifest = _manifest(tmp_path, _rows())
    cfg = ImageTrainConfig(mode="linear", image_size=32, folds=2, epochs=3, bootstrap=100, subgroups="sex,age,view",
                           label_sources="abnormal_folder,finding_labels", prevalence=0.05)
    report = run_train_image(manifest, out_dir=tmp_path / "run", config=cfg, progress=False)
    audit = report.metrics["audit"]
    assert audit["duplicates"]["pairs"] == [] and audit["duplicates"]["leaks"] == []  # measured: none at 0.99
    lab = audit["label_sources"]
    assert lab["n"] == 1000 and {c["id"] for c in lab["conflicts"]} >= {"00000193_019"}  # folder 0 but "Pneumonia"
    ev = audit["evaluation"]
    head = report.metrics[report.metrics["headline"]["set"]]  # the audit looks at the headline's set
    assert ev["set"] == {"ensemble_test": "ensemble test", "pooled_validation": "pooled out-of-fold validation"}[
        report.metrics["headline"]["set"]]
    test_n = head["n"]
    for col in ("sex", "age", "view"):
        groups = ev["subgroups"][col]["groups"]
        assert sum(g["n"] for g in groups) == test_n, col
    assert ev["subgroups"]["age"]["bands"] and ev["subgroups"]["sex"]["bands"] is None
    for g in ev["subgroups"]["sex"]["groups"]:  # NIH patients have several radiographs: patient-level intervals
        assert g["ci_method"].startswith("patient-level") == (g["n_patients"] < g["n"])
    assert {g["group"] for g in ev["subgroups"]["view"]["groups"]} <= {"PA", "AP"}
    conf = head["confusion"]
    assert len(ev["errors"]["false_negatives"]) == conf[1][0] and len(ev["errors"]["false_positives"]) == conf[0][1]
    assert ev["operating_points"]["at_prevalence"]["prevalence"] == 0.05
    run = tmp_path / "run"
    errors = list(csv.DictReader(open(run / "errors.csv")))
    assert len(errors) == conf[1][0] + conf[0][1] and {r["kind"] for r in errors} <= {"FN", "FP"}
    gallery = Image.open(run / "gallery.png")
    assert gallery.size[0] > 400 and np.asarray(gallery).std() > 10  # pictures drawn, not a blank canvas
    md = (run / "report.md").read_text()
    assert "## Audit" in md and "Subgroups by `age`" in md and "banded by quartiles" in md
    assert "00000193_019" in md and "sensitivity at specificity 0.90" in md and "gallery.png" in md
    # the same audit alone, as a verb, from another working directory
    res = subprocess.run(WSI_MIL + ["audit", str(run), "--manifest", str(manifest), "--subgroups", "sex,view",
                                    "--label-sources", "abnormal_folder,finding_labels", "--bootstrap", "100"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    alone = json.loads((run / "audit" / "audit.json").read_text())
    assert [c["id"] for c in alone["evaluation"]["errors"]["false_negatives"]] == [c["id"] for c in ev["errors"]["false_negatives"]]
    for g, h in zip(alone["evaluation"]["subgroups"]["sex"]["groups"], ev["subgroups"]["sex"]["groups"], strict=True):
        assert (g["group"], g["tp"], g["fn"], g["tn"], g["fp"]) == (h["group"], h["tp"], h["fn"], h["tn"], h["fp"])
        assert g["auc"] == pytest.approx(h["auc"], abs=2e-3)  # predictions.csv keeps 6 decimals
    assert alone["label_sources"]["n_conflicts"] == lab["n_conflicts"] and alone["duplicates"]["pairs"] == []
    assert (run / "audit" / "gallery.png").exists() and "## Audit" in (run / "audit" / "report.md").read_text()
    bad = subprocess.run(WSI_MIL + ["audit", str(run), "--manifest", str(manifest), "--subgroups", "ethnicity"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "ethnicity" in bad.stderr and "sex" in bad.stderr  # names what the manifest has


def test_planted_duplicates_across_splits_are_refused_then_merged(tmp_path: Path) -> None:
    """Copies of NIH images (brightness changed, re-encoded, resized) under other patients:
    refused before training, then kept together as one patient with --duplicates merge."""
    from wsi_mil.commands.train_image import run_train_image

    rows = _rows()[:240]
    extra = []
    for k, r in enumerate(rows[:8]):
        a = np.asarray(Image.open(NIH / r["path"]).convert("L"), dtype=np.float32) * 0.85 + 15
        p = tmp_path / f"copy{k}.jpg"
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((80, 80)).save(p, quality=85)
        extra.append((str(p), f"other{k}", r))
    manifest = _manifest(tmp_path, rows, extra)
    cfg = {"mode": "linear", "image_size": 32, "folds": 2, "epochs": 2, "bootstrap": 50}
    with pytest.raises(DuplicateLeakError, match=r"(?s)near-duplicate image pair\(s\) of different patients.*--duplicates merge"):
        run_train_image(manifest, out_dir=tmp_path / "refused", config=ImageTrainConfig(**cfg), progress=False)
    assert not (tmp_path / "refused").exists()  # stopped before the run folder and any feature existed
    report = run_train_image(manifest, out_dir=tmp_path / "merged", config=ImageTrainConfig(**cfg, duplicates="merge"),
                             progress=False)
    dup = report.metrics["audit"]["duplicates"]
    found = {(p["a"], p["b"]) for p in dup["pairs"]}
    for k, r in enumerate(rows[:8]):
        assert (Path(r["path"]).stem, f"copy{k}") in found
    assert dup["leaks"] == [] and len(dup["merged"]) >= 8
    splits = json.loads((tmp_path / "merged" / "splits.json").read_text())
    test = set(splits["test"])
    for k, r in enumerate(rows[:8]):  # each copy sits in the same set as its original
        assert (Path(r["path"]).stem in test) == (f"copy{k}" in test)


def test_duplicated_slide_features_are_refused(tmp_path: Path) -> None:
    """A slide's feature store copied under another slide and patient (and a second one
    with its embeddings slightly perturbed): train-mil stops before training and names them."""
    import h5py

    from wsi_mil.data.mil_import import import_classic

    manifest = import_classic("musk1", shared("mil"), tmp_path / "musk")
    feats = tmp_path / "musk" / "features"
    rows = list(csv.DictReader(open(manifest)))
    with open(manifest, "a", newline="") as fh:
        w = csv.writer(fh)
        for src, new, noise in ((rows[3], "dup-exact", 0.0), (rows[60], "dup-near", 1e-3)):
            shutil.copy(feats / f"{src['slide_id']}.h5", feats / f"{new}.h5")
            with h5py.File(feats / f"{new}.h5", "r+") as f:
                f.attrs["slide_id"] = new
                if noise:
                    x = f["features"][...]
                    f["features"][...] = x + np.random.default_rng(0).normal(0, noise, x.shape).astype(x.dtype)
            w.writerow([new, str(feats / f"{new}.h5"), f"patient-{new}", src["label"]])
    res = subprocess.run(WSI_MIL + ["train-mil", str(manifest), "--features", str(feats), "--out", str(tmp_path / "run"),
                                    "--folds", "3", "--epochs", "2", "--no-progress", "-q"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "near-duplicate slide pair(s)" in res.stderr and "dup-exact" in res.stderr and "--duplicates merge" in res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_duplicated_patches_inside_a_slide_are_flagged() -> None:
    """Real MIL bags (UCSB breast): a bag whose patches include re-embedded copies of its own
    patches is flagged with the count; the untouched bags are not, and no two different bags
    of the set are taken for duplicates (two pairs of similar benign images reach 0.97 and
    0.99 patch cosine without being copies)."""
    from wsi_mil.data.duplicates import slide_pairs
    from wsi_mil.data.mil_import import load_classic

    bags = load_classic("ucsb_breast_cancer", shared("mil"))
    feats = [b.features for b in bags]
    rng = np.random.default_rng(1)
    base = feats[5]
    copies = base[:6] * (1 + rng.normal(0, 1e-4, base[:6].shape)).astype(np.float32)
    feats[5] = np.concatenate([base, copies])
    ids = [b.slide_id for b in bags]
    pairs, within = slide_pairs(ids, ids, lambda i: feats[i])
    assert pairs == []
    assert set(within) == {ids[5]} and within[ids[5]]["n_patches_duplicated"] == 12  # 6 originals + 6 copies


def test_patient_level_intervals_come_from_scipy_and_agree_with_the_loop_they_replace(elephant_predictions) -> None:
    """The patient-level bootstrap resamples patients with scipy.stats.bootstrap, every resample's
    AUC / sensitivity / specificity computed at once from case weights. On real out-of-fold
    predictions (the Elephant bags' AUC from a logistic regression on bag means; bags grouped two or
    three to a patient) its intervals agree with the Python loop over scikit-learn it replaces within
    Monte Carlo error, in a fraction of the time; the weighted AUC is scikit-learn's, value for value."""
    import time

    from sklearn.metrics import roc_auc_score

    from wsi_mil.eval.audit import patient_bootstrap
    from wsi_mil.eval.metrics import clustered_interval, weighted_auc

    y, p = elephant_predictions
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(80), 3)[rng.permutation(240)][: len(y)].astype(str)  # 2-3 bags per patient
    thr = np.full(len(y), 0.5)
    n_boot = 2000
    t0 = time.perf_counter()
    new = patient_bootstrap(y, p, thr, patients, n_boot=n_boot, seed=0)
    fast = time.perf_counter() - t0
    # the loop it replaces (percentile intervals over patient resamples)
    uniq, inverse = np.unique(patients, return_inverse=True)
    rows = [np.flatnonzero(inverse == k) for k in range(len(uniq))]
    stats: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": []}
    t0 = time.perf_counter()
    for _ in range(n_boot):
        idx = np.concatenate([rows[k] for k in rng.integers(0, len(uniq), len(uniq))])
        yy, pp = y[idx], p[idx]
        stats["auc"].append(roc_auc_score(yy, pp))
        stats["sensitivity"].append(float((pp[yy == 1] >= 0.5).mean()))
        stats["specificity"].append(float((pp[yy == 0] < 0.5).mean()))
    slow = time.perf_counter() - t0
    for key, values in stats.items():
        old = np.quantile(values, [0.025, 0.975])
        assert new[key] is not None and abs(new[key][0] - old[0]) < 0.03 and abs(new[key][1] - old[1]) < 0.03, (key, new, old)
    assert new["auc"][0] < roc_auc_score(y, p) < new["auc"][1]
    assert fast < slow / 5, (fast, slow)
    # weighted AUC (ties half) against scikit-learn's sample weights
    w = rng.integers(0, 4, (5, len(y))).astype(float)
    pr = np.round(p, 1)  # many ties
    for row in w:
        assert weighted_auc(row[None], y, pr)[0] == pytest.approx(roc_auc_score(y, pr, sample_weight=row))
    assert np.isnan(weighted_auc(np.where(y == 1, 1.0, 0.0)[None], y, p)[0])  # no negative drawn: undefined
    # a statistic undefined on most resamples has no interval; one of every resample's same value is percentile
    few = np.array(["a", "b", "c", "d", "e"] * 2)
    assert clustered_interval(lambda w: np.where(w[:, 0] > 0, 1.0, np.nan), few, n_boot=200) == (None, None)
    assert clustered_interval(lambda w: np.ones(len(w)), few, n_boot=200) == ((1.0, 1.0), "percentile")


def test_patient_level_intervals_refuse_what_would_give_a_silent_number() -> None:
    """From a stranger's trial: a NaN score or threshold, labels other than 0 / 1 and a patient
    list of another length are refused (a NaN ranked as the highest score and gave an interval);
    ids 1 and "1" are two patients, as the subgroup's patient count says; too few resamples give no
    interval; the subgroup's ci_method says which method each interval took, or why none ran."""
    from wsi_mil.eval.audit import patient_intervals
    from wsi_mil.eval.metrics import auc_interval, clustered_interval, weighted_auc

    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 0, 1, 1, 0], 10)
    p = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
    patients = np.repeat(np.arange(20), 3)
    thr = np.full(60, 0.5)
    for bad in ({"p": np.where(np.arange(60) == 3, np.nan, p)}, {"thr": np.where(np.arange(60) == 3, np.nan, thr)},
                {"y": np.where(np.arange(60) == 3, 2, y)}, {"patients": patients[:-1]}):
        args = {"y": y, "p": p, "thr": thr, "patients": patients, **bad}
        with pytest.raises(ValueError):
            patient_intervals(args["y"], args["p"], args["thr"], args["patients"], n_boot=200, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        weighted_auc(np.ones((1, 4)), np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.3, 0.4]))
    mixed = np.array([i if i < 10 else str(i - 10) for i in patients], dtype=object)  # 1 and "1": two patients
    seen = []
    clustered_interval(lambda w: seen.append(w) or w.sum(axis=-1), mixed, n_boot=50)
    w = seen[0]  # each resample's case weights: patient 1's cases and patient "1"'s are drawn apart
    one, text_one = [i for i, v in enumerate(mixed.tolist()) if v == 1 and not isinstance(v, str)], \
        [i for i, v in enumerate(mixed.tolist()) if v == "1"]
    assert (w[:, one] == w[:, one[:1]]).all() and (w[:, one[0]] != w[:, text_one[0]]).any()
    assert clustered_interval(lambda w: w.sum(axis=-1), patients, n_boot=1) == (None, None)
    assert auc_interval(y, p, n_boot=0) == (None, None)
    groups = subgroup_report(y, p, 0.5, {"site": ["A"] * 48 + ["B"] * 12}, n_boot=200,
                             patients=[str(v) for v in np.r_[patients[:48], np.repeat([16, 17, 18], 4)]])["site"]["groups"]
    a, b = groups
    assert a["ci_method"].startswith("patient-level bootstrap (scipy") and "auc BCa" in a["ci_method"]
    assert b["n_patients"] == 3 and b["ci_method"].startswith("patient-level bootstrap not run: 3 patient(s)")
    assert b["auc_ci95"] is None
