"""The cache grows in place: an update writes only its new rows (a segment) and a small index, reads
only what it needs, and gives the rows a fresh extraction gives."""

import os
import pickle
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset, make_image

from featcache.cache import Rows, compact, locations, read_cache, segment_folder
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract import extract

LITE = {"backbone": "efficientnet_lite0", "batch_size": 4}


def _no_row_reads(monkeypatch):
    def refuse(self, *spans):
        raise AssertionError(f"read {self.name} rows {spans}")

    monkeypatch.setattr(Rows, "_read", refuse)


def _assert_rows_equal(a, b, atol=1e-5):
    assert a.paths == b.paths and a.skipped == b.skipped and a.folders == b.folders
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    np.testing.assert_allclose(np.asarray(a.features), np.asarray(b.features), rtol=0, atol=atol)


@pytest.fixture
def grown(tmp_path):
    """A folder, its cache, and the same folder grown by 5 images, one changed and one deleted."""
    data = make_dataset(tmp_path / "data", per_class=4)
    out = tmp_path / "features.h5"
    extract(data, out, **LITE)
    old = read_cache(out).load()
    old_features = old.features
    for i in range(5):
        make_image(data / ("cat", "dog", "fox")[i % 3] / f"new{i}.jpg", 7000 + i)
    make_image(data / "dog" / "001.jpg", 8001)  # same name, another picture
    (data / "fox" / "002.jpg").unlink()
    return data, out, old, old_features


def test_an_append_writes_only_its_rows_and_equals_a_fresh_extraction(grown, tmp_path):
    data, out, old, old_features = grown
    inode = os.stat(out).st_ino
    result = extract(data, out, **LITE)
    assert (result.n_computed, result.n_removed, result.written) == (6, 1, True)
    assert result.notes and "now indexes its rows in segments in features.h5.shards/" in result.notes[0]
    rows = locations(out)
    segments = sorted(segment_folder(out).iterdir())
    assert len(segments) == 2 and len(rows.files) == 2
    base = next(s for s in segments if s.name.startswith("base-"))
    assert os.stat(base).st_ino == inode  # the old file itself, linked: nothing copied
    new = next(s for s in segments if s.name.startswith("segment-"))
    with h5py.File(new, "r") as f:
        assert f["features"].shape[0] == 6  # only the new and changed images
    fresh = read_cache(extract(data, tmp_path / "fresh.h5", **LITE).output)
    after = read_cache(out)
    _assert_rows_equal(after, fresh)
    for path in ("cat/000.jpg", "fox/003.jpg"):  # reused rows are the old rows, bit for bit
        i, j = after.paths.index(path), old.paths.index(path)
        np.testing.assert_array_equal(after.features[i], old_features[j])
    assert after.summary().segments == 2
    # a second append adds one more segment and leaves the others alone
    make_image(data / "cat" / "later.jpg", 9000)
    again = extract(data, out, **LITE)
    assert again.n_computed == 1 and not again.notes
    assert len(list(segment_folder(out).iterdir())) == 3
    _assert_rows_equal(read_cache(out), read_cache(extract(data, tmp_path / "fresh.h5", **LITE).output))


def test_a_cache_of_the_previous_format_reads_and_converts_once(grown, tmp_path):
    data, out, old, _ = grown
    with h5py.File(out, "r+") as f:  # what featcache wrote before format 2: the same file, version 1
        f.attrs["format_version"] = 1
        del f.attrs["generation"]
    assert read_cache(out).paths == old.paths
    result = extract(data, out, **LITE)
    assert "was a cache of format 1 in one file: it is now an index of format 2" in result.notes[0]
    printed = result.notes[0].split("; featcache ", 1)[1].split(" copies")[0]
    ran = CliRunner().invoke(cli, printed.split())  # the command it prints, as printed
    assert ran.exit_code == 0 and "images now in one file" in ran.output, ran.output
    _assert_rows_equal(read_cache(out), read_cache(extract(data, tmp_path / "fresh.h5", **LITE).output))
    make_image(data / "cat" / "later.jpg", 9100)
    assert "format 1" not in " ".join(extract(data, out, **LITE).notes)  # converted once


