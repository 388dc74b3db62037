import io
import os

import numpy as np
import pytest
from PIL import Image

from featcache import images
from featcache.backbones.normalize import normalize
from featcache.errors import ImageError
from featcache.images import Preprocessing, load_image, load_pixels, resize


def _save(img: Image.Image, path, fmt, **kw):
    img.save(path, fmt, **kw)
    return path


def test_exif_rotation_matches_decoded_and_rotated(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = _save(Image.fromarray(photo), tmp_path / "tagged.jpg", "JPEG", quality=95, exif=exif)
    raw = np.asarray(Image.open(path).convert("RGB"))
    got = np.asarray(load_image(path))
    assert got.shape == (120, 80, 3)
    np.testing.assert_array_equal(got, np.rot90(raw, k=-1))


def test_exif_rotated_jpeg_equals_prerotated_jpeg(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _save(Image.fromarray(photo), tmp_path / "tagged.jpg", "JPEG", quality=95, exif=exif)
    upright = _save(
        Image.fromarray(np.rot90(photo, k=-1).copy()), tmp_path / "upright.jpg", "JPEG", quality=95
    )
    a, b = np.asarray(load_image(tagged), float), np.asarray(load_image(upright), float)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 2.0  # same picture; only JPEG block noise differs
    wrong = np.rot90(np.asarray(load_image(upright), float), k=2)
    assert np.abs(a - wrong).mean() > 20  # the check would catch a wrong rotation


@pytest.mark.parametrize(
    "make, fmt, expected",
    [
        (lambda: Image.new("L", (8, 8), 128), "PNG", (128, 128, 128)),
        (lambda: Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
        (lambda: Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),
        (lambda: Image.new("LA", (8, 8), (60, 255)), "PNG", (60, 60, 60)),
        (lambda: Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG", (255, 255, 255)),
        (lambda: Image.new("RGBA", (8, 8), (10, 20, 30, 255)), "PNG", (10, 20, 30)),
        (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "TIFF", (0, 0, 0)),
        (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG", (255, 255, 255)),
        (lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)), "PNG", (128, 128, 128)),
        (lambda: Image.new("RGB", (8, 8), (200, 100, 50)).quantize(4), "GIF", (200, 100, 50)),
    ],
    ids=[
        "L",
        "1",
        "LA-clear",
        "LA-opaque",
        "RGBA-clear",
        "RGBA-opaque",
        "CMYK-jpeg",
        "CMYK-tiff",
        "I16-max",
        "I16-mid",
        "P",
    ],
)
def test_every_mode_becomes_rgb(tmp_path, make, fmt, expected):
    path = _save(make(), tmp_path / f"img.{fmt.lower()}", fmt)
    img = load_image(path)
    assert img.mode == "RGB"
    arr = np.asarray(img).astype(int)
    assert np.abs(arr - np.array(expected)).max() <= 2, arr[0, 0]


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    img.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    arr = np.asarray(load_image(path))
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert tuple(arr[4, 4]) == (255, 255, 255)


def test_webp_named_jpg_decodes(tmp_path, photo):
    path = tmp_path / "really_webp.jpg"
    Image.fromarray(photo).save(path, "WEBP", lossless=True)
    np.testing.assert_array_equal(np.asarray(load_image(path)), photo)


def test_text_named_jpg_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a picture\n")
    with pytest.raises(ImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert "notes.jpg" in msg and "not an image" in msg and "\n" not in msg


def test_truncated_jpeg_is_a_clear_error(tmp_path, photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)


def test_zero_byte_and_missing_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):  # as an upload of 0 bytes is told
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        load_image(b"")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(path)  # 200 Mpx in 24 kB
    assert os.path.getsize(path) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)


def test_our_own_pixel_limit(monkeypatch, tmp_path, photo):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    Image.fromarray(photo).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(tmp_path / "a.png")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(photo)


def test_array_pil_and_path_agree(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    prep = Preprocessing()
    a = load_pixels(photo, prep)
    b = load_pixels(Image.fromarray(photo), prep)
    c = load_pixels(tmp_path / "a.png", prep)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    gray = load_pixels(photo[:, :, 0], prep)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros(5, np.uint8)]
)
def test_bad_arrays_refused(bad):
    with pytest.raises(ImageError):
        load_image(bad)


def test_wrong_type_refused():
    with pytest.raises(TypeError, match="expected a path"):
        load_image(42)


def test_center_crop_keeps_the_middle(photo):
    prep = Preprocessing(size=40, resize="center_crop")
    out = load_pixels(photo, prep)
    assert out.shape == (40, 40, 3)
    # 120x80 → 60x40, then columns 10..50 of it: the crop starts at original x = 20, red ≈ 20/120·255
    assert abs(int(out[-1, 0, 0]) - 43) <= 4
    assert abs(int(load_pixels(photo, Preprocessing(size=40))[-1, 0, 0]) - 43) > 30


def test_normalize_matches_formula():
    prep = Preprocessing()
    px = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    x = normalize(px, prep).numpy()
    expected = (px.transpose(0, 3, 1, 2) / 255.0 - np.array(prep.mean)[:, None, None]) / np.array(prep.std)[
        :, None, None
    ]
    assert x.shape == (2, 3, 5, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_preprocessing_validates():
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocessing(resize="squash")
    p = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert Preprocessing.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("policy", ["stretch", "center_crop"])
def test_a_grey_image_is_resized_as_one_channel_to_the_same_pixels(tmp_path, photo, policy):
    prep = Preprocessing(resize=policy, crop_pct=0.875 if policy == "center_crop" else 1.0)
    grey = Image.fromarray(photo).convert("L")
    for fmt in ("PNG", "JPEG"):
        path = tmp_path / f"grey.{fmt.lower()}"
        grey.save(path, fmt)
        as_rgb = np.array(Image.open(path).convert("RGB").resize((prep.size, prep.size), Image.BILINEAR))
        if policy == "stretch":
            assert np.array_equal(load_pixels(path, prep), as_rgb)
        assert np.array_equal(load_pixels(path, prep), resize(load_image(path), prep))  # load_image: RGB
        assert load_image(path).mode == "RGB" and load_pixels(path, prep).flags.writeable


def test_the_callers_picture_is_never_turned_in_place(photo):
    img = Image.fromarray(photo)
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    img.info["exif"] = exif.tobytes()
    img._exif = exif
    before = np.asarray(img).copy()
    turned = load_pixels(img, Preprocessing())
    assert img.size == (120, 80) and np.array_equal(np.asarray(img), before)
    assert np.array_equal(turned, load_pixels(np.ascontiguousarray(np.rot90(photo, k=-1)), Preprocessing()))
