"""The optimised backbone (folded BatchNorm, channels_last) computes the unmodified model's
features; bf16 autocast runs only when asked, and a cache never mixes precisions."""

import warnings

import h5py
import numpy as np
import pytest
import torch
from conftest import make_dataset
from torch import nn

from featcache.backbones.build import build_backbone, cpu_has_bf16
from featcache.backbones.fold import fold_batchnorm
from featcache.cache import read_cache
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.extract import extract
from featcache.fit import fit
from featcache.images import load_pixels
from featcache.predictor import Predictor


def _pixels(net, photo, dataset_dir):
    images = [photo, photo[::-1], photo[:, ::-1].copy()]
    images += sorted(dataset_dir.rglob("*.jpg"))[:5]
    skdata = pytest.importorskip("skimage.data")
    images += [skdata.coffee(), skdata.chelsea(), skdata.astronaut()]
    return np.stack([load_pixels(im, net.preprocessing) for im in images])


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _randomise_batchnorm(model, seed=0):
    """Random BN statistics and affine maps, so that folding them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def test_lite0_optimised_matches_unmodified(lite0_backbone, photo, dataset):
    plain = build_backbone("efficientnet_lite0", optimize=False)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules())
    assert plain.folded == 0 and lite0_backbone.folded == n_bn == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lite0_backbone.model.modules())
    px = _pixels(plain, photo, dataset)
    fast, ref = lite0_backbone.embed(px), plain.embed(px)
    assert _cosines(fast, ref).min() >= 0.9999
    np.testing.assert_allclose(fast, ref, rtol=1e-3, atol=1e-4)
    assert lite0_backbone.identity == plain.identity  # the same features, so the same identity


@pytest.mark.filterwarnings("ignore::featcache.errors.FeatcacheWarning")
def test_mobilenet_optimised_matches_unmodified(photo, dataset):
    plain = build_backbone("mobilenet_v2", weights="random", optimize=False)
    fast = build_backbone("mobilenet_v2", weights="random", optimize=False)
    _randomise_batchnorm(plain.model)
    fast.model.load_state_dict(plain.model.state_dict())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())
    assert fold_batchnorm(fast.model, fast.entry.features) == n_bn == 52
    px = _pixels(plain, photo, dataset)
    a, b = fast.embed(px), plain.embed(px)
    assert np.abs(b).max() > 1e-3  # features of a useful size, so the comparison means something
    assert _cosines(a, b).min() >= 0.9999
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max())


class _Shared(nn.Module):
    """conv1's output feeds both its BN and a skip; conv2 and bn2 are called twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn1(y) + y
        y = self.bn2(self.conv2(y))
        y = self.bn2(self.conv2(y))
        return torch.relu(self.bn3(self.conv3(y)))


def test_fold_only_where_it_is_exact():
    torch.manual_seed(0)
    model = _Shared().eval()
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm(model, lambda m, t: m(t)) == 1  # only conv3 -> bn3
        after = model(x)
    assert isinstance(model.bn3, nn.Identity) and isinstance(model.bn1, nn.BatchNorm2d)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(_Shared().train(), lambda m, t: m(t))


def test_untraceable_model_runs_unfolded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    model = Branchy().eval()
    with pytest.warns(FeatcacheWarning, match="Branchy: its BatchNorms could not be folded .*runs unfolded"):
        assert fold_batchnorm(model, lambda m, t: m(t)) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)


def _autocast_seen(net):
    """Record, for each forward, whether CPU autocast was on when the first convolution ran."""
    seen = []
    first_conv = next(m for m in net.model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


@pytest.mark.filterwarnings("ignore:this CPU has no bfloat16")  # autocast runs bf16 all the same
def test_bf16_only_when_asked(lite0_backbone, photo):
    px = load_pixels(photo, lite0_backbone.preprocessing)[None]
    seen = _autocast_seen(lite0_backbone)
    fp32 = lite0_backbone.embed(px)
    assert seen == [False]
    bf16_net = build_backbone("efficientnet_lite0", precision="bf16", engine="torch", traced=False)
    assert bf16_net.identity.precision == "bf16"
    assert bf16_net.identity.differences(lite0_backbone.identity) == [("precision", "bf16", "fp32")]
    seen = _autocast_seen(bf16_net)
    bf16 = bf16_net.embed(px)
    assert seen == [True] and bf16.dtype == np.float32
    assert not np.allclose(bf16, fp32, rtol=0, atol=1e-6)  # bf16 really ran
    assert _cosines(bf16, fp32).min() > 0.99
    with pytest.raises(FeatcacheError, match="precision must be one of"):
        build_backbone("efficientnet_lite0", precision="fp16", engine="torch", traced=False)


@pytest.mark.filterwarnings("ignore:this CPU has no bfloat16")
@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_bf16_cache_bundle_and_predictor(tmp_path, engine):
    data = make_dataset(tmp_path / "data", per_class=4)
    out = tmp_path / "features.h5"
    extract(data, out, backbone="efficientnet_lite0", precision="bf16", workers=0, engine=engine)
    cache = read_cache(out)
    assert cache.identity.precision == "bf16"
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "bf16"
    with pytest.raises(FeatcacheError, match="precision: bf16 vs fp32"):
        extract(data, out, precision="fp32")  # never mixed into a bf16 cache
    assert extract(data, out, engine=engine).identity.precision == "bf16"  # not asked: the cache's
    with warnings.catch_warnings():
        # 4 tiny pictures per class: where the CPU really computes bf16 (AVX512-BF16, AMX), a class
        # may be barely recalled out of fold, which fit rightly warns about; not what this checks
        warnings.simplefilter("ignore", FeatcacheWarning)
        result = fit(out, model="logreg", cv=2, output=tmp_path / "models")
    predictor = Predictor.load(result.model_path, device="cpu", engine=engine)
    assert predictor.backbone.engine == engine and predictor.backbone.identity.precision == "bf16"
    if engine == "torch":
        seen = _autocast_seen(predictor.backbone)
    feats = predictor.embed([data / p for p in cache.paths])
    if engine == "torch":
        assert seen and all(seen)
    np.testing.assert_allclose(feats, cache.features, rtol=0, atol=1e-6)
    fp32 = Predictor.load(result.model_path.parent, device="cpu", engine=engine)  # to compare
    fp32.backbone = build_backbone("efficientnet_lite0", engine=engine)
    plain = fp32.embed([data / p for p in cache.paths])
    if engine == "torch" or cpu_has_bf16():
        assert not np.allclose(plain, feats, rtol=0, atol=1e-6)  # bf16 really ran
    else:  # OpenVINO on a CPU without bf16 instructions runs fp32, as its warning says
        np.testing.assert_allclose(plain, feats, rtol=0, atol=1e-6)
    assert _cosines(plain, feats).min() > 0.95  # tiny synthetic pictures: bf16's worst case