def test_a_rescan_of_unchanged_files_reads_no_rows_and_no_images(grown, monkeypatch):
    data, out, _, _ = grown
    extract(data, out, **LITE)
    stamp = os.stat(out).st_mtime_ns
    _no_row_reads(monkeypatch)
    from featcache import images

    def refuse(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(images, "load_pixels", refuse)
    again = extract(data, out, **LITE)
    assert (again.n_computed, again.written) == (0, False) and os.stat(out).st_mtime_ns == stamp


def test_deleting_files_drops_rows_without_rewriting_then_compacts(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    out = tmp_path / "features.h5"
    extract(data, out, **LITE)
    full = read_cache(out)
    full_features = np.asarray(full.features)
    for i in range(3):
        (data / "cat" / f"{i:03d}.jpg").unlink()  # 3 of 24: 12.5 % of the rows, under the threshold
    result = extract(data, out, **LITE)
    assert result.n_computed == 0 and result.n_removed == 3
    kept = read_cache(out)
    assert kept.features_virtual() and len(kept) == 21
    summary = kept.summary()
    assert summary.segments == 1 and summary.unindexed_share == pytest.approx(3 / 24)
    rows = [full.paths.index(p) for p in kept.paths]
    np.testing.assert_array_equal(np.asarray(kept.features), full_features[rows])
    for i in range(3, 7):
        (data / "cat" / f"{i:03d}.jpg").unlink()  # 7 of 24: past a quarter, so the update compacts
    extract(data, out, **LITE)
    compacted = read_cache(out)
    assert not compacted.features_virtual() and not segment_folder(out).exists() and len(compacted) == 17
    np.testing.assert_array_equal(
        np.asarray(compacted.features), full_features[[full.paths.index(p) for p in compacted.paths]]
    )


def test_compact_command_and_info(grown, monkeypatch):
    data, out, _, _ = grown
    extract(data, out, **LITE)
    expected = np.asarray(read_cache(out).features)
    runner = CliRunner()
    _no_row_reads(monkeypatch)  # info reads the listing and the segments' sizes, never a row
    info = runner.invoke(cli, ["info", str(out)])
    assert info.exit_code == 0, info.output
    stored = "stored       in 2 segment(s) in features.h5.shards/, 11.1 % of their rows no longer indexed"
    assert stored in info.output
    command = info.output.split("(featcache ", 1)[1].split(" copies")[0]
    monkeypatch.undo()
    done = runner.invoke(cli, command.split()[:1] + command.split()[1:])  # as printed
    assert done.exit_code == 0, done.output
    assert "16 images now in one file; 2 segment(s) removed" in done.output
    assert not segment_folder(out).exists()
    np.testing.assert_array_equal(np.asarray(read_cache(out).features), expected)
    again = runner.invoke(cli, ["compact", str(out)])
    assert "already in one file" in again.output


def test_lazy_rows_read_what_is_asked_and_never_rows_of_another_file(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    out = tmp_path / "features.h5"
    extract(data, out, **LITE)
    cache = read_cache(out)
    everything = np.asarray(cache.features)
    fresh = read_cache(out)
    np.testing.assert_array_equal(fresh.features[[5, 1, 5]], everything[[5, 1, 5]])
    np.testing.assert_array_equal(fresh.features[2:9:3], everything[2:9:3])
    np.testing.assert_array_equal(fresh.features[-1], everything[-1])
    np.testing.assert_array_equal(fresh.features[np.arange(12) % 5 == 0], everything[::5])
    np.testing.assert_array_equal(fresh.features.read(np.array([11, 0])), everything[[11, 0]])
    assert fresh.features._all is None  # none of those read all rows
    sent = pickle.loads(pickle.dumps(fresh))  # a copy in another process: no open file handle
    np.testing.assert_array_equal(sent.features[3], everything[3])
    make_image(data / "cat" / "new.jpg", 4444)
    extract(data, out, **LITE)  # the file is replaced by an index of 13 rows
    np.testing.assert_array_equal(fresh.features[[11, 0]], everything[[11, 0]])  # read as it was opened
    with pytest.raises(FeatcacheError, match="was replaced since it was read; read it again"):
        sent.features[0]


def test_a_missing_segment_is_an_error_never_nan(grown):
    data, out, _, _ = grown
    extract(data, out, **LITE)
    segment = next(segment_folder(out).glob("segment-*.h5"))
    shutil.move(segment, segment.with_suffix(".moved"))
    with pytest.raises(FeatcacheError, match=f"its shard features.h5.shards/{segment.name} is missing"):
        read_cache(out)
    shutil.move(segment.with_suffix(".moved"), segment)
    assert compact(out).segments == 2
