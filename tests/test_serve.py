"""`featcache serve`: the real server in a subprocess on 127.0.0.1, its API, bad uploads, the token,
and the page in a real headless browser."""

import io

import httpx
import numpy as np
import pytest
from conftest import headless_chromium, make_dataset, make_image, needs_browser
from PIL import Image
from support import serving

from featcache.extract import extract
from featcache.fit import fit
from featcache.predictor import Predictor

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(root / "data", per_class=20)  # enough images for an out-of-distribution threshold
    extract(data, root / "f.h5", backbone="efficientnet_lite0")
    return data, fit(root / "f.h5", model="logreg", cv=3, output=root / "m").model_path


@pytest.fixture(scope="module")
def server(model):
    with serving(model[1], "--token", TOKEN, "--max-upload-mb", "1") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def _files(paths):
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_predict_answers_what_predictor_says(client, model):
    data, model_path = model
    paths = sorted(data.rglob("*.jpg"))[:7]
    response = client.post("/predict", files=_files(paths), params={"top_k": 2})
    assert response.status_code == 200
    got = response.json()
    expected = [p.to_dict() for p in Predictor.load(model_path).predict_files(paths, top_k=2)]
    assert [g["path"] for g in got] == [p.name for p in paths]
    for g, e in zip(got, expected, strict=True):
        assert (g["label"], g.get("category"), len(g["top_k"])) == (e["label"], e.get("category"), 2)
        assert g["probability"] == pytest.approx(e["probability"], abs=1e-6)
    raw = client.post("/predict", content=paths[0].read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()[0]["label"] == expected[0]["label"]


def test_the_model_card_and_health(client, server):
    health = httpx.get(f"{server}/health").json()  # no token needed
    assert health["status"] == "ready" and health["engine"] == "openvino"
    card = client.get("/model").json()
    assert [c["folder"] for c in card["classes"]] == ["cat", "dog", "fox"]
    assert card["backbone"]["name"] == "efficientnet_lite0" and card["family"] == "logreg"
    assert 0 <= card["cv_accuracy"] <= 1 and card["cv_folds"] == 3
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def _bomb() -> bytes:
    out = io.BytesIO()
    Image.new("L", (12000, 10000)).save(out, "PNG", optimize=True)  # 120 MP in about 100 KB
    return out.getvalue()


def _truncated(tmp_path) -> bytes:
    path = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    return data[: len(data) // 2]


def test_bad_uploads_get_a_reason_and_the_server_goes_on(client, model, tmp_path):
    good = sorted(model[0].rglob("*.jpg"))[0]
    cases = {
        "text.jpg": (b"this is not a picture", 400, "not an image Pillow can decode"),
        "zero.png": (b"", 400, "empty (0 bytes)"),
        "half.jpg": (_truncated(tmp_path), 400, "truncated or corrupt image"),
        "bomb.png": (_bomb(), 400, "decompression bomb"),
        "huge.jpg": (good.read_bytes() + b"\0" * 1_200_000, 413, "over the limit of 1 MB"),
    }
    for name, (content, status, reason) in cases.items():
        response = client.post("/predict", files=[("files", (name, content, "image/jpeg"))])
        assert response.status_code == status, (name, response.text)
        assert reason in response.text, (name, response.text)
    chunked = client.post("/predict", content=iter([b"\0" * 600_000] * 3),
                          headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert chunked.status_code == 413
    mixed = client.post(
        "/predict", files=_files([good]) + [("files", ("x.jpg", b"nope", "image/jpeg"))]
    ).json()
    assert "label" in mixed[0] and mixed[1] == {"path": "x.jpg", "error": "not an image Pillow can decode"}
    wrong_field = client.post("/predict", files=[("file", ("a.jpg", good.read_bytes(), "image/jpeg"))])
    assert wrong_field.status_code == 400 and "in the field 'files'" in wrong_field.text
    assert client.post("/predict", files=_files([good])).status_code == 200  # still serving


def test_an_upload_name_is_only_a_name(client, model):
    good = sorted(model[0].rglob("*.jpg"))[0]
    response = client.post(
        "/predict", files=[("files", ("../../etc/passwd", good.read_bytes(), "image/jpeg"))]
    )
    assert response.status_code == 200 and response.json()[0]["path"] == "passwd"


def test_every_route_but_health_and_the_page_needs_the_token(server, model):
    good = sorted(model[0].rglob("*.jpg"))[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert httpx.get(f"{server}/model", headers=headers).status_code == 401
        assert httpx.post(f"{server}/predict", files=_files([good]), headers=headers).status_code == 401
        assert httpx.get(f"{server}/openapi.json", headers=headers).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "featcache" in page.text and "cdn" not in page.text.lower()


def test_a_server_without_a_token_and_a_model_that_is_not_one(model, tmp_path):
    with serving(model[1]) as url:
        assert httpx.get(f"{url}/model").status_code == 200
    (tmp_path / "fake.joblib").write_bytes(b"not a model")
    from support import run_featcache

    run = run_featcache(["serve", "--model-path", tmp_path / "fake.joblib", "--port", "8999"], timeout=120)
    assert run.returncode == 1 and run.stderr.strip().startswith("error: ")


@needs_browser
def test_the_page_classifies_an_image_in_a_real_browser(server, model, tmp_path):
    pytest.importorskip("selenium.webdriver")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(seconds):  # the page replaces elements as answers arrive
        return WebDriverWait(driver, seconds, ignored_exceptions=(StaleElementReferenceException,))

    image = make_image(tmp_path / "mystery.png", seed=1)
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(noise)
    predictor = Predictor.load(model[1])
    known, unknown = (next(predictor.predict_files([p])) for p in (image, noise))
    expected = f"unknown (closest: {known.label}" if known.unknown else f"{known.label} "
    with headless_chromium(1200, 900) as driver:
        driver.get(server + "/")
        token = wait(30).until(lambda d: d.find_element(By.ID, "token").is_displayed()
                                                and d.find_element(By.ID, "token"))  # fmt: skip
        token.send_keys(TOKEN + "\n")
        wait(30).until(lambda d: "Backbone" in d.find_element(By.ID, "card").text)
        driver.find_element(By.ID, "files").send_keys(str(image))
        label = wait(60).until(
            lambda d: next(
                (e.text for e in d.find_elements(By.CSS_SELECTOR, ".result .label") if "%" in e.text), None
            )
        )
        assert label.startswith(expected), label
        assert len(driver.find_elements(By.CSS_SELECTOR, ".result .bar")) == 3  # top 5 of 3 classes
        assert "efficientnet_lite0" in driver.find_element(By.ID, "card").text
        assert unknown.unknown  # noise is none of the classes: the page says so
        driver.find_element(By.ID, "files").send_keys(str(noise))
        shown = wait(60).until(
            lambda d: next((e.text for e in d.find_elements(By.CSS_SELECTOR, ".result .label.unknown")), None)
        )
        assert shown == f"unknown (closest: {unknown.label} {100 * unknown.probability:.0f} %)"


def test_a_port_in_use_is_one_error_line(model):
    import socket

    from support import run_featcache

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_featcache(["serve", "--model-path", model[1], "--port", str(port)], timeout=120)
    assert run.returncode == 1
    assert (
        run.stderr.strip()
        == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (choose another port)"
    )
