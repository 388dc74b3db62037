import dataclasses
import hashlib
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from torchvision.models import MobileNet_V2_Weights

from featcache.backbones import get_entry, list_backbones
from featcache.backbones.build import build_backbone
from featcache.backbones.efficientnet_lite import FILENAME
from featcache.backbones.weights import resolve_weights
from featcache.errors import FeatcacheError, FeatcacheWarning
from featcache.images import load_pixels

IMAGENET = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", engine="torch", traced=False)


def _top(backbone, image, k):
    p = backbone.imagenet_logits(load_pixels(image, backbone.preprocessing)[None]).softmax(1)[0]
    top = p.topk(k)
    return [(IMAGENET[i], float(v)) for v, i in zip(top.values, top.indices, strict=False)]


def test_lite0_knows_espresso_and_cats(lite0):
    skdata = pytest.importorskip("skimage.data")
    coffee = _top(lite0, skdata.coffee(), 1)
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.5, coffee
    chelsea = _top(lite0, skdata.chelsea(), 3)
    assert CATS & {name for name, _ in chelsea}, chelsea


def test_lite0_identity(lite0):
    ident = lite0.identity
    assert ident.backbone == "efficientnet_lite0" and ident.weights == "IMAGENET1K"
    assert ident.weights_sha256.startswith("57934424")  # the hash prefix in the file name
    assert ident.feature_dim == 1280 and ident.pool == "avg"
    assert ident.preprocessing.mean == (0.5, 0.5, 0.5)
    assert type(ident).from_dict(ident.to_dict()) == ident


def test_embed_shapes_and_pools(lite0, photo):
    px = np.stack([load_pixels(photo, lite0.preprocessing)] * 2)
    avg = lite0.embed(px)
    assert avg.shape == (2, 1280) and avg.dtype == np.float32
    both = build_backbone("efficientnet_lite0", pool="avgmax", engine="torch", traced=False)
    am = both.embed(px)
    assert am.shape == (2, 2560) and both.identity.feature_dim == 2560
    np.testing.assert_allclose(am[:, :1280], avg, rtol=1e-5, atol=1e-6)
    mx = build_backbone("efficientnet_lite0", pool="max", engine="torch", traced=False).embed(px)
    assert (mx >= avg - 1e-6).all()
    assert [str(d) for d in both.identity.differences(lite0.identity)] == [
        "pool: avgmax vs avg", "feature_dim: 2560 vs 1280"
    ]
    assert both.identity.differences(lite0.identity)[0] == ("pool", "avgmax", "avg")


def test_explicit_weights_path_same_tensors(lite0):
    path = get_entry("efficientnet_lite0").weights[0].bundled()
    b = build_backbone("efficientnet_lite0", weights=str(path), engine="torch", traced=False)
    assert b.identity.weights == str(path)
    assert b.identity.weights_sha256 == lite0.identity.weights_sha256
    assert b.identity.differences(lite0.identity) == []


