import contextlib
import os
import shutil

import numpy as np
import pytest

from featcache.backbones import BackboneIdentity, Preprocessing
from featcache.cache import FeatureCache, write_cache

os.environ.setdefault("FEATCACHE_OFFLINE", "1")  # tests never reach the network


@pytest.fixture(scope="session", autouse=True)
def _private_trace_cache(tmp_path_factory):
    """Traced backbones go to a folder of this test session, never to the user's cache."""
    os.environ["FEATCACHE_CACHE_DIR"] = str(tmp_path_factory.mktemp("featcache-cache"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def photo():
    """An asymmetric 120x80 RGB picture: a smooth colour gradient with a dark block in one corner."""
    h, w = 80, 120
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1).astype(np.uint8)
    arr[:20, :30] = 0
    return arr


def make_image(path, seed, size=(64, 48), fmt=None):
    """Write a distinct small picture (smooth colour field + a few blocks) and return its path."""
    from PIL import Image

    r = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = r.integers(0, 256, 3)
    arr = ((base + np.stack([x, y, x + y], -1) * r.uniform(0.5, 3, 3)) % 256).astype(np.uint8)
    for _ in range(3):
        x0, y0 = r.integers(0, w - 8), r.integers(0, h - 8)
        arr[y0 : y0 + 8, x0 : x0 + 8] = r.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt)
    return path


def make_dataset(root, classes=("cat", "dog", "fox"), per_class=6, seed=0):
    """A labelled folder root/<class>/<nnn>.jpg of small distinct pictures."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{i:03d}.jpg", seed * 1000 + c * 100 + i)
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def lite0_backbone():
    from featcache.backbones.build import build_backbone

    return build_backbone("efficientnet_lite0", engine="torch", traced=False)


IDENT = BackboneIdentity("efficientnet_lite0", "IMAGENET1K", "5" * 64, Preprocessing(), "avg", 32)


def synthetic_cache(path, separation=3.0, n_classes=4, per_class=30, dim=32, seed=0, shuffle_labels=False,
                    identity=IDENT, dtype="float32"):  # fmt: skip
    """A feature cache of Gaussian clusters, one per class, written to ``path``."""
    r = np.random.default_rng(seed)
    centers = r.normal(0, 1, (n_classes, dim)) * separation
    y = np.repeat(np.arange(n_classes), per_class)
    X = (centers[y] + r.normal(0, 1, (len(y), dim))).astype(np.float32)
    if shuffle_labels:
        y = r.permutation(y)
    classes = [f"c{i}" for i in range(n_classes)]
    paths = [f"{classes[c]}/{i:04d}.jpg" for i, c in enumerate(y)]
    order = np.argsort(paths)
    cache = FeatureCache(
        X[order], y[order].astype(np.int32), [paths[i] for i in order], np.zeros(len(y), np.int64),
        np.zeros(len(y), np.int64), classes, identity, dtype=dtype,
    )  # fmt: skip
    write_cache(cache, path)
    return path


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs a headless browser: apt-get install chromium chromium-driver (Debian)",
)


@contextlib.contextmanager
def headless_chromium(width: int = 1200, height: int = 900):
    """A Selenium driver of headless Chromium; on a clean exit it saves a screenshot to
    $FEATCACHE_SCREENSHOT when that is set."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
        if os.environ.get("FEATCACHE_SCREENSHOT"):
            driver.save_screenshot(os.environ["FEATCACHE_SCREENSHOT"])
    finally:
        driver.quit()
