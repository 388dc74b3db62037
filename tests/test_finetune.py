"""Feature maps in the cache (`extract --maps`) and fine-tuning the network above them
(`fit --model finetune`): the maps, the estimator, and one model through every way of predicting."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import make_dataset, make_image
from support import predict_in_a_new_process, start_featcache

from featcache.backbones.build import build_backbone
from featcache.backbones.normalize import normalize
from featcache.backbones.openvino_engine import cosines, ir_folder
from featcache.bundle import load_bundle, save_bundle
from featcache.cache import Rows, RowView, read_cache
from featcache.cli import main
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.export import export
from featcache.extract import extract
from featcache.files import file_sha256
from featcache.finetune import FinetuneClassifier
from featcache.fit import evaluate, fit
from featcache.images import load_pixels
from featcache.models import TemperatureScaled
from featcache.predictor import Predictor

BACKBONE = "efficientnet_lite0"
STAGE = 5  # 192x7x7 maps: the last block and the head convolution are trained, in seconds
MAPS_AGREE = 0.03
"""Largest probability difference between the model on the cache's float16 maps and on pixels
(the maps of one are rounded to float16, and the other's network has its BatchNorms folded)."""
ENGINES_AGREE = 1e-4
"""Largest probability difference between OpenVINO and PyTorch, and between ONNX and predict."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("finetune") / "data", per_class=8)


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    """A cache with the maps of stage 5, and a finetune model fit on it."""
    root = tmp_path_factory.mktemp("tuned")
    cache = extract(data, root / "maps.h5", backbone=BACKBONE, maps=STAGE).output
    result = fit(cache, model="finetune", cv=3, output=root / "models")
    return cache, result


def _stage_output(pixels, stage):
    """What timm's own network gives after ``blocks[stage]``, unfolded and eager."""
    import timm

    from featcache.backbones.build import pretrained_network

    ident = build_backbone(BACKBONE, engine="torch", traced=False).identity
    _, model = pretrained_network(ident)
    assert isinstance(model, timm.models.efficientnet.EfficientNet)
    with torch.inference_mode():
        x = model.bn1(model.conv_stem(normalize(pixels, ident.preprocessing)))
        for block in model.blocks[: stage + 1]:
            x = block(x)
    return x.numpy()


@pytest.mark.parametrize("engine", ["openvino", "torch"])
def test_the_cached_maps_are_the_stage_output_of_the_eager_network(tmp_path, data, engine):
    out = tmp_path / "maps.h5"
    result = extract(data, out, backbone=BACKBONE, maps=4, engine=engine)
    assert result.identity.maps == 4 and result.engine == engine
    cache = read_cache(out, maps=True)
    assert cache.maps.dtype == np.float16 and cache.maps.shape == (24, 112, 14, 14)
    pixels = np.stack([load_pixels(data / p, cache.identity.preprocessing) for p in cache.paths])
    expected = _stage_output(pixels, 4)
    scale = np.abs(expected).max()
    assert np.abs(cache.maps.astype(np.float32) - expected).max() <= 2e-3 * scale
    # and the pooled features come from the same pass, equal to a cache without maps
    plain = read_cache(extract(data, tmp_path / "plain.h5", backbone=BACKBONE, engine=engine).output)
    np.testing.assert_allclose(cache.features, plain.features, rtol=0, atol=1e-5)
    lazy = read_cache(out)
    assert isinstance(lazy.maps, Rows) and lazy.maps._all is None  # read only when asked for


def test_maps_are_kept_incrementally_and_shown_by_info(tmp_path, data, capsys):
    out = tmp_path / "maps.h5"
    first = extract(data, out, backbone=BACKBONE, maps=STAGE)
    make_image(data / "cat" / "new.jpg", 999)
    try:
        again = extract(data, out)  # the recorded settings, maps included
        assert (first.n_computed, again.n_computed, again.n_reused) == (24, 1, 24)
        cache = read_cache(out, maps=True)
        fresh = read_cache(
            extract(data, tmp_path / "fresh.h5", backbone=BACKBONE, maps=STAGE).output, maps=True
        )
        assert cache.paths == fresh.paths
        np.testing.assert_array_equal(cache.maps, fresh.maps)
    finally:
        (data / "cat" / "new.jpg").unlink()
    with pytest.raises(SystemExit) as e:
        main(["info", str(out)])
    assert e.value.code == 0
    assert "maps         stage 5: 192x7x7 float16, 18.4 KiB per image" in capsys.readouterr().out


def test_maps_of_a_stage_that_does_not_exist_are_refused(tmp_path, data):
    with pytest.raises(
        FeatcacheError, match=r"maps: 7 is not a stage of efficientnet_lite0; use a stage index 0-6"
    ):
        extract(data, tmp_path / "x.h5", backbone=BACKBONE, maps=7)
    assert not (tmp_path / "x.h5").exists()


def test_the_estimator_checks_its_settings_and_its_input(tuned):
    cache = read_cache(tuned[0], maps=True)
    X, y = cache.labelled(maps=True)
    with pytest.raises(ValueError, match=r"lr_max must be a number > 0, got -1"):
        FinetuneClassifier(cache.identity.to_dict(), lr_max=-1).fit(X, y)
    with pytest.raises(ValueError, match=r"decay must be one of \('onecycle', 'cosine', 'constant'\)"):
        FinetuneClassifier(cache.identity.to_dict(), decay="step").fit(X, y)
    with pytest.raises(ValueError, match=r"identity must be the identity dict of a cache made with --maps"):
        FinetuneClassifier({**cache.identity.to_dict(), "maps": None}).fit(X, y)
    with pytest.raises(ValueError, match=r"X must be the N×192×7×7 float maps of stage 5, got \(24, 1280\)"):
        FinetuneClassifier(cache.identity.to_dict()).fit(cache.labelled()[0], y)


def test_it_passes_sklearn_estimator_checks():
    # The whole check_estimator suite, none marked as expected to fail. Its data has any number of
    # features, so it runs the estimator without an identity: the new linear layer alone, trained
    # by the same loop (split, schedule, early stopping) as the network above a stage.
    from sklearn.utils.estimator_checks import check_estimator

    # The one check marked to fail: SGD on unscaled noisy blobs with class weights 1000 : 0.0001
    # (test_models.py::test_class_weights_raise_minority_recall checks class weights, and
    # test_finetune_class_weights below this estimator's)
    expected = {"check_class_weight_classifiers": "AdamW for 30 steps on unscaled blobs does not settle"}
    check_estimator(
        FinetuneClassifier(None, epochs=30, lr_max=0.05, device="cpu"), expected_failed_checks=expected
    )


def test_finetune_class_weights_raise_minority_recall():
    rng = np.random.default_rng(0)
    sizes = [300, 300, 30]
    X = np.vstack([rng.normal(c, 1.0, (n, 5)) for c, n in zip([0.0, 0.8, 1.6], sizes, strict=True)])
    y = np.repeat([0, 1, 2], sizes)
    X_test = np.vstack([rng.normal(c, 1.0, (200, 5)) for c in [0.0, 0.8, 1.6]]).astype(np.float32)
    recall = []
    for cw in (None, "balanced"):
        clf = FinetuneClassifier(None, epochs=20, lr_max=0.05, device="cpu", class_weight=cw)
        pred = clf.fit(X.astype(np.float32), y).predict(X_test[400:])
        recall.append(np.mean(pred == 2))
    assert recall[1] > recall[0] + 0.2, recall


def test_fitting_is_seeded_and_reported_epoch_by_epoch(tuned):
    cache = read_cache(tuned[0], maps=True)
    X, y = cache.labelled(maps=True)
    seen = []
    a = FinetuneClassifier(cache.identity.to_dict(), epochs=4, random_state=1).fit(X, y, on_epoch=seen.append)
    b = FinetuneClassifier(cache.identity.to_dict(), epochs=4, random_state=1).fit(X, y)
    c = FinetuneClassifier(cache.identity.to_dict(), epochs=4, random_state=2).fit(X, y)
    assert sum(seen) == 4 and seen[: a.n_iter_] == [1] * a.n_iter_
    assert a.state_.keys() == b.state_.keys()
    assert all(np.array_equal(a.state_[k], b.state_[k]) for k in a.state_)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert not np.array_equal(a.coef_, c.coef_)
    # the trained arrays moved away from the pretrained ones
    assert any(not np.array_equal(a.state_[k], c.state_[k]) for k in a.state_ if k.endswith("weight"))


def test_maps_are_streamed_from_disk_and_train_as_in_memory(tuned, monkeypatch):
    cache = read_cache(tuned[0])
    X, y = cache.labelled(maps=True)
    assert isinstance(X, RowView) and X.shape[0] == len(y)  # nothing read yet
    in_memory = np.asarray(X)
    reads = []
    real = Rows.read

    def counted(self, rows):
        reads.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(Rows, "read", counted)
    settings = {"epochs": 3, "batch_size": 8, "random_state": 1, "validation_fraction": 0.25}
    streamed = FinetuneClassifier(cache.identity.to_dict(), **settings).fit(X, y)
    assert reads and max(reads) <= 8 * 4  # batches, and the validation maps in blocks: never all 24
    monkeypatch.undo()
    loaded = FinetuneClassifier(cache.identity.to_dict(), **settings).fit(in_memory, y)
    assert all(np.array_equal(streamed.state_[k], loaded.state_[k]) for k in loaded.state_)
    np.testing.assert_array_equal(streamed.coef_, loaded.coef_)
    np.testing.assert_array_equal(streamed.predict_proba(X), loaded.predict_proba(in_memory))


def test_one_run_gives_the_last_and_the_best_epochs_weights(tuned):
    cache = read_cache(tuned[0])
    X, y = cache.labelled(maps=True)
    X = np.asarray(X)
    settings = {"epochs": 4, "validation_fraction": 0.25, "patience": 10, "random_state": 3}
    both = FinetuneClassifier(cache.identity.to_dict(), keep="last", **settings).fit(X, y)
    best = FinetuneClassifier(cache.identity.to_dict(), keep="best", **settings).fit(X, y)
    last = both.predict_proba(X)
    assert set(both.weights_) == {"last", "best"} and set(best.weights_) == {"best"}
    both.set_params(keep="best")  # no refit: the best epoch's weights were kept too
    assert all(np.array_equal(both.state_[k], best.state_[k]) for k in best.state_)
    np.testing.assert_array_equal(both.predict_proba(X), best.predict_proba(X))
    assert not np.array_equal(last, best.predict_proba(X))
    report = json.loads((tuned[1].report_path).read_text())["families"]["finetune"]
    assert [g["params"] for g in report["grid"]] == [{"clf__keep": "last"}, {"clf__keep": "best"}]
    assert report["fits"] == 2 * 3  # two settings scored on each of 3 folds, by one run per fold


def test_the_model_is_plain_arrays_that_load_with_the_allowlist(tuned):
    _, result = tuned
    bundle = load_bundle(result.model_path)
    assert bundle.family == "finetune" and result.report["best"] == "finetune"
    assert bundle.identity.tuned.startswith(f"{STAGE}:") and bundle.identity.tuned_stage == STAGE
    assert bundle.identity.maps is None and bundle.identity.feature_dim == 1280
    assert bundle.top and all(type(v) is np.ndarray for v in bundle.top.values())
    clf = bundle.pipeline.steps[-1][1]  # unpickled through the allowlist: arrays and estimators only
    if isinstance(clf, TemperatureScaled):  # its out-of-fold probabilities were poorly calibrated
        assert bundle.head.beta == clf.beta
        clf = clf.estimator_
    assert isinstance(clf, FinetuneClassifier) and not hasattr(clf, "_module")
    assert all(np.array_equal(clf.state_[k], bundle.top[k]) for k in bundle.top)
    assert bundle.card()["backbone"]["fine_tuned_after_stage"] == STAGE
    # an older featcache, which would ignore the fine-tuned weights, is told to upgrade
    from featcache.bundle import safe_load

    raw = safe_load(open(result.model_path, "rb").read())
    assert raw["format_version"] == 4


def test_fine_tuned_weights_that_are_not_the_recorded_ones_are_refused(tuned, tmp_path):
    bundle = load_bundle(tuned[1].model_path)
    key = next(k for k in bundle.top if k.endswith("weight"))
    bundle.top[key] = bundle.top[key] + 1
    with pytest.raises(FeatcacheError, match="its fine-tuned weights are not the recorded ones"):
        save_bundle(type(bundle).from_dict(bundle.to_dict()), tmp_path / "m.joblib")


def test_a_fine_tuned_model_predicts_the_same_everywhere(tuned, data, tmp_path):
    cache_path, result = tuned
    model = result.model_path
    files = sorted(data.rglob("*.jpg"))
    ov = Predictor.load(model, device="cpu")
    pt = Predictor.load(model, device="cpu", engine="torch")
    assert (ov.backbone.engine, pt.backbone.engine) == ("openvino", "torch")
    p_ov, p_pt = ov.predict_proba(files), pt.predict_proba(files)
    assert np.abs(p_ov - p_pt).max() <= ENGINES_AGREE

    # the pipeline on the cached maps (what cross-validation scored) against the pixels
    cache = read_cache(cache_path, maps=True)
    bundle = load_bundle(model)
    on_maps = bundle.pipeline.predict_proba(cache.maps)
    order = [cache.paths.index(str(f.relative_to(data))) for f in files]
    assert np.abs(on_maps[order] - p_ov).max() <= MAPS_AGREE
    assert (on_maps[order].argmax(1) == p_ov.argmax(1)).all()

    # evaluate: a folder is classified as predict does; the cache through the pipeline
    on_folder = evaluate(data, model)
    assert on_folder.predicted == [ov.names[i] for i in p_ov.argmax(1)]
    on_cache = evaluate(cache_path, model)
    assert on_cache.accuracy == on_folder.accuracy

    # one ONNX file with the trunk and the fine-tuned top
    onnx_path = tmp_path / "tuned.onnx"
    done = export(model, onnx_path, check_pixels=np.stack([load_pixels(f, bundle.identity.preprocessing)
                                                            for f in files]))  # fmt: skip
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pixels = np.stack([load_pixels(f, bundle.identity.preprocessing) for f in files])
    got = session.run(["probabilities"], {"pixels": pixels})[0]
    assert done.max_difference <= ENGINES_AGREE and np.abs(got - p_ov).max() <= ENGINES_AGREE
    assert json.loads(session.get_modelmeta().custom_metadata_map["featcache.identity"])["tuned"]


def test_predicting_needs_no_torch_once_converted_and_rebuilds_without_it(tuned, data, tmp_path):
    model = tuned[1].model_path
    image = sorted(data.rglob("*.jpg"))[0]
    converted = predict_in_a_new_process(model, image)
    assert ("torch" in converted["imported"], converted["engine"]) == (False, "openvino")  # fit converted it
    # on a machine where nothing was converted, the bundle's arrays rebuild it
    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(tmp_path / "empty-cache")}
    rebuilt = predict_in_a_new_process(model, image, env)
    difference = np.abs(np.array(converted["probabilities"]) - np.array(rebuilt["probabilities"])).max()
    assert "torch" in rebuilt["imported"] and difference <= ENGINES_AGREE