def test_missing_mobilenet_weights_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("FEATCACHE_OFFLINE", "1")
    with pytest.raises(FeatcacheError) as e:
        build_backbone("mobilenet_v2", engine="torch", traced=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "IMAGENET1K_V1" in msg and MobileNet_V2_Weights.IMAGENET1K_V1.url in msg
    assert str(tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth") in msg
    assert "weights=PATH, or use backbone='efficientnet_lite0', whose weights are installed here" in msg


def test_the_hub_folder_is_torchs(tmp_path, monkeypatch):
    from featcache.backbones.weights import hub_checkpoint_dir

    for env in ({"TORCH_HOME": str(tmp_path / "t")}, {"XDG_CACHE_HOME": str(tmp_path / "x")}, {}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code = "import sys; from featcache.backbones.weights import hub_checkpoint_dir as h; print(h())"
        without_torch = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert (
            without_torch.stdout.strip() == str(hub_checkpoint_dir()) == f"{torch.hub.get_dir()}/checkpoints"
        )


@pytest.fixture
def weights_server(tmp_path):
    """A web server on 127.0.0.1 serving tmp_path/served, stopped after the test."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _served_entry(url: str, filename: str):
    entry = get_entry("mobilenet_v2")
    source = dataclasses.replace(entry.weights[0], filename=filename, url=url + filename)
    return dataclasses.replace(entry, weights=(source,))


def test_weights_are_downloaded_whole_and_checked(tmp_path, monkeypatch, weights_server):
    served, url = weights_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FEATCACHE_OFFLINE", raising=False)
    state = tmp_path / "state.pth"
    torch.save(get_entry("mobilenet_v2").build().state_dict(), state)
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    good, bad = f"mobilenet_v2-{digest[:8]}.pth", "mobilenet_v2-00000000.pth"
    (served / good).write_bytes(state.read_bytes())
    (served / bad).write_bytes(state.read_bytes())
    progress = []
    label, path = resolve_weights(
        _served_entry(url, good), "IMAGENET1K_V1", on_progress=lambda *p: progress.append(p)
    )
    assert (label, path) == ("IMAGENET1K_V1", tmp_path / "torch" / "hub" / "checkpoints" / good)
    assert path.read_bytes() == state.read_bytes()
    size = state.stat().st_size
    assert progress[-1] == (size, size) and [p[0] for p in progress] == sorted(p[0] for p in progress)
    with pytest.raises(FeatcacheError, match="failed its hash check.*does not start with 00000000"):
        resolve_weights(_served_entry(url, bad), "IMAGENET1K_V1")
    assert sorted(p.name for p in path.parent.iterdir()) == [good]  # nothing of the bad one is left


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch, weights_server):
    _, url = weights_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("FEATCACHE_OFFLINE", raising=False)
    with pytest.raises(
        FeatcacheError, match=r"download failed: File not found\); download .* and save it as"
    ) as e:
        resolve_weights(_served_entry(url, "mobilenet_v2-12345678.pth"), "IMAGENET1K_V1")
    assert "\n" not in str(e.value)
    calls = []

    def no_network(request_url, timeout=None):
        calls.append(request_url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(
        FeatcacheError, match=r"download failed: .*name resolution\); download .* and save it as"
    ):
        build_backbone("mobilenet_v2", weights="IMAGENET1K_V2", engine="torch", traced=False)
    assert calls == [MobileNet_V2_Weights.IMAGENET1K_V2.url]


def test_hub_cache_is_used_and_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "mobilenet_v2-b0353104.pth").write_bytes(b"not the weights")
    with pytest.raises(FeatcacheError, match="damaged.*delete it"):
        build_backbone("mobilenet_v2", engine="torch", traced=False)


def test_hub_cache_file_is_found(tmp_path, monkeypatch):
    """A named weights file already in the hub cache, with a matching hash prefix, is used as is."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    entry = get_entry("mobilenet_v2")
    tmp = ckpt / "tmp.pth"
    torch.save(entry.build().state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    source = dataclasses.replace(entry.weights[0], filename=f"mobilenet_v2-{digest[:8]}.pth")
    tmp.rename(ckpt / source.filename)
    label, path = resolve_weights(
        dataclasses.replace(entry, weights=(source,)), "IMAGENET1K_V1", download=False
    )
    assert (label, path) == ("IMAGENET1K_V1", ckpt / source.filename)


def test_random_weights_warn_and_are_deterministic(photo):
    with pytest.warns(FeatcacheWarning, match="random weights"):
        a = build_backbone("mobilenet_v2", weights="random", engine="torch", traced=False)
    with pytest.warns(FeatcacheWarning):
        b = build_backbone("mobilenet_v2", weights="random", engine="torch", traced=False)
    assert a.identity.weights == "random" and a.identity == b.identity
    px = load_pixels(photo, a.preprocessing)[None]
    np.testing.assert_array_equal(a.embed(px), b.embed(px))


def test_any_torchvision_model(photo):
    with pytest.warns(FeatcacheWarning):
        b = build_backbone("resnet18", weights="random", engine="torch", traced=False)
    assert b.embed(load_pixels(photo, b.preprocessing)[None]).shape == (1, 512)
    assert get_entry("resnet18").weights[0].name == "IMAGENET1K_V1"
    with pytest.raises(FeatcacheError, match="not available"):
        build_backbone("resnet18", weights="random", pool="max", engine="torch", traced=False)


def test_registry_errors():
    assert list_backbones()[:2] == ["mobilenet_v2", "efficientnet_lite0"]
    with pytest.raises(FeatcacheError, match="unknown backbone 'nope'.*mobilenet_v2, efficientnet_lite0"):
        get_entry("nope")
    with pytest.raises(FeatcacheError, match="not a file and not a known name.*IMAGENET1K_V1, IMAGENET1K_V2"):
        build_backbone("mobilenet_v2", weights="IMAGENET9", engine="torch", traced=False)
    with pytest.raises(FeatcacheError, match="pool 'median'"):
        build_backbone("efficientnet_lite0", pool="median", engine="torch", traced=False)


def test_wrong_weights_file_is_refused(tmp_path):
    lite = get_entry("efficientnet_lite0").weights[0].bundled()
    with pytest.raises(FeatcacheError, match="does not fit backbone mobilenet_v2"):
        build_backbone("mobilenet_v2", weights=str(lite), engine="torch", traced=False)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(FeatcacheError, match="cannot load weights file"):
        build_backbone("mobilenet_v2", weights=str(junk), engine="torch", traced=False)


def test_bundled_file_name():
    assert get_entry("efficientnet_lite0").weights[0].bundled().name == FILENAME


@pytest.mark.parametrize("argv", [["cli.py"], ["-c", "from featcache.cli import main; main()"]])
def test_cli_lists_commands(argv):
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("extract", "info", "fit", "evaluate", "predict"):
        assert f"  {command} " in out


def test_mobilenet_weights_addresses_are_torchvisions():
    entry = get_entry("mobilenet_v2")
    for w in (MobileNet_V2_Weights.IMAGENET1K_V1, MobileNet_V2_Weights.IMAGENET1K_V2):
        source = entry.weights_source(w.name)
        assert source.url == w.url and source.filename == w.url.rsplit("/", 1)[-1]


def test_importing_featcache_backbones_does_not_import_torchvision():
    code = "import sys, featcache.backbones.build, featcache.predictor; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
