import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import check_estimator

from featcache.models import FAMILIES, SoftmaxClassifier


def test_softmax_passes_sklearn_estimator_checks():
    # The whole check_estimator suite, none marked as expected to fail; sklearn itself skips its
    # pandas and array-API checks when those libraries are not installed.
    check_estimator(SoftmaxClassifier(epochs=30, random_state=0))


def test_softmax_params_are_validated_at_fit():
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.repeat([0, 1], 10)
    clf = SoftmaxClassifier(decay="linear")  # stored unchanged, checked in fit
    assert clf.get_params()["decay"] == "linear"
    with pytest.raises(
        ValueError, match=r"decay must be one of \('constant', 'cosine', 'square'\), got 'linear'"
    ):
        clf.fit(X, y)
    with pytest.raises(ValueError, match="lr_max must be a number > 0"):
        SoftmaxClassifier(lr_max=0).fit(X, y)


@pytest.mark.parametrize("decay", ["constant", "cosine", "square"])
def test_softmax_learns_and_is_deterministic(decay):
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(-2, 1, (40, 5)), rng.normal(2, 1, (40, 5))])
    y = np.array(["a"] * 40 + ["b"] * 40)
    a = SoftmaxClassifier(epochs=40, decay=decay, label_smoothing=0.1, dropout=0.1, random_state=3).fit(X, y)
    b = clone(a).fit(X, y)
    assert (a.predict(X) == y).mean() > 0.95
    np.testing.assert_array_equal(a.coef_, b.coef_)
    proba = a.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1)
    assert list(a.classes_) == ["a", "b"] and 1 <= a.n_iter_ <= 40


def test_softmax_early_stopping_stops():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(200, 4)), rng.integers(0, 2, 200)  # nothing to learn
    clf = SoftmaxClassifier(epochs=500, patience=5, random_state=0).fit(X, y)
    assert clf.n_iter_ < 500


def test_every_family_is_a_pipeline_with_scaling():
    for family in FAMILIES.values():
        pipe = family.build(0)
        assert pipe.steps[0][0] == "scale" and hasattr(pipe, "predict_proba")
        for key in family.grid:
            assert key in pipe.get_params()
