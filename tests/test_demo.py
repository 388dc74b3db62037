"""The embedded demo data and `featcache demo`, run as a newcomer would run it."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from support import run_featcache

from featcache import demo
from featcache.cache import read_cache
from featcache.dataset import load_label_map, scan
from featcache.errors import FeatcacheError

CLASSES = ["bag", "boot", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "trouser", "tshirt"]


def test_demo_data_is_complete_labelled_licensed_and_small():
    files = [p for p in demo.DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    for split, per_class in (("train", 40), ("test", 20)):
        ds = scan(demo.DATA / split)
        assert ds.folders == CLASSES and not ds.unreadable
        assert np.bincount([f.label for f in ds.files]).tolist() == [per_class] * 10
    for p in demo.DATA.glob("*/*/*.png"):
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (28, 28)), p
    train = {p.name for p in (demo.DATA / "train").rglob("*.png")}
    test = {p.name for p in (demo.DATA / "test").rglob("*.png")}
    assert len(train) == 400 and len(test) == 200  # no two files of a split share an index
    lm = load_label_map(demo.DATA / "labels.json")
    assert sorted(lm.names) == CLASSES and sorted(lm.categories) == CLASSES
    assert lm.display("boot") == "Ankle boot" and lm.category("boot") == "footwear"
    licence = (demo.DATA / "LICENSE").read_text()
    assert "Zalando SE" in licence and "MIT" in licence
    assert "fashion-mnist" in (demo.DATA / "README.md").read_text()


def test_examples_are_distinct_classes_and_seeded():
    picks = demo.examples(demo.DATA / "test", n=6, seed=3)
    assert len({p.parent.name for p in picks}) == 6
    assert picks == demo.examples(demo.DATA / "test", n=6, seed=3)
    many = demo.examples(demo.DATA / "test", n=25)
    assert len(set(many)) == 25 and len({p.parent.name for p in many}) == 10


def test_copy_keeps_times_and_the_users_files(tmp_path):
    copy = demo.copy_data(tmp_path / "data")
    mine = copy.train / "bag" / "mine.png"
    mine.write_bytes(next((copy.train / "bag").iterdir()).read_bytes())
    again = demo.copy_data(tmp_path / "data")
    assert again == copy and mine.is_file()
    assert again.count("train") == 401 and again.count("test") == 200
    src = demo.DATA / "test" / "coat" / sorted(p.name for p in (demo.DATA / "test" / "coat").iterdir())[0]
    dst = again.test / "coat" / src.name
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns and dst.read_bytes() == src.read_bytes()


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "work"
    first = run_featcache(["demo", "--workdir", work, "-q"])
    second = run_featcache(["demo", "--workdir", work, "-q"])
    return work, first, second


@pytest.mark.slow
def test_demo_runs_the_whole_job_offline(demo_runs):
    work, first, _ = demo_runs
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "efficientnet_lite0" in out and "mobilenet_v2" in out and "[5/5]" in out
    assert "Traceback" not in first.stderr
    assert re.search(r"computed 400, reused 0", out)
    families = re.findall(r"^(logreg|linsvm|softmax) +(\d+\.\d+) ± ", out, re.M)
    assert [f for f, _ in families] == ["logreg", "linsvm", "softmax"]
    held_out = float(re.search(r"^accuracy +(\d+\.\d+) %", out, re.M).group(1))
    assert held_out >= 75, out  # efficientnet_lite0 + a linear model on 40 images per class
    report = json.loads((work / "models" / "report.json").read_text())
    assert report["n_images"] == 400 and report["n_classes"] == 10
    cache = read_cache(work / "features.h5")
    assert len(cache) == 400 and cache.label_map.display("boot") == "Ankle boot"
    line = r"^data/test/(\w+)/\d+\.png\t(.+?) \d+\.\d%  \[(\w+)\]  (right|WRONG)"
    predictions = re.findall(line, out, re.M)
    assert len(predictions) == 6
    folder_of = {name: folder for folder, name in cache.label_map.names.items()}
    for folder, label, category, verdict in predictions:
        assert (verdict == "right") == (label == cache.label_map.display(folder))
        assert category == cache.label_map.category(folder_of[label])
    for png in (work / "embedding.png", work / "models" / "confusion_matrix.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) >= 500


@pytest.mark.slow
def test_the_commands_the_demo_prints_run_as_printed_in_its_folder(demo_runs):
    import shlex

    work, first, _ = demo_runs
    commands = re.findall(r"^      \$ (featcache .*)$", first.stdout, re.M)
    assert len(commands) == 5
    for command in commands:
        run = run_featcache(shlex.split(command)[1:], cwd=work, timeout=600)
        assert run.returncode == 0, (command, run.stderr)


@pytest.mark.slow
def test_the_demo_pipeline_is_a_library_call_that_reports_each_step(demo_runs, tmp_path):
    from featcache.cache import read_cache as read

    work, _, _ = demo_runs
    steps = []
    demo.run(work, on_step=steps.append)  # the CLI's workdir: reused as it is
    assert [(s.number, s.result is None) for s in steps] == [
        (n, done) for n in range(1, 6) for done in (True, False)
    ]
    results = {s.number: s.result for s in steps if s.result is not None}
    assert results[1].n_computed == 0 and results[1].n_images == len(read(work / "features.h5"))
    assert results[2].report["n_images"] == 400 and results[3].n_images == 200
    assert len(results[4]) == 6 and all(p.path.startswith("data/test/") for p in results[4])
    assert results[5] == work / "embedding.png"
    assert [s.command for s in steps[:2]] == [
        "featcache extract data/train --backbone efficientnet_lite0 --labels data/labels.json"
    ] * 2


@pytest.mark.slow
def test_demo_rerun_reuses_the_cache(demo_runs):
    _, first, second = demo_runs
    assert second.returncode == 0, second.stderr
    assert "computed 0, reused 400" in second.stdout and "(unchanged)" in second.stdout
    accuracy = [re.search(r"^accuracy +(\S+) %", r.stdout, re.M).group(1) for r in (first, second)]
    assert accuracy[0] == accuracy[1]


def test_workdir_of_someone_else_is_refused(tmp_path):
    mine = tmp_path / "project"
    (mine / "models").mkdir(parents=True)
    (mine / "features.h5").write_bytes(b"the user's cache")
    with pytest.raises(FeatcacheError, match="did not make: pass another workdir=PATH"):
        demo.prepare_workdir(mine)
    with pytest.raises(FeatcacheError, match="is not a folder"):
        demo.prepare_workdir(mine / "features.h5")
    assert sorted(p.name for p in mine.iterdir()) == ["features.h5", "models"]
    assert (mine / "features.h5").read_bytes() == b"the user's cache"
    result = run_featcache(["demo", "--workdir", mine])
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    fresh = demo.prepare_workdir(tmp_path / "new" / "demo")
    assert fresh.count("train") == 400 and (tmp_path / "new" / "demo" / demo.MARKER).is_file()
    assert demo.prepare_workdir(tmp_path / "new" / "demo") == fresh  # its own folder: accepted again