def test_all_includes_finetune_when_the_cache_keeps_maps(tmp_path, data):
    cache = extract(data, tmp_path / "m6.h5", backbone=BACKBONE, maps=6).output
    report = fit(cache, model="all", cv=2, output=tmp_path / "models").report
    assert list(report["families"]) == ["logreg", "linsvm", "softmax", "finetune"]
    assert report["families"]["finetune"]["fits"] == 2 * 2
    plain = extract(data, tmp_path / "plain.h5", backbone=BACKBONE).output
    assert "finetune" not in fit(plain, model="all", cv=2, output=tmp_path / "m2").report["families"]
    with pytest.raises(
        FeatcacheError, match=r"keeps no feature maps to fine-tune on: extract with --maps STAGE"
    ):
        fit(plain, model="finetune", cv=2, output=tmp_path / "m3")


@pytest.mark.slow
def test_a_fit_killed_while_it_trains_leaves_the_old_model(tuned, tmp_path):
    cache_path, result = tuned
    models = tmp_path / "models"
    models.mkdir()
    for name in os.listdir(result.model_path.parent):
        (models / name).write_bytes((result.model_path.parent / name).read_bytes())
    before = file_sha256(models / "best.joblib")
    proc = start_featcache(["fit", cache_path, "--model", "finetune", "--cv", "3", "-o", models],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline, seen = time.monotonic() + 120, b""
    os.set_blocking(proc.stderr.fileno(), False)
    while b"epoch" not in seen:  # the bar is moving: training is under way
        assert proc.poll() is None, seen.decode()
        assert time.monotonic() < deadline, "training never started"
        seen += proc.stderr.read() or b""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert file_sha256(models / "best.joblib") == before
    assert load_bundle(models).family == "finetune"
    assert not list(models.glob(".*.tmp-*"))


def test_choose_weighs_fine_tuning_against_linear_features(tmp_path, data):
    from featcache.choose import Candidate, choose

    work = tmp_path / "work"
    candidates = ["efficientnet_lite0@last", "efficientnet_lite0@finetune:6"]
    result = choose(data, candidates, per_class=6, cv=2, workdir=work)
    by_name = {str(s.candidate): s for s in result.scored}
    tuned, linear = by_name["efficientnet_lite0@finetune:6"], by_name["efficientnet_lite0@last"]
    assert tuned.candidate.family == "finetune" and linear.candidate.family == "logreg"
    assert tuned.fit_seconds > 0 and linear.fit_seconds > 0
    assert tuned.kib_per_image > linear.kib_per_image + 15  # 320x7x7 float16 maps: 30.6 KiB more
    assert read_cache(tuned.cache).identity.maps == 6
    assert tuned.extract_command(data).endswith(
        "-o efficientnet_lite0-finetune_6.h5 --backbone efficientnet_lite0 --maps 6"
    )
    assert tuned.fit_command() == "featcache fit efficientnet_lite0-finetune_6.h5 --model finetune"
    with pytest.raises(FeatcacheError, match="finetune:STAGE needs a stage index, got 'x'"):
        Candidate.parse("efficientnet_lite0@finetune:x")
    with pytest.raises(FeatcacheError, match="maps: 9 is not a stage of efficientnet_lite0"):
        choose(data, ["efficientnet_lite0@finetune:9"], per_class=6, cv=2, workdir=work)


def test_serve_answers_for_a_fine_tuned_model(tuned, data):
    import httpx
    from support import serving

    model = tuned[1].model_path
    paths = sorted(data.rglob("*.jpg"))[:5]
    expected = [p.to_dict() for p in Predictor.load(model).predict_files(paths)]
    with serving(model) as url:
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        got = httpx.post(f"{url}/predict", files=files, timeout=60).json()
        card = httpx.get(f"{url}/model", timeout=60).json()
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["probability"] for g in got] == pytest.approx([e["probability"] for e in expected], abs=1e-6)
    assert card["family"] == "finetune" and card["backbone"]["fine_tuned_after_stage"] == STAGE


