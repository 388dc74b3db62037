import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import make_dataset, make_image
from PIL import Image

from featcache import images
from featcache.cache import read_cache
from featcache.errors import CacheMismatchError, FeatcacheError
from featcache.extract import extract
from featcache.images import load_pixels

LITE = {"backbone": "efficientnet_lite0", "batch_size": 4}


def test_extract_rows_labels_attributes(dataset, tmp_path, lite0_backbone):
    out = tmp_path / "features.h5"
    result = extract(dataset, out, **LITE)
    assert result.n_images == 18 and result.n_computed == 18 and result.written and not result.skipped
    cache = read_cache(out)
    assert cache.folders == ["cat", "dog", "fox"]
    assert cache.paths == [f"{c}/{i:03d}.jpg" for c in ("cat", "dog", "fox") for i in range(6)]
    assert cache.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert cache.features.shape == (18, 1280) and cache.features.dtype == np.float32
    assert cache.identity == lite0_backbone.identity
    assert cache.data_root == str(dataset.resolve())
    with h5py.File(out, "r") as f:
        assert f.attrs["format_version"] == 2 and f.attrs["backbone"] == "efficientnet_lite0"
        assert f.attrs["weights_sha256"] == lite0_backbone.identity.weights_sha256
        assert json.loads(f.attrs["preprocessing"])["mean"] == [0.5, 0.5, 0.5]
        assert f.attrs["dtype"] == "float32" and f.attrs["featcache_version"]
    for path, row in zip(cache.paths, cache.features, strict=True):
        alone = lite0_backbone.embed(load_pixels(dataset / path, lite0_backbone.preprocessing)[None])[0]
        np.testing.assert_allclose(row, alone, rtol=0, atol=1e-5)


def test_unlabelled_files_label_map_and_float16(tmp_path):
    data = make_dataset(tmp_path / "data", classes=("00_00", "03_03"), per_class=2)
    make_image(data / "loose.png", 99)
    result = extract(data, tmp_path / "f.h5", labels="garbage26", dtype="float16", **LITE)
    cache = read_cache(result.output)
    assert cache.paths[-1] == "loose.png" and cache.labels[-1] == -1
    assert cache.names == ["Plastic Bottle", "Banana Peel"]
    assert cache.label_map.category("03_03") == "wet"
    assert cache.features.dtype == np.float16
    assert cache.class_counts() == {"00_00": 2, "03_03": 2}


def test_rerun_computes_nothing_and_follows_changes(dataset, tmp_path):
    out = tmp_path / "features.h5"
    extract(dataset, out, **LITE)
    before = read_cache(out)
    np.asarray(before.features)  # read now: the file is replaced below
    stamp = os.stat(out).st_mtime_ns
    again = extract(dataset, out, **LITE)
    assert (again.n_computed, again.n_reused, again.written) == (0, 18, False)
    assert os.stat(out).st_mtime_ns == stamp

    make_image(dataset / "dog" / "new.jpg", 4242)
    (dataset / "cat" / "002.jpg").unlink()
    make_image(dataset / "fox" / "001.jpg", 777)  # same name, new picture
    changed = extract(dataset, out, **LITE)
    assert (changed.n_computed, changed.n_removed, changed.written) == (2, 1, True)
    after = read_cache(out)
    fresh = read_cache(extract(dataset, tmp_path / "fresh.h5", **LITE).output)
    assert after.paths == fresh.paths and "cat/002.jpg" not in after.paths and "dog/new.jpg" in after.paths
    np.testing.assert_array_equal(after.labels, fresh.labels)
    np.testing.assert_allclose(after.features, fresh.features, rtol=0, atol=1e-5)
    i_old, i_new = before.paths.index("fox/001.jpg"), after.paths.index("fox/001.jpg")
    assert not np.allclose(before.features[i_old], after.features[i_new], atol=1e-3)
    i_keep = before.paths.index("cat/000.jpg")
    np.testing.assert_array_equal(before.features[i_keep], after.features[after.paths.index("cat/000.jpg")])


