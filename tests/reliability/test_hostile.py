"""A corpus of bad and unusual files: extract and predict complete, decode the valid ones to the
right pixels, and skip or report the others with a reason. Never a traceback."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import make_dataset
from support import can_honour_permissions, hostile_corpus, kinds, run_featcache

from featcache.cache import read_cache
from featcache.extract import extract
from featcache.fit import fit
from featcache.images import load_pixels

BACKBONE = ["--backbone", "efficientnet_lite0"]


def _printed(path):
    """How the CLI prints a path whose name is not UTF-8."""
    return os.fspath(path).encode("utf-8", "backslashreplace").decode()


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    cases = hostile_corpus(data)
    if not can_honour_permissions():  # root without the means to drop its read-anything power
        cases = [c for c in cases if c.kind != "file without read permission"]
        (data / "odd" / "locked.png").unlink()
    spare = root / "vanishing.png"
    shutil.copyfile(data / "odd" / "vanishing.png", spare)
    vanish = [data / c.relpath for c in cases if c.vanishes]
    done = run_featcache(["extract", data, "-o", root / "features.h5", *BACKBONE, "-q"],
                         vanish=vanish, honour_permissions=True)  # fmt: skip
    return root, data, cases, done


def test_corpus_has_the_kinds_the_spec_names(hostile):
    _, _, cases, _ = hostile
    assert len(kinds(cases)) >= 25
    assert sum(c.valid for c in cases) >= 14 and sum(not c.valid for c in cases) >= 10


def test_extract_completes_and_records_every_bad_file(hostile):
    root, _, cases, done = hostile
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    cache = read_cache(root / "features.h5")
    assert sorted(cache.paths) == sorted(c.relpath for c in cases if c.valid)
    skipped = dict(cache.skipped)
    assert sorted(skipped) == sorted(c.relpath for c in cases if not c.valid)
    assert all(len(reason) > 5 for reason in skipped.values()), skipped
    assert "permission denied" in skipped.get("odd/locked.png", "permission denied")
    assert skipped["odd/dangling.png"] == "broken symbolic link"
    assert "pipe" in skipped["odd/pipe.jpg"]
    assert "decompression bomb" in skipped["odd/bomb.png"]
    assert "no such file" in skipped["odd/vanishing.png"]


def test_valid_files_are_cached_with_the_right_pixels(hostile, lite0_backbone):
    root, _, cases, _ = hostile
    cache = read_cache(root / "features.h5")
    rows = dict(zip(cache.paths, cache.features, strict=True))
    prep = lite0_backbone.preprocessing
    for case in (c for c in cases if c.valid):
        reference = lite0_backbone.embed(load_pixels(case.expected, prep)[None])[0]
        similarity = _cosine(rows[case.relpath], reference)
        assert similarity >= 0.9999, (case.kind, similarity)
        if case.decoy is not None:
            decoy = lite0_backbone.embed(load_pixels(case.decoy, prep)[None])[0]
            assert _cosine(rows[case.relpath], decoy) < similarity - 0.02, case.kind


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    data = make_dataset(root / "data", classes=("a", "b"), per_class=4)
    cache = extract(data, root / "features.h5", backbone="efficientnet_lite0").output
    return fit(cache, model="logreg", cv=2, output=root / "models").model_path


def test_predict_gives_one_result_or_error_per_file(hostile, model):
    _, data, cases, _ = hostile
    files = [data / c.relpath for c in cases]
    by_file = run_featcache(["predict", *files, "--model-path", model, "--json"], honour_permissions=True)
    vanish = [data / c.relpath for c in cases if c.vanishes]
    shutil.copyfile(data.parent / "vanishing.png", vanish[0])  # extract made it vanish once already
    by_folder = run_featcache(["predict", data / "odd", "--model-path", model, "--json"],
                              vanish=vanish, honour_permissions=True)  # fmt: skip
    for done in (by_file, by_folder):
        assert done.returncode == 1, done.stderr  # some inputs could not be read
        assert "Traceback" not in done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        got = {r["path"]: r for r in records}
        assert len(got) == len(records) == len(cases)
        for case in cases:
            record = got[_printed(data / case.relpath)]
            if case.valid:
                assert record["label"] in ("a", "b") and 0 <= record["probability"] <= 1, (case.kind, record)
            else:
                assert record["error"], (case.kind, record)
