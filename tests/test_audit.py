"""featcache audit: planted label errors, duplicates and leaks are found, clean images are not;
its page renders in a real browser; its relabel file feeds fit; the image folder is untouched."""

import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import IDENT, headless_chromium, make_image, needs_browser
from support import run_featcache

from featcache.audit import audit, label_issues
from featcache.cache import FeatureCache, read_cache, write_cache
from featcache.duplicates import near_duplicate_groups, similar_pairs
from featcache.errors import FeatcacheError, FeatcacheWarning

CLASSES = ["cat", "dog", "fox", "owl"]


def _write(path, X, y, paths, root, identity=IDENT):
    order = np.argsort(paths)
    n = len(paths)
    cache = FeatureCache(
        np.asarray(X, np.float32)[order], np.asarray(y, np.int32)[order], [paths[i] for i in order],
        np.zeros(n, np.int64), np.zeros(n, np.int64), CLASSES, identity, data_root=str(root),
    )  # fmt: skip
    write_cache(cache, path)
    return path


def _clusters(rng, per_class=40, dim=64):
    centers = rng.normal(0, 1, (len(CLASSES), dim)) * 3
    y = np.repeat(np.arange(len(CLASSES)), per_class)
    return centers[y] + rng.normal(0, 1, (len(y), dim)), y, centers


def _snapshot(folder):
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
    )


@pytest.fixture
def planted(tmp_path, rng):
    """A training cache of 4 clear classes with 8 images filed in a wrong folder, 3 near-copies, 2
    byte-identical copies and one copy filed under another class; a test cache of 30 clean images,
    2 byte-identical copies and 2 near-copies of training images. Every image exists as a file."""
    X, y, centers = _clusters(rng)
    truth = y.copy()
    near, exact, conflict = [3, 50, 90], [10, 60], 120
    wrong = rng.choice(np.setdiff1d(np.arange(len(y)), [*near, *exact, conflict]), 8, replace=False)
    y[wrong] = (y[wrong] + 1 + rng.integers(0, 3, 8)) % len(CLASSES)
    root = tmp_path / "train"
    paths = [f"{CLASSES[c]}/{i:04d}.png" for i, c in enumerate(y)]
    for i, p in enumerate(paths):
        make_image(root / p, seed=i)
    rows, labels, extra = list(X), list(y), []
    for k, i in enumerate(near + exact + [conflict]):
        rows.append(X[i] + (rng.normal(0, 0.03, X.shape[1]) if i in near else 0))
        c = (y[i] + 1) % len(CLASSES) if i == conflict else y[i]
        labels.append(c)
        extra.append(f"{CLASSES[c]}/copy{k}.png")
        target = root / extra[-1]
        if i in exact:
            shutil.copyfile(root / paths[i], target)
        else:
            make_image(target, seed=1000 + k)
    train = _write(tmp_path / "train.h5", rows, labels, paths + extra, root)

    test_root = tmp_path / "test"
    ty = np.repeat(np.arange(len(CLASSES)), 8)[:30]
    tX = list(centers[ty] + rng.normal(0, 1, (len(ty), X.shape[1])))
    tpaths = [f"{CLASSES[c]}/t{i:03d}.png" for i, c in enumerate(ty)]
    for i, p in enumerate(tpaths):
        make_image(test_root / p, seed=5000 + i)
    leaks = {
        "cat/leak_exact0.png": 5,
        "dog/leak_exact1.png": 45,
        "fox/leak_near0.png": 85,
        "owl/leak_near1.png": 125,
    }
    tlabels = list(ty)
    for name, i in leaks.items():
        tX.append(X[i] + (0 if "exact" in name else rng.normal(0, 0.03, X.shape[1])))
        tlabels.append(CLASSES.index(name.split("/")[0]))
        tpaths.append(name)
        if "exact" in name:
            (test_root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / paths[i], test_root / name)
        else:
            make_image(test_root / name, seed=9000 + i)
    test = _write(tmp_path / "test.h5", tX, tlabels, tpaths, test_root)
    return {
        "train": train, "test": test, "root": root, "paths": paths, "wrong": {paths[i] for i in wrong},
        "truth": {paths[i]: CLASSES[truth[i]] for i in wrong}, "near": near, "exact": exact,
        "conflict": conflict, "extra": extra, "leaks": leaks,
    }  # fmt: skip


