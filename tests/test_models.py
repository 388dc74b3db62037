import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import check_estimator

from featcache.families import FAMILIES
from featcache.head import LinearHead
from featcache.models import Family, LinearSVM, SoftmaxClassifier, linear_head
from featcache.training import learning_rate

SGD_CLASS_WEIGHT = {
    "check_class_weight_classifiers": "SGD for 30 epochs on unscaled blobs (std 20) with class weights "
    "1000 : 0.0001 swings about the weighted optimum; test_class_weights_raise_minority_recall checks "
    "class weights on standardised data"
}


def test_softmax_passes_sklearn_estimator_checks():
    # The whole check_estimator suite, one marked as expected to fail (above); sklearn itself skips
    # its pandas and array-API checks when those libraries are not installed.
    check_estimator(SoftmaxClassifier(epochs=30, random_state=0), expected_failed_checks=SGD_CLASS_WEIGHT)


@pytest.mark.parametrize("make", [
    lambda cw: SoftmaxClassifier(random_state=0, class_weight=cw),
    lambda cw: LinearSVM(C=0.01, class_weight=cw),
])  # fmt: skip
def test_class_weights_raise_minority_recall(make):
    # 3 overlapping classes, one with a tenth of the images: "balanced" must find more of it, and a
    # dict weight must act like the weighting it spells out
    rng = np.random.default_rng(0)
    sizes = [300, 300, 30]
    X = np.vstack([rng.normal(c, 1.0, (n, 5)) for c, n in zip([0.0, 0.8, 1.6], sizes, strict=True)])
    y = np.repeat([0, 1, 2], sizes)
    X_test = np.vstack([rng.normal(c, 1.0, (200, 5)) for c in [0.0, 0.8, 1.6]])
    y_test = np.repeat([0, 1, 2], 200)

    def minority_recall(cw):
        pred = make(cw).fit(X, y).predict(X_test)
        return np.mean(pred[y_test == 2] == 2)

    plain, balanced = minority_recall(None), minority_recall("balanced")
    assert balanced > plain + 0.2, (plain, balanced)
    spelled = {c: len(y) / (3 * n) for c, n in enumerate(sizes)}
    assert minority_recall(spelled) == pytest.approx(balanced, abs=0.02)


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


def test_every_linear_family_is_a_pipeline_with_scaling():
    for family in (f for f in FAMILIES.values() if type(f) is Family):
        pipe = family.build(0)
        assert pipe.steps[0][0] == "scale"
        for key in family.grid:
            assert key in pipe.get_params()
        # a margin family is always saved temperature-scaled (fit learns beta out of fold)
        assert hasattr(family.build_final(0, {}, 1.0 if family.calibrate else None), "predict_proba")


def _svm_objective(coef, intercept, X, y, C):
    classes = np.unique(y)
    signs = np.where(y[:, None] == classes, 1.0, -1.0)
    slack = np.maximum(0, 1 - signs * (X @ coef.T + intercept))
    return 0.5 * np.sum(coef**2) + C * np.sum(slack**2)


def test_linear_svm_solves_the_linearsvc_problem():
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(4), 50)
    X = rng.normal(size=(4, 30))[y] * 0.7 + rng.normal(size=(200, 30))
    ours = LinearSVM(C=0.05, tol=1e-6, max_iter=5000).fit(X, y)
    # liblinear penalises the intercept; a large intercept_scaling makes that penalty negligible
    ref = LinearSVC(C=0.05, tol=1e-8, max_iter=100_000, intercept_scaling=100).fit(X, y)
    ours_obj = _svm_objective(ours.coef_, ours.intercept_, X, y, 0.05)
    ref_obj = _svm_objective(ref.coef_, ref.intercept_, X, y, 0.05)
    assert ours_obj <= ref_obj * (1 + 1e-4)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-3)
    assert (ours.predict(X) == ref.predict(X)).mean() >= 0.99


def test_linear_svm_binary_and_float32():
    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(-1, 1, (50, 8)), rng.normal(1, 1, (50, 8))]).astype(np.float32)
    y = np.array(["neg"] * 50 + ["pos"] * 50)
    svm = LinearSVM(C=1.0).fit(X, y)
    scores = svm.decision_function(X)
    assert scores.shape == (100,) and svm.coef_.shape == (1, 8)
    np.testing.assert_array_equal(svm.predict(X), np.where(scores > 0, "pos", "neg"))
    assert (svm.predict(X) == y).mean() > 0.9
    with pytest.raises(ValueError, match="C must be a number > 0, got -1"):
        LinearSVM(C=-1).fit(X, y)


def test_linear_svm_passes_sklearn_estimator_checks():
    check_estimator(LinearSVM())


@pytest.mark.parametrize("n_classes", [2, 5])
def test_calibration_keeps_the_cross_validated_predictions(n_classes):
    # linsvm is cross-validated uncalibrated and saved with temperature scaling: the saved model
    # must predict exactly what was scored, and give probabilities
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(n_classes), 40)
    X = rng.normal(size=(n_classes, 20))[y] * 0.5 + rng.normal(size=(len(y), 20))
    family = FAMILIES["linsvm"]
    params = {"clf__C": 0.01}
    raw = family.build(0).set_params(**params).fit(X, y)
    final = family.build_final(0, params, 2.5).fit(X, y)
    X_new = rng.normal(size=(300, 20))
    np.testing.assert_array_equal(final.predict(X_new), raw.predict(X_new))
    proba = final.predict_proba(X_new)
    np.testing.assert_allclose(proba.sum(1), 1)
    np.testing.assert_array_equal(final.classes_[proba.argmax(1)], raw.predict(X_new))