def test_other_settings_are_never_mixed(dataset, tmp_path):
    out = tmp_path / "features.h5"
    extract(dataset, out, **LITE)
    with pytest.raises(CacheMismatchError, match="made differently.*pool: avg vs max.*overwrite=True"):
        extract(dataset, out, pool="max", **LITE)
    with pytest.raises(FeatcacheError, match="dtype: float32 vs float16"):
        extract(dataset, out, dtype="float16", **LITE)
    assert read_cache(out).identity.pool == "avg"
    result = extract(dataset, out, pool="max", overwrite=True, **LITE)
    assert result.n_computed == 18 and read_cache(out).identity.pool == "max"


def test_foreign_output_is_not_replaced(dataset, tmp_path):
    out = tmp_path / "features.h5"
    out.write_text("my thesis, not a cache")
    with pytest.raises(FeatcacheError, match="refusing to replace it"):
        extract(dataset, out, **LITE)
    assert out.read_text() == "my thesis, not a cache"


def test_bad_files_are_skipped_with_reasons(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", classes=("good", "bad"), per_class=3)
    bad = data / "bad"
    (bad / "zero.jpg").write_bytes(b"")
    good_jpeg = (data / "good" / "000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (bad / "text.jpg").write_text("not a picture")
    Image.new("1", (20000, 10000)).save(bad / "bomb.png")
    (bad / "locked.jpg").write_bytes(good_jpeg)
    os.symlink(bad / "gone.jpg", bad / "broken.jpg")
    os.symlink(bad / "loop.jpg", bad / "loop.jpg")
    # noise that is ignored without a word: hidden files, hidden folders, files that are not images
    (bad / ".DS_Store").write_bytes(b"\x00\x01junk")
    (data / ".git").mkdir()
    (data / ".git" / "x.jpg").write_text("ignored")
    (data / "README.txt").write_text("about this data")
    (bad / "notes.csv").write_text("a,b\n1,2\n")
    shutil.copy(data / "good" / "001.jpg", bad / "photo_without_extension")

    real_open = images.Image.open

    def deny_locked(path, *a, **kw):  # tests run as root, where chmod 000 cannot deny a read
        if str(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(images.Image, "open", deny_locked)
    result = extract(data, tmp_path / "f.h5", **LITE)
    reasons = dict(result.skipped)
    assert set(reasons) == {
        "bad/zero.jpg", "bad/truncated.jpg", "bad/text.jpg", "bad/bomb.png",
        "bad/locked.jpg", "bad/broken.jpg", "bad/loop.jpg",
    }  # fmt: skip
    assert reasons["bad/zero.jpg"] == "empty (0 bytes)" and "not an image" in reasons["bad/text.jpg"]
    assert "truncated" in reasons["bad/truncated.jpg"]
    assert "decompression bomb" in reasons["bad/bomb.png"]
    assert "permission denied" in reasons["bad/locked.jpg"]
    assert reasons["bad/broken.jpg"] == "broken symbolic link"
    assert "symbolic links" in reasons["bad/loop.jpg"]
    cache = read_cache(result.output)
    kept = ["000.jpg", "001.jpg", "002.jpg", "photo_without_extension"]
    assert cache.paths == [f"bad/{n}" for n in kept] + [f"good/{n}" for n in kept[:3]]
    assert sorted(cache.skipped) == sorted(result.skipped)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FeatcacheError, match="nope: no such folder"):
        extract(tmp_path / "nope", tmp_path / "f.h5", **LITE)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(FeatcacheError, match="a.png: not a folder"):
        extract(tmp_path / "a.png", tmp_path / "f.h5", **LITE)


def test_a_saved_trace_is_used_instead_of_building(dataset, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "traces"))
    code = (
        "import sys, json; from featcache.extract import extract; "
        f"extract({str(dataset)!r}, sys.argv[1], backbone='efficientnet_lite0', engine=sys.argv[2]); "
        "print(json.dumps([m in sys.modules for m in ('torchvision', 'timm', 'torch')]))"
    )

    def run(name: str, engine: str) -> list[bool]:
        args = [sys.executable, "-c", code, str(tmp_path / name), engine]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    # the second run loads what the first saved: a trace (torch alone), or an IR (no torch at all)
    assert [run("built.h5", "torch"), run("traced.h5", "torch")] == [[True, True, True], [False, False, True]]
    assert [run("ir-built.h5", "openvino"), run("ir.h5", "openvino")] == [[True] * 3, [False] * 3]
    assert list((tmp_path / "traces").rglob("*.pt")) and list((tmp_path / "traces").rglob("model.bin"))
    for name in ("ir-built.h5", "ir.h5"):
        other = read_cache(tmp_path / name)
        assert other.engine == "openvino"
        built = read_cache(tmp_path / "built.h5").features
        np.testing.assert_allclose(other.features, built, rtol=0, atol=1e-4)
    built, traced = read_cache(tmp_path / "built.h5"), read_cache(tmp_path / "traced.h5")
    assert traced.identity == built.identity
    np.testing.assert_allclose(traced.features, built.features, rtol=0, atol=1e-6)


def test_another_folder_is_refused_but_a_moved_one_is_reused(dataset, tmp_path):
    out = tmp_path / "features.h5"
    extract(dataset, out, **LITE)
    other = make_dataset(tmp_path / "test", per_class=2, seed=5)
    with pytest.raises(
        CacheMismatchError, match="features of another folder .*data, not .*test.*overwrite=True"
    ):
        extract(other, out, **LITE)
    assert len(read_cache(out)) == 18  # nothing lost
    moved = tmp_path / "moved"
    dataset.rename(moved)
    result = extract(moved, out, **LITE)
    assert (result.n_computed, result.n_reused) == (0, 18) and read_cache(out).data_root == str(
        moved.resolve()
    )
    assert extract(other, out, overwrite=True, **LITE).n_images == 6


def test_settings_not_given_are_the_caches(dataset, tmp_path):
    out = tmp_path / "features.h5"
    first = extract(dataset, out, pool="avgmax", dtype="float16", **LITE)
    again = extract(dataset, out, batch_size=4)  # no backbone, pool or dtype: the cache's, not the defaults
    assert again.identity == first.identity and (again.n_computed, again.written) == (0, False)
    assert read_cache(out).dtype == "float16"


@pytest.mark.parametrize("content", ["nothing", "not images"])
def test_no_images_is_an_error_and_writes_nothing(tmp_path, content):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    if content == "not images":
        (data / "a" / "notes.txt").write_text("hello")
    expected = "no images found under .*data \\(" + (
        "the folder is empty" if content == "nothing" else "1 file"
    )
    with pytest.raises(FeatcacheError, match=expected):
        extract(data, tmp_path / "f.h5", **LITE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_only_unreadable_images_is_an_error_that_keeps_the_old_cache(dataset, tmp_path):
    out = tmp_path / "features.h5"
    extract(dataset, out, **LITE)
    for path in dataset.rglob("*.jpg"):
        path.write_bytes(b"garbage")
    with pytest.raises(FeatcacheError, match="no readable images under .*18 file\\(s\\) skipped"):
        extract(dataset, out, **LITE)
    assert len(read_cache(out)) == 18


def test_an_output_folder_or_unwritable_place_is_refused_before_any_work(dataset, tmp_path, monkeypatch):
    import featcache.backbones.build

    def no_build(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(featcache.backbones.build, "build_backbone", no_build)
    (tmp_path / "folder").mkdir()
    for overwrite in (False, True):
        with pytest.raises(FeatcacheError, match="folder is a folder: name a file"):
            extract(dataset, tmp_path / "folder", overwrite=overwrite, **LITE)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeatcacheError, match="file: cannot write there \\(a file is in the way\\)"):
        extract(dataset, tmp_path / "file" / "features.h5", **LITE)
    with pytest.raises(FeatcacheError, match="refusing to replace it"):
        extract(dataset, tmp_path / "file", **LITE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file", "folder"]


def test_ctrl_c_keeps_the_finished_batches(dataset, tmp_path):
    from featcache.errors import Interrupted

    out = tmp_path / "features.h5"

    def stop_after_two_batches(progress):
        if progress.stage == "extract" and progress.done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="^8 of 18 images done are kept; run the same extract again"):
        extract(dataset, out, on_progress=stop_after_two_batches, **LITE)
    assert not out.exists()
    result = extract(dataset, out, **LITE)
    assert (result.n_computed, result.n_reused) == (10, 8)