def test_planted_label_errors_rank_first(planted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here: the probabilities are computed
    result = audit(planted["train"])
    conflict = planted["extra"][-1]  # a copy filed under another class than its original: wrong too
    wrong = {**planted["truth"], conflict: planted["paths"][planted["conflict"]].split("/")[0]}
    top = result.label_issues[: len(wrong)]
    assert {issue.path for issue in top} == set(wrong)
    assert all(issue.suggested == wrong[issue.path] for issue in top)
    assert "computed here" in result.probabilities
    assert result.per_class()["cat"]["images"] == sum(p.startswith("cat/") for p in planted["paths"]) + 3


def test_planted_duplicates_and_leaks_are_grouped_and_clean_images_are_not(planted):
    result = audit(planted["train"], against=planted["test"])
    paths, extra = planted["paths"], planted["extra"]
    expected = [
        {paths[i], extra[k]} for k, i in enumerate(planted["near"] + planted["exact"] + [planted["conflict"]])
    ]
    assert sorted(map(sorted, (set(g.paths) for g in result.duplicates))) == sorted(map(sorted, expected))
    first = result.duplicates[0]
    assert first.conflict and first.kind == "conflict" and set(first.paths) == expected[-1]
    assert next(result.findings()) is first  # conflicts are reported first
    exact = {g.paths: g.exact for g in result.duplicates}
    assert [exact[tuple(sorted(e))] for e in expected] == [False, False, False, True, True, False]
    leaks = {leak.path: leak for leak in result.leaks}
    assert set(leaks) == set(planted["leaks"])
    for name, i in planted["leaks"].items():
        assert leaks[name].train_path == paths[i] and leaks[name].similarity >= 0.98
        assert leaks[name].exact == ("exact" in name)


def test_the_fast_search_equals_comparing_every_pair(rng):
    X, _, _ = _clusters(rng, per_class=300, dim=256)
    copies = X[::37] + rng.normal(0, 0.05, (len(X[::37]), X.shape[1]))
    X = np.abs(np.concatenate([X, copies]))  # positive, like pooled activations: clean pairs are similar too
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = U @ U.T
    for threshold in (0.98, 0.9):
        i, j = np.nonzero(np.triu(sims >= threshold, 1))
        every = set(zip(i.tolist(), j.tolist(), strict=True))
        for method in ("blocks", "faiss"):
            pairs = similar_pairs(X, similarity=threshold, method=method, max_block=5000)
            found = set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))
            if method == "faiss" and threshold < 0.98:  # rows with more than 16 such neighbours: some missed
                assert found < every  # never a pair below the threshold
            else:
                assert found == every, (threshold, method)
    groups = near_duplicate_groups(X)
    assert len(np.unique(groups)) == len(X) - len(copies)


def test_label_issues_are_confident_learning_flags_and_rows_where_another_class_is_likelier():
    proba = np.array([[0.9, 0.1, 0], [0.8, 0.2, 0], [0.25, 0.75, 0], [0.2, 0.8, 0], [0.1, 0.9, 0],
                      [0.6, 0.4, 0], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8], [0.1, 0.45, 0.45]])  # fmt: skip
    given = np.array(["a", "a", "a", "b", "b", "b", "c", "c", "c"])
    issues = label_issues(proba, given, ["a", "b", "c"], [f"{i}" for i in range(len(given))])
    # thresholds: a = mean(.9, .8, .25) = .65, b = mean(.8, .9, .4) = .7, c = mean(.6, .8, .45) = .617
    # row 2: p(a) .25 < .65 and p(b) .75 >= .7: confident learning; row 5: p(a) .6 > p(b) .4 but
    # .6 < .65: only the most probable class; row 8: b ties c, below neither rule
    assert [(i.path, i.suggested, i.confident) for i in issues] == [("2", "b", True), ("5", "a", False)]
    assert issues[0].self_confidence == pytest.approx(0.25)


