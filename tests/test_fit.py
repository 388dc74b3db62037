import json

import numpy as np
import pytest
from conftest import IDENT, synthetic_cache

from featcache.backbones import BackboneIdentity, Preprocessing
from featcache.bundle import ModelBundle, load_bundle, manifest_path, save_bundle
from featcache.cache import Rows
from featcache.errors import FeatcacheError
from featcache.fit import Selection, evaluate, fit


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    cache = synthetic_cache(tmp / "features.h5")
    result = fit(cache, model="all", cv=3, output=tmp / "models")
    return tmp, cache, result


def test_every_family_is_near_perfect_on_separated_features(fitted):
    _, _, result = fitted
    for name, r in result.report["families"].items():
        assert r["cv_accuracy_mean"] >= 0.98, (name, r)
        assert r["fit_seconds"] > 0 and r["best_params"]
    assert result.report["best"] in ("logreg", "linsvm", "softmax")
    assert result.model_path.is_file() and manifest_path(result.model_path).is_file()
    assert json.loads(result.report_path.read_text())["best"] == result.report["best"]
    assert result.confusion_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cm = np.array(result.report["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == 120


@pytest.mark.parametrize("family", ["logreg", "linsvm", "softmax"])
def test_no_family_beats_chance_on_shuffled_labels(tmp_path, family):
    cache = synthetic_cache(tmp_path / "f.h5", shuffle_labels=True, per_class=40)
    report = fit(cache, model=family, cv=4, output=tmp_path / "m").report
    assert report["families"][family]["cv_accuracy_mean"] < 0.25 + 0.12  # chance is 0.25


def test_cv_results_identical_across_runs(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5", separation=0.4)  # hard enough that results vary with folds
    a = fit(cache, cv=3, output=tmp_path / "a").report
    b = fit(cache, cv=3, output=tmp_path / "b").report
    for family in a["families"]:
        ga, gb = a["families"][family]["grid"], b["families"][family]["grid"]
        assert ga == gb
    assert a["confusion_matrix"] == b["confusion_matrix"]
    c = fit(cache, cv=3, output=tmp_path / "c", seed=1).report
    assert any(c["families"][f]["grid"] != a["families"][f]["grid"] for f in a["families"])


def test_bundle_round_trip_and_evaluate(fitted):
    tmp, cache, result = fitted
    bundle = load_bundle(result.model_path)
    assert bundle.folders == ["c0", "c1", "c2", "c3"] == result.report["folders"]
    assert bundle.identity == IDENT and bundle.family == result.report["best"]
    assert bundle.report["best"] == result.report["best"] and bundle.featcache_version
    assert load_bundle(result.model_path.parent).pipeline_pickle == bundle.pipeline_pickle  # fit -o folder
    ev = evaluate(cache, result.model_path)
    assert ev.accuracy == 1.0 and ev.macro_f1 == 1.0 and ev.n_images == 120


def test_replacing_a_bundle_keeps_one_loadable(tmp_path):
    path = tmp_path / "m.joblib"
    save_bundle(ModelBundle("logreg", ["a", "b"], IDENT, report={"x": 1}), path)
    save_bundle(ModelBundle("logreg", ["a", "b"], IDENT, report={"x": 2}), path)
    assert load_bundle(path).report == {"x": 2}
    assert "previous_sha256" not in json.loads(manifest_path(path).read_text())


def test_model_refused_on_cache_of_other_backbone(fitted, tmp_path, monkeypatch):
    _, _, result = fitted
    other = BackboneIdentity("mobilenet_v2", "IMAGENET1K_V1", "b" * 64, Preprocessing(), "avg", 32)
    cache = synthetic_cache(tmp_path / "other.h5", identity=other)

    def refuse(self, *spans):
        raise AssertionError("rows were read before the identity was checked")

    monkeypatch.setattr(Rows, "_read", refuse)  # the check reads the cache's listing only
    with pytest.raises(
        FeatcacheError, match="extracted differently.*backbone: mobilenet_v2 vs efficientnet_lite0"
    ):
        evaluate(cache, result.model_path)


def test_too_few_images_per_class_is_a_clear_error(tmp_path):
    cache = synthetic_cache(tmp_path / "f.h5", per_class=3)
    with pytest.raises(FeatcacheError, match="than the 5 folds: c0 \\(3\\).*fewer folds than cv=5"):
        fit(cache, cv=5, output=tmp_path / "m")
    with pytest.raises(FeatcacheError, match="model must be one of logreg, linsvm, softmax, finetune, all"):
        fit(cache, model="forest", output=tmp_path / "m")


def test_only_convergence_warnings_are_counted_the_rest_reach_the_user():
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from featcache.fit import _convergence_warnings

    with pytest.warns(UserWarning, match="something else") as outside:
        with _convergence_warnings() as counted:
            warnings.warn("solver stopped", ConvergenceWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in counted] == ["solver stopped"]
    assert not [w for w in outside if issubclass(w.category, ConvergenceWarning)]


def test_fits_that_did_not_converge_are_counted_and_shown(tmp_path, monkeypatch):
    import dataclasses

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import featcache.families
    from featcache.report import families_table

    def one_iteration(seed):
        clf = LogisticRegression(max_iter=1, random_state=seed)
        return Pipeline([("scale", StandardScaler()), ("clf", clf)])

    stopped = dataclasses.replace(
        featcache.families.FAMILIES["logreg"], build=one_iteration, grid={"clf__C": [0.01, 0.1]}
    )
    monkeypatch.setitem(featcache.families.FAMILIES, "logreg", stopped)
    cache = synthetic_cache(tmp_path / "f.h5", separation=0.5)
    report = fit(cache, model="logreg", cv=3, output=tmp_path / "m").report
    family = report["families"]["logreg"]
    assert family["fits"] == 6 and family["not_converged"] == 6
    assert [g["not_converged"] for g in family["grid"]] == [3, 3] and report["refit_converged"] is False
    assert (
        json.loads((tmp_path / "m" / "report.json").read_text())["families"]["logreg"]["not_converged"] == 6
    )
    table = families_table(report)
    assert "logreg: 6 of 6 fits did not converge" in table
    assert "logreg: the final fit on all images did not converge" in table


def test_our_solvers_warn_like_scikit_learns():
    from sklearn.exceptions import ConvergenceWarning

    from featcache.models import LinearSVM, SoftmaxClassifier

    r = np.random.default_rng(0)
    X, y = r.normal(size=(120, 8)), np.repeat([0, 1, 2], 40)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        LinearSVM(C=10.0, max_iter=1).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="still improving after all epochs=2"):
        SoftmaxClassifier(epochs=2, lr_max=0.001).fit(X, y)


def test_the_table_keeps_its_columns_with_a_two_digit_spread():
    from featcache.report import families_table

    def family(mean, std):
        scores = {"cv_accuracy_mean": mean, "cv_accuracy_std": std, "cv_f1_macro_mean": mean}
        return {**scores, "fit_seconds": 1.0, "best_params": {"clf__C": 0.1}, "fits": 10, "not_converged": 0}

    families = {"logreg": family(0.525, 0.1084), "linsvm": family(0.9, 0.012)}
    report = {"best": "logreg", "families": families}
    lines = families_table(report).splitlines()
    assert len({line.index("%") for line in lines[1:]}) == 1, lines
    assert "52.50 ± 10.84 %" in lines[1] and "90.00 ±  1.20 %" in lines[2]


def test_warm_starts_along_c_reach_the_cold_start_optimum_in_fewer_iterations(rng):
    from featcache.models import LinearSVM

    X = rng.normal(size=(300, 20)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(scale=0.5, size=300) > 0).astype(int) + (X[:, 2] > 1)
    warm = LinearSVM(C=0.01, warm_start=True).fit(X, y)
    cold_iterations, warm_iterations = 0, 0
    for C in (0.03, 0.1, 0.3):
        warm.set_params(C=C).fit(X, y)
        cold = LinearSVM(C=C).fit(X, y)
        np.testing.assert_allclose(warm.coef_, cold.coef_, rtol=0, atol=1e-3)
        np.testing.assert_array_equal(warm.predict(X), cold.predict(X))
        cold_iterations, warm_iterations = cold_iterations + cold.n_iter_, warm_iterations + warm.n_iter_
    assert warm_iterations < cold_iterations
    with pytest.raises(ValueError, match="warm_start must be True or False"):
        LinearSVM(warm_start="yes").fit(X, y)


@pytest.mark.slow  # starts a Dask cluster
def test_fit_on_a_local_cluster_equals_one_process(tmp_path):
    from click.testing import CliRunner

    from featcache.cli import cli

    cache = synthetic_cache(tmp_path / "f.h5", separation=0.5, per_class=25)
    one = fit(cache, cv=3, output=tmp_path / "one").report
    run = CliRunner().invoke(cli, ["fit", str(cache), "--cv", "3", "-o", str(tmp_path / "two"),
                                   "--scheduler", "local:2"])  # fmt: skip
    assert run.exit_code == 0, run.output
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["best"] == one["best"]
    for family in one["families"]:
        assert two["families"][family]["grid"] == one["families"][family]["grid"], family
        assert two["families"][family]["best_params"] == one["families"][family]["best_params"]
    a, b = np.load(tmp_path / "one" / "oof.npz"), np.load(tmp_path / "two" / "oof.npz")
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=0, atol=1e-6)
    with pytest.raises(FeatcacheError, match="scheduler must be local, local:N or tcp://HOST:PORT"):
        fit(cache, cv=3, output=tmp_path / "three", selection=Selection(scheduler="yarn"))


def _warns_odd(X):
    import warnings

    warnings.warn("odd data", UserWarning, stacklevel=1)
    return X


def test_cv_in_worker_processes_equals_one_process_and_keeps_warnings(tmp_path, monkeypatch):
    # families fitting with one BLAS thread cross-validate in a process per core
    import dataclasses

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    import featcache.families
    from featcache import crossval
    from featcache.models import logreg

    def warning_logreg(seed):
        return Pipeline([("odd", FunctionTransformer(_warns_odd)), *logreg(seed).steps])

    family = dataclasses.replace(featcache.families.FAMILIES["logreg"], build=warning_logreg)
    assert family.blas_threads == 1 and featcache.families.FAMILIES["softmax"].blas_threads == 1
    monkeypatch.setitem(featcache.families.FAMILIES, "logreg", family)
    cache = synthetic_cache(tmp_path / "f.h5", separation=0.5, per_class=25)
    reports, asked, odd = {}, {}, {}
    for workers in (2, 1):
        calls = asked[workers] = []
        counted = lambda family, tasks, X, n=workers, c=calls: c.append(family.name) or n  # noqa: E731
        monkeypatch.setattr(crossval, "local_workers", counted)
        with pytest.warns(UserWarning, match="odd data") as caught:
            reports[workers] = fit(cache, cv=3, output=tmp_path / str(workers)).report
        odd[workers] = sum(str(w.message) == "odd data" for w in caught)
    assert {"logreg", "softmax", "linsvm"} <= set(asked[2])
    assert odd[2] == odd[1] > 5 * 3  # every fit's, from the workers too
    one, two = reports[1], reports[2]
    assert two["best"] == one["best"]
    for name in one["families"]:
        assert two["families"][name]["grid"] == one["families"][name]["grid"], name
    a, b = np.load(tmp_path / "1" / "oof.npz"), np.load(tmp_path / "2" / "oof.npz")
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=0, atol=1e-6)