def test_an_interrupted_extraction_with_maps_resumes_where_it_stopped(tmp_path, data):
    from featcache.errors import Interrupted

    reference = read_cache(
        extract(data, tmp_path / "ref.h5", backbone=BACKBONE, maps=STAGE).output, maps=True
    )
    out = tmp_path / "maps.h5"

    def stop_after_the_second_batch(progress):
        if progress.done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        extract(
            data, out, backbone=BACKBONE, maps=STAGE, batch_size=4, on_progress=stop_after_the_second_batch
        )
    assert not out.exists()
    resumed = extract(data, out, backbone=BACKBONE, maps=STAGE, batch_size=4)
    assert resumed.n_computed == 24 - 8
    cache = read_cache(out, maps=True)
    assert cache.paths == reference.paths
    np.testing.assert_array_equal(cache.maps, reference.maps)


@pytest.mark.filterwarnings("ignore:mobilenet_v2 uses random weights")
@pytest.mark.filterwarnings("ignore:class .* recall")  # random weights: a class may be missed
def test_mobilenet_v2_is_fine_tuned_above_its_stages_too(tmp_path, data):
    cache = extract(data, tmp_path / "m.h5", backbone="mobilenet_v2", weights="random", maps=5).output
    maps = read_cache(cache, maps=True)
    assert maps.maps.shape == (24, 160, 7, 7)
    model = fit(cache, model="finetune", cv=2, output=tmp_path / "models").model_path
    files = sorted(data.rglob("*.jpg"))
    on_pixels = Predictor.load(model, device="cpu").predict_proba(files)
    on_maps = load_bundle(model).pipeline.predict_proba(maps.maps)
    order = [maps.paths.index(str(f.relative_to(data))) for f in files]
    assert np.abs(on_maps[order] - on_pixels).max() <= MAPS_AGREE