def test_cli_offers_every_family():
    from featcache.choices import MODELS
    from featcache.cli import fit as fit_command

    option = next(p for p in fit_command.params if p.name == "model")
    assert tuple(option.type.choices) == MODELS == (*FAMILIES, "all")


@pytest.mark.parametrize("family", sorted(n for n, f in FAMILIES.items() if type(f) is Family))
@pytest.mark.parametrize("n_classes", [2, 4])
def test_linear_head_gives_the_pipelines_probabilities(family, n_classes):
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(n_classes), 30)
    X = (rng.normal(size=(n_classes, 12))[y] + rng.normal(size=(len(y), 12))) * 3 + 5
    X = X.astype(np.float32)
    params = {k: v[0] for k, v in FAMILIES[family].grid.items()}
    final = FAMILIES[family].build_final(0, params, 1.7 if family == "linsvm" else None).fit(X, y)
    head = linear_head(final, X)
    assert head is not None and head.n_classes == n_classes
    X_new = (rng.normal(size=(200, 12)) * 4 + 5).astype(np.float32)
    np.testing.assert_allclose(head.predict_proba(X_new), final.predict_proba(X_new), rtol=0, atol=1e-5)
    assert LinearHead.from_dict(head.to_dict()).predict_proba(X_new[:3]).shape == (3, n_classes)


def test_linear_head_refuses_what_it_cannot_reproduce():
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(8)
    X, y = rng.normal(size=(60, 4)), np.repeat([0, 1, 2], 20)
    forest = Pipeline([("scale", StandardScaler()), ("clf", RandomForestClassifier(n_estimators=3))])
    assert linear_head(forest.fit(X, y), X) is None
    sigmoid = CalibratedClassifierCV(LinearSVM(), method="sigmoid", ensemble=False)  # not one softmax
    assert linear_head(Pipeline([("scale", StandardScaler()), ("clf", sigmoid)]).fit(X, y), X) is None

    class Nudged(Pipeline):  # probabilities the linear map cannot give: the check must notice
        def predict_proba(self, X):
            p = super().predict_proba(X) + 1e-3
            return p / p.sum(1, keepdims=True)

    assert linear_head(Nudged(FAMILIES["logreg"].build(0).steps).fit(X, y), X) is None


def test_softmax_update_is_pytorchs_sgd():
    """The NumPy trainer takes the steps torch.optim.SGD takes on nn.Linear with label smoothing."""
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(1)
    X, y = r.normal(size=(50, 6)).astype(np.float32), r.integers(0, 3, 50)
    params = dict(epochs=3, lr_max=0.1, decay="cosine", momentum=0.9, weight_decay=1e-3,
                  label_smoothing=0.1, batch_size=16, validation_fraction=0.0, random_state=7)  # fmt: skip
    ours = SoftmaxClassifier(**params).fit(X, y)

    rng = np.random.default_rng(7)  # the same draws as the estimator: init, then one order per epoch
    layer = torch.nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.uniform(-1 / 6**0.5, 1 / 6**0.5, (3, 6)).astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(rng.uniform(-1 / 6**0.5, 1 / 6**0.5, 3).astype(np.float32)))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for epoch in range(3):
        opt.param_groups[0]["lr"] = learning_rate(params["decay"], params["lr_max"], epoch / params["epochs"])
        order = torch.from_numpy(rng.permutation(50))
        for start in range(0, 50, 16):
            idx = order[start : start + 16]
            opt.zero_grad()
            loss_fn(layer(xt[idx]), yt[idx]).backward()
            opt.step()
    np.testing.assert_allclose(ours.coef_, layer.weight.detach().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.intercept_, layer.bias.detach().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_linear_svm_preconditioned_reaches_the_plain_optimum(monkeypatch, class_weight):
    # where rows outnumber features the solver works in preconditioned variables: the same optimum
    from featcache import models

    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(3), [300, 100, 50])
    mixing = rng.normal(size=(20, 20))  # correlated features: an ill-conditioned Hessian
    X = (rng.normal(size=(3, 20))[y] + rng.normal(size=(450, 20))) @ mixing
    pre = LinearSVM(C=0.01, tol=1e-7, class_weight=class_weight).fit(X, y)
    monkeypatch.setattr(models, "_preconditioner", lambda X, cost: (None, None))
    plain = LinearSVM(C=0.01, tol=1e-7, class_weight=class_weight).fit(X, y)
    objective = _svm_objective(plain.coef_, plain.intercept_, X, y, 0.01)
    if class_weight is None:
        assert _svm_objective(pre.coef_, pre.intercept_, X, y, 0.01) <= objective * (1 + 1e-6)
    np.testing.assert_allclose(pre.coef_, plain.coef_, rtol=0, atol=1e-4 * np.abs(plain.coef_).max())
    np.testing.assert_allclose(pre.intercept_, plain.intercept_, rtol=0, atol=1e-4)
