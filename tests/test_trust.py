"""Results to trust on real data: class weights and the selection metric, out-of-fold
probabilities, the out-of-distribution score, calibration, and duplicate-aware folds."""

import dataclasses
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import IDENT
from support import run_featcache

from featcache.bundle import load_bundle, save_bundle
from featcache.cache import FeatureCache, write_cache
from featcache.calibration import expected_calibration_error, fit_temperature
from featcache.cli import cli
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.fit import Selection, _folds, evaluate, fit
from featcache.oof import load_oof
from featcache.outliers import fit_outlier_score


def _cache(path, X, y, classes=None):
    classes = classes or [f"c{i}" for i in range(int(y.max()) + 1)]
    paths = [f"{classes[c]}/{i:05d}.jpg" for i, c in enumerate(y)]
    order = np.argsort(paths)
    n = len(y)
    cache = FeatureCache(
        X[order].astype(np.float32), y[order].astype(np.int32), [paths[i] for i in order],
        np.zeros(n, np.int64), np.zeros(n, np.int64), classes, IDENT,
    )  # fmt: skip
    write_cache(cache, path)
    return path


def _imbalanced(seed=0, sizes=(200, 200, 12), overlap=0.3, dim=32):
    """Three overlapping Gaussian classes, the last one small."""
    r = np.random.default_rng(seed)
    centers = r.normal(0, 1, (len(sizes), dim)) * overlap
    y = np.repeat(np.arange(len(sizes)), sizes)
    return centers[y] + r.normal(0, 1, (len(y), dim)), y


def test_class_weights_change_the_chosen_model_on_imbalanced_classes(tmp_path):
    X, y = _imbalanced()
    cache = _cache(tmp_path / "f.h5", X, y)
    with pytest.warns(
        FeatcacheWarning, match=r"class c2 \(12 images\): recall .* out of fold; mostly mistaken for"
    ):
        plain = fit(cache, model="logreg", cv=4, output=tmp_path / "a",
                    selection=Selection(class_weight="none", select_by="accuracy")).report  # fmt: skip
    weighted = fit(cache, model="logreg", cv=4, output=tmp_path / "b").report  # the defaults
    for report in (plain, weighted):  # a temperature is kept only where it lowers the out-of-fold ECE
        cal = report["calibration"]
        assert cal["ece"] < cal["ece_before"] if cal["scaled"] else cal["ece"] == cal["ece_before"]
    assert plain["low_recall"] and plain["low_recall"][0]["folder"] == "c2"
    assert weighted["families"]["logreg"]["best_params"]["clf__class_weight"] == "balanced"
    assert "clf__class_weight" not in plain["families"]["logreg"]["best_params"]
    p, w = plain["families"]["logreg"], weighted["families"]["logreg"]
    assert w["min_recall"] > p["min_recall"] + 0.2
    assert w["cv_balanced_accuracy_mean"] > p["cv_balanced_accuracy_mean"]
    # every family takes the weighting
    for family in ("linsvm", "softmax"):
        report = fit(cache, model=family, cv=4, output=tmp_path / family).report
        grid = report["families"][family]["grid"]
        assert {g["params"]["clf__class_weight"] for g in grid} == {None, "balanced"}


def test_balanced_classes_keep_the_plain_grid(tmp_path):
    X, y = _imbalanced(sizes=(60, 60, 60))
    report = fit(_cache(tmp_path / "f.h5", X, y), model="logreg", cv=3, output=tmp_path / "m").report
    assert all("clf__class_weight" not in g["params"] for g in report["families"]["logreg"]["grid"])
    assert report["select_by"] == "balanced_accuracy"


def test_out_of_fold_probabilities_are_kept_with_paths(tmp_path):
    X, y = _imbalanced(sizes=(40, 40, 40))
    cache = _cache(tmp_path / "f.h5", X, y)
    result = fit(cache, model="softmax", cv=3, output=tmp_path / "m")
    oof = load_oof(tmp_path / "m")
    assert oof["probabilities"].shape == (120, 3) and len(oof["paths"]) == 120
    np.testing.assert_allclose(oof["probabilities"].sum(axis=1), 1, atol=1e-5)
    assert list(oof["folders"]) == ["c0", "c1", "c2"] and oof["paths"][0].startswith("c0/")
    predicted = oof["folders"][oof["probabilities"].argmax(axis=1)]
    confusion = np.array(result.report["confusion_matrix"])
    assert np.trace(confusion) == np.sum(predicted == oof["truth"])  # the same out-of-fold predictions