def test_the_bundle_records_the_cache_it_was_fit_on_and_older_ones_are_read(tuned, tmp_path):
    from featcache.bundle import ModelBundle

    cache_path, result = tuned
    bundle = load_bundle(result.model_path)
    cache = read_cache(cache_path)
    assert bundle.fit_identity == cache.identity and bundle.fit_identity.maps == 5
    assert bundle.identity.maps is None and bundle.identity.tuned_stage == 5
    older = bundle.to_dict()
    del older["fit_identity"]  # a fine-tuned bundle saved before featcache recorded it
    again = ModelBundle.from_dict(older)
    assert again.fit_identity == cache.identity  # from its pipeline's estimator
    save_bundle(again, tmp_path / "older.joblib")
    ev = evaluate(cache_path, tmp_path / "older.joblib")
    assert ev.n_images == len(cache) and ev.accuracy == evaluate(cache_path, result.model_path).accuracy


def test_a_fine_tuned_network_quantises_to_int8_as_the_pretrained_one_does(tuned, data):
    model = tuned[1].model_path
    files = sorted(data.rglob("*.jpg"))
    fp32 = Predictor.load(model, device="cpu")
    with pytest.warns(FeatcacheWarning, match="fit on fp32 features and its backbone runs in int8"):
        int8 = Predictor.load(model, device="cpu", precision="int8")
    identity = int8.backbone.identity
    assert (int8.backbone.engine, identity.precision) == ("openvino", "int8") and identity.tuned
    assert ir_folder(identity) != ir_folder(fp32.backbone.identity) and ir_folder(identity).is_dir()
    # kept because it passed the check on the calibration photographs; on these synthetic pictures the
    # sparse features of a top tuned on 24 of them move more (0.90 here), the answers hardly
    assert cosines(fp32.embed(files), int8.embed(files)).mean() >= 0.85
    p32, p8 = fp32.predict_proba(files), int8.predict_proba(files)
    assert np.mean(p32.argmax(1) == p8.argmax(1)) >= 0.9 and np.abs(p32 - p8).max() <= 0.2
