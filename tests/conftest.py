import os

import numpy as np
import pytest

os.environ.setdefault("FEATCACHE_OFFLINE", "1")  # tests never reach the network


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