def test_the_threshold_comes_from_out_of_fold_scores(tmp_path):
    X, y = _imbalanced(sizes=(60, 60, 60), overlap=2.0)
    result = fit(_cache(tmp_path / "f.h5", X, y), model="logreg", cv=3, output=tmp_path / "m")
    bundle, oof = load_bundle(result.model_path), load_oof(tmp_path / "m")
    assert bundle.outlier.threshold == pytest.approx(np.quantile(oof["ood_score"], 0.95), rel=1e-6)
    in_sample = np.quantile(bundle.outlier.score(X), 0.95)
    assert in_sample < bundle.outlier.threshold  # in-sample scores are smaller: they would flag too many


def test_the_ood_score_flags_another_distribution():
    r = np.random.default_rng(0)
    X, y = _imbalanced(sizes=(150, 150, 150), overlap=2.0, dim=48)
    oof = np.zeros(len(y))
    for train, test in _folds(y, None, 5, 0):
        oof[test] = fit_outlier_score(X[train], y[train]).score(X[test])
    score = fit_outlier_score(X, y).with_threshold(oof)
    fresh, _ = _imbalanced(seed=0, sizes=(150, 150, 150), overlap=2.0, dim=48)  # the same class centers
    fresh = fresh + r.normal(0, 1, fresh.shape) * 0.1  # new draws around them
    other = r.normal(0, 1, (300, 48)) * 1.5 + r.normal(0, 3, 48)  # another distribution
    assert np.mean(~score.unknown(fresh)) > 0.9
    assert np.mean(score.unknown(other)) > 0.95