def test_cli_summary_json_page_and_the_printed_fit_command(planted, tmp_path):
    before = _snapshot(planted["root"])
    run = run_featcache(["audit", planted["train"], "--against", planted["test"], "-q"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "label conflicts  1 groups (2 images)" in run.stdout
    assert "leaks            4 of the 34 images of" in run.stdout
    args = ["audit", planted["train"], "--json", "-q", "-o", "report", "--write-relabel", "fix.csv"]
    run = run_featcache(args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert lines[0]["kind"] == "conflict" and {x["kind"] for x in lines} == {
        "conflict",
        "label_issue",
        "duplicates",
        "outlier",
    }
    assert (tmp_path / "report" / "audit.jsonl").read_text().splitlines() == run.stdout.splitlines()
    assert "<img src='data:image/jpeg;base64," in (tmp_path / "report" / "index.html").read_text()
    assert "http" not in (tmp_path / "report" / "index.html").read_text().replace("http-equiv", "")
    command = next(
        line.strip() for line in run.stderr.splitlines() if line.strip().startswith("featcache fit")
    )
    fit = run_featcache(
        [*shlex.split(command)[1:], "--model", "logreg", "--cv", "3", "-o", "fixed"], cwd=tmp_path
    )
    assert fit.returncode == 0, fit.stderr
    report = json.loads((tmp_path / "fixed" / "report.json").read_text())
    issues = [x for x in lines if x["kind"] == "label_issue"]
    assert (
        report["corrections"]["relabelled"] == len(issues) and report["n_images"] == len(planted["paths"]) + 6
    )
    assert f"{len(issues)} images relabelled, 0 left out" in fit.stdout
    assert _snapshot(planted["root"]) == before  # nothing in the image folder moved, changed or deleted


def test_fit_honours_an_exclude_file_and_audit_uses_fits_out_of_fold_probabilities(
    planted, tmp_path, monkeypatch
):
    from featcache.corrections import read_corrections
    from featcache.fit import fit

    monkeypatch.chdir(tmp_path)
    fit(planted["train"], model="logreg", cv=3)
    assert "fit's out-of-fold" in audit(planted["train"]).probabilities
    (tmp_path / "drop.txt").write_text("\n".join(sorted(planted["wrong"])) + "\n")
    corrected = read_corrections(exclude="drop.txt").apply(read_cache(planted["train"]))
    fit(corrected, model="logreg", cv=3, output="clean")
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert report["corrections"]["excluded"] == 8 and report["n_images"] == len(planted["paths"]) + 6 - 8
    result = audit(planted["train"], model_path="clean")  # oof.npz there leaves out 8 rows: computed here
    assert "computed here" in result.probabilities and "other images" in result.probabilities


def test_corrections_say_what_is_wrong(planted, tmp_path):
    from featcache.corrections import read_corrections

    (tmp_path / "bad.csv").write_text("path,given,suggested\ncat/0000.png,cat,zebra\n")
    with pytest.raises(FeatcacheError, match=r"class 'zebra' is not one of the cache's classes \(cat, dog"):
        read_corrections(tmp_path / "bad.csv").apply(read_cache(planted["train"]))
    (tmp_path / "noheader.csv").write_text("cat/0000.png,dog\n")
    with pytest.raises(FeatcacheError, match="header row naming the columns path and suggested"):
        read_corrections(tmp_path / "noheader.csv")
    (tmp_path / "gone.txt").write_text("cat/nope.png\n")
    with pytest.warns(FeatcacheWarning, match=r"1 path\(s\) of .*gone.txt are not in the cache"):
        corrected = read_corrections(exclude=tmp_path / "gone.txt").apply(read_cache(planted["train"]))
    assert corrected.changes["corrections"]["not_in_cache"] == 1
    assert np.array_equal(corrected.labels, read_cache(planted["train"]).labels)


def test_bad_input_is_one_line_or_a_note(planted, tmp_path, rng):
    from featcache.backbones.identity import BackboneIdentity
    from featcache.preprocessing import Preprocessing

    X, y, _ = _clusters(rng, per_class=10)
    names = [f"{i:03d}.png" for i in range(len(y))]
    unlabelled = _write(tmp_path / "u.h5", X, -np.ones(len(y)), names, tmp_path)
    result = audit(unlabelled)
    assert result.notes == ["no labelled images (no class folders): label issues and outliers skipped"]
    one = _write(tmp_path / "one.h5", X, np.zeros(len(y)), [f"cat/{n}" for n in names], tmp_path)
    assert "one class (cat)" in audit(one).notes[0]
    other = BackboneIdentity("mobilenet_v2", "IMAGENET1K_V2", "6" * 64, Preprocessing(), "avg", 64)
    foreign = _write(
        tmp_path / "other.h5",
        X,
        y,
        [f"{CLASSES[c]}/{n}" for c, n in zip(y, names, strict=True)],
        tmp_path,
        other,
    )
    run = run_featcache(["audit", planted["train"], "--against", foreign], cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "extracted differently" in run.stderr
    from featcache.fit import fit

    fit(planted["test"], model="logreg", cv=3, output=tmp_path / "m")  # four classes
    two = y[:12] % 2
    small = _write(
        tmp_path / "small.h5",
        X[:12],
        two,
        [f"{CLASSES[c]}/{n}" for c, n in zip(two, names[:12], strict=True)],
        tmp_path,
    )
    run = run_featcache(["audit", small, "--model-path", tmp_path / "m"], cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "was fit on classes cat, dog, fox, owl, the cache has cat, dog" in run.stderr


def test_a_missing_image_is_a_note_on_its_card(planted, tmp_path):
    from featcache.audit_page import audit_html

    os.remove(planted["root"] / planted["paths"][3])  # in a near-duplicate group
    page = audit_html(audit(planted["train"], outliers=0))
    assert page.count("image missing or unreadable") == 1 and page.count("<div class='card ") > 6


@needs_browser
def test_the_page_renders_its_cards_in_a_real_browser(planted, tmp_path):
    pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    from featcache.audit_page import write_audit

    result = audit(planted["train"], against=planted["test"])
    files = write_audit(result, tmp_path / "report")
    with headless_chromium(1300, 1000) as driver:
        driver.get(files.html.as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == len(list(result.findings()))
        assert len(driver.find_elements(By.CSS_SELECTOR, ".card.leak")) == 4
        images = driver.find_elements(By.CSS_SELECTOR, ".card img")
        assert images and all(
            driver.execute_script("return arguments[0].naturalWidth", im) == 112 for im in images[:20]
        )
        conflict = driver.find_element(By.CSS_SELECTOR, ".card.conflict")
        assert len(conflict.find_elements(By.CSS_SELECTOR, "figure")) == 2  # the whole group side by side


def test_the_commands_in_the_docs_run_as_printed(planted, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
    block = text.split("## `featcache audit [FEATURES]`", 1)[1].split("```\n", 2)[1]
    lines = [line for line in block.splitlines() if line.startswith("featcache audit")]
    commands = [line.split("#")[0].strip() for line in lines]
    assert len(commands) == 5
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(planted["train"], work / "features.h5")
    shutil.copy(planted["test"], work / "test.h5")
    for command in commands:
        run = run_featcache(shlex.split(command)[1:], cwd=work)
        assert run.returncode == 0, (command, run.stderr)
    assert (work / "audit" / "index.html").is_file() and (work / "relabel.csv").is_file()