def test_temperature_scaling_lowers_ece():
    r = np.random.default_rng(0)
    y = r.integers(0, 4, 2000)
    logits = r.normal(0, 1, (2000, 4))
    logits[np.arange(2000), y] += 1.0
    overconfident = 6 * logits
    p = np.exp(overconfident - overconfident.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    beta = fit_temperature(overconfident, y)
    q = np.exp(beta * overconfident - (beta * overconfident).max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert beta < 0.4 and expected_calibration_error(q, y) < 0.03 < expected_calibration_error(p, y)


def test_grouped_folds_never_split_a_duplicate_group(tmp_path):
    X, y = _imbalanced(sizes=(60, 60, 60), overlap=2.0)
    r = np.random.default_rng(1)
    picks = r.choice(len(y), 30, replace=False)
    copies = [X[picks] + r.normal(0, 0.01, (30, X.shape[1])) for _ in range(3)]  # 3 near-copies of 30
    X2, y2 = np.vstack([X, *copies]), np.concatenate([y, y[picks], y[picks], y[picks]])
    cache = _cache(tmp_path / "f.h5", X2, y2)
    from featcache.duplicates import near_duplicate_groups

    groups = near_duplicate_groups(X2)
    assert len(np.unique(groups)) == len(y)  # each original with its 3 copies
    for train, test in _folds(y2, groups, 5, 0):
        assert not set(groups[train]) & set(groups[test])
    report = fit(cache, model="logreg", cv=5, output=tmp_path / "m").report
    assert report["duplicates"]["groups"] == 30 and report["duplicates"]["rows"] == 120
    assert "without_grouping" in report["duplicates"]
    off = fit(cache, model="logreg", cv=5, output=tmp_path / "n", selection=Selection(group_duplicates=False))
    assert off.report["duplicates"] == {"grouped": False}


def test_a_class_that_is_one_duplicate_group_is_one_clear_error(tmp_path):
    X, y = _imbalanced(sizes=(30, 30, 6), overlap=2.0)
    X[y == 2] = X[y == 2][0] + np.random.default_rng(0).normal(0, 1e-3, (6, X.shape[1]))
    cache = _cache(tmp_path / "f.h5", X, y)
    with pytest.raises(FeatcacheError, match="all 6 images of class c2 are near-duplicates"):
        fit(cache, model="logreg", cv=3, output=tmp_path / "m")
    assert not (tmp_path / "m" / "best.joblib").exists()
    run = run_featcache(["fit", cache, "--model", "logreg", "--cv", "3", "-o", tmp_path / "m"], timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: all 6 images of class c2")
    assert lines[0].endswith("or turn grouping off (--no-group-duplicates)")


def test_bad_selection_settings_are_refused(tmp_path):
    X, y = _imbalanced(sizes=(30, 30, 30))
    cache = _cache(tmp_path / "f.h5", X, y)
    with pytest.raises(
        FeatcacheError, match="select_by must be one of balanced_accuracy, accuracy, macro_f1"
    ):
        fit(cache, output=tmp_path / "m", selection=Selection(select_by="auc"))
    with pytest.raises(FeatcacheError, match="class_weight must be one of auto, none, balanced"):
        fit(cache, output=tmp_path / "m", selection=Selection(class_weight="yes"))


def test_the_cli_reports_what_it_chose_and_plots_calibration(tmp_path):
    X, y = _imbalanced()
    cache = _cache(tmp_path / "f.h5", X, y)
    run = CliRunner().invoke(
        cli, ["fit", str(cache), "--model", "logreg", "--cv", "4", "-o", str(tmp_path / "m")]
    )
    assert run.exit_code == 0, run.output
    assert "best by out-of-fold balanced accuracy" in run.output and "min recall" in run.output
    assert "calibration: ECE" in run.output and "unknown images: ood_score above" in run.output
    printed = next(line for line in run.output.splitlines() if "plot --calibration" in line)
    command = printed.split("featcache ", 1)[1].split("#")[0].split()
    run = CliRunner().invoke(cli, command)
    assert run.exit_code == 0, run.output
    assert (tmp_path / "m" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = CliRunner().invoke(cli, ["evaluate", str(cache), "--model-path", str(tmp_path / "m")])
    assert "coverage" in ev.output and "% answered" in ev.output


def test_a_bundle_from_before_predicts_without_unknown(tmp_path):
    X, y = _imbalanced(sizes=(30, 30, 30), overlap=2.0)
    cache = _cache(tmp_path / "f.h5", X, y)
    path = fit(cache, model="logreg", cv=3, output=tmp_path / "m").model_path
    old = dataclasses.replace(load_bundle(path), outlier=None)
    content = old.to_dict()
    del content["outlier"]  # as bundles were written before
    assert "outlier" not in content
    save_bundle(old, tmp_path / "old.joblib")
    bundle = load_bundle(tmp_path / "old.joblib")
    assert bundle.outlier is None and bundle.ood_score(X) is None
    ev = evaluate(cache, tmp_path / "old.joblib")
    assert ev.coverage is None and ev.accuracy > 0.5
    assert bundle.card()["ood_threshold"] is None and json.dumps(bundle.card())


def test_predict_flags_generated_images_of_another_kind(tmp_path):
    # the model knows smooth colour fields with blocks (make_dataset); noise, checkerboards and flat
    # colours are none of its classes, through the real backbone and the command line
    from conftest import make_dataset
    from PIL import Image

    from featcache.extract import extract

    data = make_dataset(tmp_path / "data", per_class=20)
    held = make_dataset(tmp_path / "held", per_class=10, seed=7)
    extract(data, tmp_path / "f.h5", backbone="efficientnet_lite0")
    fit(tmp_path / "f.h5", model="logreg", cv=3, output=tmp_path / "m")
    other = tmp_path / "other"
    other.mkdir()
    r = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    for i in range(6):
        Image.fromarray(r.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(other / f"noise{i}.png")
        board = ((xx // (2 + i)) + (yy // (2 + i))) % 2 * 255
        Image.fromarray(board.astype(np.uint8)).convert("RGB").save(other / f"board{i}.png")
        Image.fromarray(np.full((48, 64, 3), r.integers(0, 256, 3), dtype=np.uint8)).save(
            other / f"flat{i}.png"
        )
    runner = CliRunner()
    shown = {}
    for folder in (held, other):
        run = runner.invoke(cli, ["predict", str(folder), "--model-path", str(tmp_path / "m"), "--json"])
        assert run.exit_code == 0, run.output
        shown[folder.name] = [json.loads(line) for line in run.stdout.splitlines()]
    assert all(isinstance(d["ood_score"], float) for d in shown["held"] + shown["other"])
    assert np.mean([d["unknown"] for d in shown["held"]]) <= 0.15  # the threshold keeps about 95 %
    assert all(d["unknown"] for d in shown["other"])
    plain = runner.invoke(cli, ["predict", str(other / "noise0.png"), "--model-path", str(tmp_path / "m")])
    assert re.fullmatch(r".*noise0.png\tunknown \(closest: (cat|dog|fox) \d+ %\)\n", plain.stdout)
    # --min-confidence abstains on what the score alone keeps
    run = runner.invoke(cli, ["predict", str(held), "--model-path", str(tmp_path / "m"), "--json",
                              "--min-confidence", "1"])  # fmt: skip
    assert all(json.loads(line)["unknown"] for line in run.stdout.splitlines())
